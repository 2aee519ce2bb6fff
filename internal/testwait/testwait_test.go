package testwait

import (
	"sync/atomic"
	"testing"
	"time"
)

func TestForReturnsOnceTrue(t *testing.T) {
	var ready atomic.Bool
	time.AfterFunc(20*time.Millisecond, func() { ready.Store(true) })
	start := time.Now()
	For(t, "ready", ready.Load)
	if !ready.Load() {
		t.Fatal("For returned before the condition held")
	}
	if time.Since(start) > 10*time.Second {
		t.Fatal("For kept waiting after the condition held")
	}
}

// Package testwait is the tests' one way to wait for a condition that
// another goroutine or process makes true.
package testwait

import (
	"testing"
	"time"
)

// Deadline is how long For waits: generous, because a loaded CI machine
// running the suite with -race is slow, and a passing test never waits it.
const Deadline = 60 * time.Second

// For polls cond every few milliseconds until it holds, and fails the
// test naming what it waited for if Deadline passes first.
func For(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(Deadline)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

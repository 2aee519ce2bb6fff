package jobs

import (
	"context"
	"errors"
	"imagestore/internal/testwait"
	"testing"
	"time"
)

func TestFIFOSem(t *testing.T) {
	s := newFIFOSem(1)
	ctx := context.Background()
	if err := s.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	a, b := s.enqueue(), s.enqueue()
	// Giving up a place in line passes nothing on and keeps the order.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := s.wait(cctx, a); !errors.Is(err, context.Canceled) {
		t.Fatalf("wait on cancelled ctx: %v", err)
	}
	s.Release()
	select {
	case <-b:
	case <-time.After(testwait.Deadline):
		t.Fatal("release did not grant the next waiter")
	}
	if err := s.wait(ctx, b); err != nil {
		t.Fatal(err)
	}
	s.Release()
	// The slot is free again: taken at once.
	c := s.enqueue()
	select {
	case <-c:
	default:
		t.Fatal("free slot not granted at once")
	}
	// Cancelled after being granted: the slot is passed on, not lost.
	d := s.enqueue()
	s.Release() // grants d
	if err := s.wait(cctx, d); err == nil {
		// select picked the grant; release it ourselves
		s.Release()
	}
	e := s.enqueue()
	select {
	case <-e:
	case <-time.After(testwait.Deadline):
		t.Fatal("slot lost after a cancelled grant")
	}
}

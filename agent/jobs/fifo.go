package jobs

import (
	"context"
	"sync"
)

// fifoSem is a counting semaphore granting slots in arrival order.
type fifoSem struct {
	mu      sync.Mutex
	free    int
	waiters []chan struct{}
}

func newFIFOSem(n int) *fifoSem { return &fifoSem{free: n} }

// Acquire waits for a slot.
func (s *fifoSem) Acquire(ctx context.Context) error { return s.wait(ctx, s.enqueue()) }

// enqueue takes a place in line; the channel is closed once the slot is granted.
func (s *fifoSem) enqueue() chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := make(chan struct{})
	if s.free > 0 && len(s.waiters) == 0 {
		s.free--
		close(ch)
		return ch
	}
	s.waiters = append(s.waiters, ch)
	return ch
}

// wait waits until ch (from enqueue) is granted or ctx ends; on ctx's end
// the place is given up, or the slot passed on if granted meanwhile.
func (s *fifoSem) wait(ctx context.Context, ch chan struct{}) error {
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for i, w := range s.waiters {
			if w == ch {
				s.waiters = append(s.waiters[:i], s.waiters[i+1:]...)
				s.mu.Unlock()
				return ctx.Err()
			}
		}
		s.mu.Unlock()
		// Granted concurrently with cancellation: pass the slot on.
		s.Release()
		return ctx.Err()
	}
}

// Release gives a slot back, to the oldest waiter if there is one.
func (s *fifoSem) Release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.waiters) > 0 {
		ch := s.waiters[0]
		s.waiters = s.waiters[1:]
		close(ch)
		return
	}
	s.free++
}

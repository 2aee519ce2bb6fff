package ratelimit

import (
	"context"
	"sync"
	"time"
)

// simClock is a discrete-event fake clock: Sleep advances virtual time, and
// with several goroutines ("actors") time only moves once every actor is
// asleep, to the earliest wake-up. Nothing really sleeps, so figures are
// exact and independent of machine load. A single actor gets the simple
// "Sleep advances time by d" behaviour.
type simClock struct {
	mu       sync.Mutex
	now      time.Time
	active   int
	sleepers []*sleeper
	sleeps   int
}

type sleeper struct {
	until time.Time
	ctx   context.Context
	ch    chan struct{}
}

var epoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// newSimClock returns a clock with actors actors (the calling test goroutine
// counts as one if it sleeps on the clock).
func newSimClock(actors int) *simClock { return &simClock{now: epoch, active: actors} }

func (c *simClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *simClock) since() time.Duration { return c.Now().Sub(epoch) }

func (c *simClock) Sleeps() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sleeps
}

func (c *simClock) Sleep(ctx context.Context, d time.Duration) error {
	c.mu.Lock()
	if err := ctx.Err(); err != nil {
		c.mu.Unlock()
		return err
	}
	c.sleeps++
	if d <= 0 {
		c.mu.Unlock()
		return nil
	}
	s := &sleeper{until: c.now.Add(d), ctx: ctx, ch: make(chan struct{})}
	c.sleepers = append(c.sleepers, s)
	c.advance()
	c.mu.Unlock()
	select {
	case <-s.ch:
		return nil
	case <-ctx.Done():
		c.mu.Lock()
		c.remove(s)
		c.mu.Unlock()
		return ctx.Err()
	}
}

// Go runs fn as an actor.
func (c *simClock) Go(wg *sync.WaitGroup, fn func()) {
	c.mu.Lock()
	c.active++
	c.mu.Unlock()
	wg.Go(func() {
		defer c.Done()
		fn()
	})
}

// Done retires an actor.
func (c *simClock) Done() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.active--
	c.advance()
}

func (c *simClock) remove(s *sleeper) {
	for i, x := range c.sleepers {
		if x == s {
			c.sleepers = append(c.sleepers[:i], c.sleepers[i+1:]...)
			return
		}
	}
}

func (c *simClock) advance() {
	// A sleeper whose context is already cancelled is about to wake up on
	// its own: it is not asleep.
	live := c.sleepers[:0]
	for _, s := range c.sleepers {
		if s.ctx.Err() == nil {
			live = append(live, s)
		}
	}
	c.sleepers = live
	if c.active <= 0 || len(c.sleepers) < c.active {
		return
	}
	next := c.sleepers[0].until
	for _, s := range c.sleepers[1:] {
		if s.until.Before(next) {
			next = s.until
		}
	}
	if next.After(c.now) {
		c.now = next
	}
	rest := c.sleepers[:0]
	for _, s := range c.sleepers {
		if !s.until.After(c.now) {
			close(s.ch)
		} else {
			rest = append(rest, s)
		}
	}
	c.sleepers = rest
}

// Package retry is the module's one retry loop: capped exponential backoff
// with jitter, a permanent-error marker, and an injectable sleep so tests
// run without waiting.
package retry

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Policy says how often and how patiently to try. The zero value tries once.
type Policy struct {
	// Attempts is the number of tries in all, the first included (≤ 1: one).
	Attempts int
	// Initial is the wait before the second try; each later wait doubles,
	// up to Max (0: no cap).
	Initial, Max time.Duration
	// Jitter spreads each wait uniformly over ±Jitter of it (0.2 = ±20 %),
	// so clients cut by the same fault do not come back in step.
	Jitter float64
	// Retryable says whether an error is worth another try; nil means
	// every error not marked Permanent. Permanent errors and a done ctx
	// end the loop whatever it says.
	Retryable func(error) bool
	// OnRetry, if set, is told of each failed try that will be retried.
	OnRetry func(attempt int, err error, wait time.Duration)
	// Sleep waits d or until ctx ends (default: a timer). Tests inject
	// one that records and returns at once.
	Sleep func(ctx context.Context, d time.Duration) error
	// Rand returns a number in [0, 1) for the jitter (default math/rand/v2).
	Rand func() float64
}

// Do runs fn until it succeeds, returns a permanent or non-retryable error,
// ctx ends, or Attempts tries are spent. attempt counts from 0. The error
// returned is fn's last (unwrapped from Permanent); if ctx ended while
// waiting to retry, it wraps both ctx's error and fn's last.
func (p Policy) Do(ctx context.Context, fn func(ctx context.Context, attempt int) error) error {
	for attempt := 0; ; attempt++ {
		err := fn(ctx, attempt)
		if err == nil {
			return nil
		}
		var pe *permanentError
		if errors.As(err, &pe) {
			return pe.err
		}
		if ctx.Err() != nil || attempt+1 >= p.Attempts || (p.Retryable != nil && !p.Retryable(err)) {
			return err
		}
		wait := p.Delay(attempt)
		if p.OnRetry != nil {
			p.OnRetry(attempt, err, wait)
		}
		sleep := p.Sleep
		if sleep == nil {
			sleep = Sleep
		}
		if serr := sleep(ctx, wait); serr != nil {
			// Both stay visible: errors.Is(err, context.Canceled) and
			// errors.Is(err, <the last try's error>) hold.
			return fmt.Errorf("%w (while waiting to retry after: %w)", serr, err)
		}
	}
}

// Delay is the wait after failed try number attempt (from 0), jitter included.
func (p Policy) Delay(attempt int) time.Duration {
	d := p.Initial
	for i := 0; i < attempt && (p.Max <= 0 || d < p.Max); i++ {
		d *= 2
	}
	if p.Max > 0 && d > p.Max {
		d = p.Max
	}
	if p.Jitter > 0 && d > 0 {
		r := p.Rand
		if r == nil {
			r = rand.Float64
		}
		d = time.Duration(float64(d) * (1 + p.Jitter*(2*r()-1)))
	}
	return d
}

// Sleep waits d or until ctx ends, returning ctx's error then.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// Permanent marks err so Do returns it at once, without retrying. Do
// returns err itself, not the marker. Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanentError{err}
}

// IsPermanent reports whether err (or an error it wraps) was marked Permanent.
func IsPermanent(err error) bool {
	var pe *permanentError
	return errors.As(err, &pe)
}

package retry

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

var errTransient = errors.New("transient")

func TestDo(t *testing.T) {
	fatal := errors.New("fatal")
	tests := []struct {
		name      string
		policy    Policy
		fails     []error // fn's answers in order; nil after the list
		wantErr   error
		wantTries int
		wantWaits []time.Duration
	}{
		{"first try", Policy{Attempts: 3, Initial: time.Second}, nil, nil, 1, nil},
		{"zero policy tries once", Policy{}, []error{errTransient}, errTransient, 1, nil},
		{"succeeds on third", Policy{Attempts: 5, Initial: 100 * time.Millisecond},
			[]error{errTransient, errTransient}, nil, 3, []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}},
		{"gives up after attempts", Policy{Attempts: 3, Initial: time.Second, Max: 1500 * time.Millisecond},
			[]error{errTransient, errTransient, errTransient, errTransient}, errTransient, 3, []time.Duration{time.Second, 1500 * time.Millisecond}},
		{"permanent stops and unwraps", Policy{Attempts: 5, Initial: time.Second},
			[]error{errTransient, Permanent(fmt.Errorf("x: %w", fatal))}, fatal, 2, []time.Duration{time.Second}},
		{"retryable says no", Policy{Attempts: 5, Initial: time.Second, Retryable: func(err error) bool { return !errors.Is(err, fatal) }},
			[]error{fatal}, fatal, 1, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var waits []time.Duration
			tc.policy.Sleep = func(_ context.Context, d time.Duration) error { waits = append(waits, d); return nil }
			tries := 0
			err := tc.policy.Do(context.Background(), func(_ context.Context, attempt int) error {
				if attempt != tries {
					t.Fatalf("attempt %d on try %d", attempt, tries)
				}
				tries++
				if attempt < len(tc.fails) {
					return tc.fails[attempt]
				}
				return nil
			})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if IsPermanent(err) {
				t.Fatalf("Do returned the Permanent marker itself: %v", err)
			}
			if tries != tc.wantTries {
				t.Fatalf("%d tries, want %d", tries, tc.wantTries)
			}
			if fmt.Sprint(waits) != fmt.Sprint(tc.wantWaits) {
				t.Fatalf("waits %v, want %v", waits, tc.wantWaits)
			}
		})
	}
}

func TestDoStopsWhenContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	tries := 0
	err := Policy{Attempts: 10, Initial: time.Hour}.Do(ctx, func(context.Context, int) error {
		tries++
		cancel()
		return errTransient
	})
	if !errors.Is(err, errTransient) || tries != 1 {
		t.Fatalf("got %v after %d tries; want the fn's error after 1", err, tries)
	}
}

func TestSleepInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Fatalf("Sleep on a cancelled ctx: %v", err)
	}
}

func TestDelayJitter(t *testing.T) {
	p := Policy{Initial: time.Second, Max: 4 * time.Second, Jitter: 0.25}
	for _, tc := range []struct {
		attempt int
		r       float64
		want    time.Duration
	}{
		{0, 0.5, time.Second},
		{0, 0, 750 * time.Millisecond},
		{1, 1, 2500 * time.Millisecond},
		{5, 0.5, 4 * time.Second},
	} {
		p.Rand = func() float64 { return tc.r }
		if got := p.Delay(tc.attempt); got != tc.want {
			t.Errorf("Delay(%d) with r=%v = %v, want %v", tc.attempt, tc.r, got, tc.want)
		}
	}
	p.Rand = nil
	for range 100 {
		if d := p.Delay(0); d < 750*time.Millisecond || d > 1250*time.Millisecond {
			t.Fatalf("Delay(0) = %v outside ±25 %% of 1s", d)
		}
	}
}

func TestDoCancelledWhileWaiting(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	p := Policy{Attempts: 5, Initial: time.Hour, Sleep: func(ctx context.Context, _ time.Duration) error {
		cancel()
		return ctx.Err()
	}}
	tries := 0
	err := p.Do(ctx, func(context.Context, int) error { tries++; return errTransient })
	if !errors.Is(err, context.Canceled) || !errors.Is(err, errTransient) || tries != 1 {
		t.Fatalf("got %v after %d tries; want one error that is both Canceled and the try's", err, tries)
	}
}

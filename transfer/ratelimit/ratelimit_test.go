package ratelimit

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"net"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"
)

const (
	KiB = 1 << 10
	MiB = 1 << 20
)

type event struct {
	at time.Duration
	n  int
}

// runStreams runs streams actors that each WaitN(piece) on l in a loop until
// virtual time reaches dur, and returns each stream's (time, bytes) events.
func runStreams(c *simClock, ls []*Limiter, streams, piece int, dur time.Duration, extra func()) [][]event {
	var wg sync.WaitGroup
	out := make([][]event, streams)
	for s := range streams {
		c.Go(&wg, func() {
			for c.since() < dur {
				if err := waitAll(context.Background(), ls, piece); err != nil {
					panic(err)
				}
				out[s] = append(out[s], event{c.since(), piece})
			}
		})
	}
	if extra != nil {
		c.Go(&wg, extra)
	}
	c.Done() // the test goroutine itself does not sleep on the clock
	wg.Wait()
	return out
}

func merge(evs [][]event) []event {
	var all []event
	for _, e := range evs {
		all = append(all, e...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].at < all[j].at })
	return all
}

// bytesIn counts bytes released in [from, to].
func bytesIn(all []event, from, to time.Duration) int64 {
	var n int64
	for _, e := range all {
		if e.at >= from && e.at <= to {
			n += int64(e.n)
		}
	}
	return n
}

// maxWindow is the largest byte count released in any closed window of length w.
func maxWindow(all []event, w time.Duration) int64 {
	var best, sum int64
	j := 0
	for i := range all {
		for j < len(all) && all[j].at <= all[i].at+w {
			sum += int64(all[j].n)
			j++
		}
		best = max(best, sum)
		sum -= int64(all[i].n)
	}
	return best
}

func within(got, want, tol float64) bool { return math.Abs(got-want) <= tol*want }

func TestLongRunRateAndBursts(t *testing.T) {
	const dur = 10 * time.Second
	for _, tc := range []struct {
		name    string
		rate    int64
		streams int
		piece   int
	}{
		{"5MiB/1", 5 * MiB, 1, 32 * KiB},
		{"5MiB/4", 5 * MiB, 4, 32 * KiB},
		{"5MiB/16", 5 * MiB, 16, 32 * KiB},
		{"20MiB/1", 20 * MiB, 1, 64 * KiB},
		{"20MiB/16", 20 * MiB, 16, 32 * KiB},
		{"80MiB/4", 80 * MiB, 4, 64 * KiB},
		{"80MiB/16", 80 * MiB, 16, 64 * KiB},
		{"10KiB/3 tiny pieces", 10 * KiB, 3, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newSimClock(1)
			l := NewWithClock(tc.rate, c)
			evs := runStreams(c, []*Limiter{l}, tc.streams, tc.piece, dur, nil)
			all := merge(evs)
			got := float64(bytesIn(all, 0, dur)) / dur.Seconds()
			if !within(got, float64(tc.rate), 0.01) {
				t.Errorf("long-run rate %.0f B/s, want %d ±1%%", got, tc.rate)
			}
			win := float64(maxWindow(all, 250*time.Millisecond)) / 0.25
			t.Logf("rate %.4f× limit, max 250ms window %.4f× limit", got/float64(tc.rate), win/float64(tc.rate))
			if win > 1.25*float64(tc.rate) {
				t.Errorf("max 250ms window %.0f B/s = %.3f× the limit, want ≤ 1.25×", win, win/float64(tc.rate))
			}
			// Fairness: every stream gets close to its share.
			fair := float64(tc.rate) * dur.Seconds() / float64(tc.streams)
			for s, e := range evs {
				var n int64
				for _, x := range e {
					n += int64(x.n)
				}
				if !within(float64(n), fair, 0.05) {
					t.Errorf("stream %d moved %d bytes, fair share %.0f", s, n, fair)
				}
			}
		})
	}
}

func TestSetLimitMidRun(t *testing.T) {
	for _, tc := range []struct {
		name          string
		before, after int64
	}{
		{"raise", 10 * MiB, 40 * MiB},
		{"lower", 40 * MiB, 5 * MiB},
		{"unchanged", 8 * MiB, 8 * MiB},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newSimClock(1)
			l := NewWithClock(tc.before, c)
			all := merge(runStreams(c, []*Limiter{l}, 4, 32*KiB, 10*time.Second, func() {
				_ = c.Sleep(context.Background(), 5*time.Second)
				l.SetLimit(tc.after)
			}))
			if got := l.Limit(); got != tc.after {
				t.Fatalf("Limit() = %d, want %d", got, tc.after)
			}
			first := float64(bytesIn(all, 0, 5*time.Second-1)) / 5
			second := float64(bytesIn(all, 5*time.Second, 10*time.Second)) / 5
			if !within(first, float64(tc.before), 0.02) {
				t.Errorf("first half %.0f B/s, want %d", first, tc.before)
			}
			if !within(second, float64(tc.after), 0.02) {
				t.Errorf("second half %.0f B/s, want %d", second, tc.after)
			}
		})
	}
}

// A reservation sleeping at a slow rate wakes up when the rate is raised.
func TestSetLimitWakesWaiter(t *testing.T) {
	for _, tc := range []struct {
		name string
		to   int64
		want time.Duration // when the waiter finishes
	}{
		{"faster", 1 * MiB, time.Second + time.Second/10},
		{"unlimited", 0, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newSimClock(1)
			l := NewWithClock(1000, c) // 512-byte bucket; 100 KB would take ~100 s
			var done time.Duration
			var wg sync.WaitGroup
			c.Go(&wg, func() {
				if err := l.WaitN(context.Background(), 100_000); err != nil {
					panic(err)
				}
				done = c.since()
			})
			c.Go(&wg, func() {
				_ = c.Sleep(context.Background(), time.Second)
				l.SetLimit(tc.to)
			})
			c.Done()
			wg.Wait()
			if done > tc.want || done < time.Second {
				t.Errorf("waiter finished at %v, want in [1s, %v]", done, tc.want)
			}
		})
	}
}

func TestUnlimited(t *testing.T) {
	c := newSimClock(1)
	for name, l := range map[string]*Limiter{"zero": NewWithClock(0, c), "negative": NewWithClock(-5, c), "nil": nil} {
		if err := l.WaitN(context.Background(), 1<<40); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if l.Limit() != 0 {
			t.Errorf("%s: Limit() = %d", name, l.Limit())
		}
	}
	if c.Sleeps() != 0 || c.since() != 0 {
		t.Errorf("unlimited limiter slept: %d sleeps, %v", c.Sleeps(), c.since())
	}
	// From unlimited to limited starts with a full bucket and nothing owed.
	l := NewWithClock(0, c)
	_ = l.WaitN(context.Background(), 1<<30)
	l.SetLimit(4000)
	if err := l.WaitN(context.Background(), 1512); err != nil {
		t.Fatal(err)
	}
	if got := c.since(); got != 250*time.Millisecond {
		t.Errorf("after SetLimit from unlimited: took %v, want 250ms", got)
	}
}

func TestNilLimiter(t *testing.T) {
	var l *Limiter
	l.SetLimit(100) // no panic, stays unlimited
	if l.Limit() != 0 {
		t.Fatal("nil limiter has a limit")
	}
	ctx := context.Background()
	src := bytes.Repeat([]byte("x"), 1000)
	r := Reader(ctx, bytes.NewReader(src), nil, nil)
	if _, ok := r.(*bytes.Reader); !ok {
		t.Errorf("Reader with only nil limiters should return r itself, got %T", r)
	}
	if ReaderAt(ctx, bytes.NewReader(src), nil) == nil || Writer(ctx, io.Discard, nil) != io.Discard {
		t.Error("nil limiters should pass through")
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if Conn(ctx, a, nil, nil) != a {
		t.Error("Conn with nil limiters should return c")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := l.WaitN(cctx, 1); !errors.Is(err, context.Canceled) {
		t.Errorf("nil limiter, cancelled ctx: %v", err)
	}
}

// WaitN of more than the bucket is split into pieces and takes exactly
// (n - bucket)/rate starting from a full bucket.
func TestLargerThanBurst(t *testing.T) {
	for _, tc := range []struct {
		rate int64
		n    int
	}{
		{1000, 100_000},        // bucket 512 (minimum)
		{40 * KiB, 1 * MiB},    // bucket 1 KiB
		{5 * MiB, 64 * MiB},    // bucket 128 KiB
		{80 * MiB, 1000 * MiB}, // bucket 2 MiB
		{80 * MiB, 1 * MiB},    // fits in the bucket: no wait at all
	} {
		c := newSimClock(1)
		l := NewWithClock(tc.rate, c)
		if err := l.WaitN(context.Background(), tc.n); err != nil {
			t.Fatal(err)
		}
		burst := burstFor(float64(tc.rate))
		want := time.Duration(math.Max(0, float64(tc.n)-burst) / float64(tc.rate) * 1e9)
		if got := c.since(); math.Abs(float64(got-want)) > float64(time.Millisecond) {
			t.Errorf("rate %d, WaitN(%d): took %v, want %v", tc.rate, tc.n, got, want)
		}
	}
}

func TestCancelWhileWaiting(t *testing.T) {
	c := newSimClock(1)
	l := NewWithClock(1000, c)
	ctx, cancel := context.WithCancel(context.Background())
	var err error
	var at, otherAt time.Duration
	var wg sync.WaitGroup
	c.Go(&wg, func() {
		err = l.WaitN(ctx, 1_000_000) // ~1000 s
		at = c.since()
	})
	c.Go(&wg, func() {
		_ = c.Sleep(context.Background(), time.Second)
		cancel()
		// The cancelled reservation's unpaid part is given back: this
		// stream is not charged for it.
		if err := l.WaitN(context.Background(), 512); err != nil {
			panic(err)
		}
		otherAt = c.since()
	})
	c.Done()
	wg.Wait()
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("WaitN after cancel: %v", err)
	}
	if at != time.Second {
		t.Errorf("cancelled waiter returned at %v, want 1s", at)
	}
	if otherAt > time.Second+520*time.Millisecond {
		t.Errorf("next reservation done at %v, want ≤ 1.52s", otherAt)
	}
	// A context cancelled before the call fails at once.
	if err := l.WaitN(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Errorf("pre-cancelled: %v", err)
	}
}

// A stream wrapped by a job limiter and a store-wide one gets the smaller
// of the two, and the store budget stays shared.
func TestStackedLimiters(t *testing.T) {
	c := newSimClock(1)
	store := NewWithClock(1*MiB, c)
	job := NewWithClock(400*KiB, c)
	var a, b int64
	var wg sync.WaitGroup
	const dur = 10 * time.Second
	c.Go(&wg, func() {
		for c.since() < dur {
			_ = waitAll(context.Background(), []*Limiter{job, store}, 4*KiB)
			if c.since() <= dur {
				a += 4 * KiB
			}
		}
	})
	c.Go(&wg, func() {
		for c.since() < dur {
			_ = waitAll(context.Background(), []*Limiter{nil, store}, 4*KiB)
			if c.since() <= dur {
				b += 4 * KiB
			}
		}
	})
	c.Done()
	wg.Wait()
	if got := float64(a+b) / 10; !within(got, MiB, 0.02) {
		t.Errorf("store total %.0f B/s, want 1 MiB/s", got)
	}
	if got := float64(a) / 10; !within(got, 400*KiB, 0.05) {
		t.Errorf("job stream %.0f B/s, want 400 KiB/s", got)
	}
}

// memConn is a net.Conn over in-memory buffers, so Conn can run on the fake clock.
type memConn struct {
	net.Conn
	r io.Reader
	w bytes.Buffer
}

func (m *memConn) Read(p []byte) (int, error)  { return m.r.Read(p) }
func (m *memConn) Write(p []byte) (int, error) { return m.w.Write(p) }

func TestWrappers(t *testing.T) {
	const rate = 100 * KiB
	data := make([]byte, 1*MiB)
	for i := range data {
		data[i] = byte(i * 7)
	}
	want := time.Duration((float64(len(data)) - burstFor(rate)) / rate * 1e9)
	type wrap func(ctx context.Context, l *Limiter) ([]byte, error)
	for _, tc := range []struct {
		name string
		run  wrap
	}{
		{"Reader", func(ctx context.Context, l *Limiter) ([]byte, error) {
			return io.ReadAll(Reader(ctx, bytes.NewReader(data), l))
		}},
		{"Writer", func(ctx context.Context, l *Limiter) ([]byte, error) {
			var buf bytes.Buffer
			_, err := Writer(ctx, &buf, l).Write(data)
			return buf.Bytes(), err
		}},
		{"ReaderAt", func(ctx context.Context, l *Limiter) ([]byte, error) {
			ra := ReaderAt(ctx, bytes.NewReader(data), l)
			out := make([]byte, len(data))
			for off := 0; off < len(data); off += 100_000 {
				end := min(off+100_000, len(data))
				if n, err := ra.ReadAt(out[off:end], int64(off)); err != nil && !(err == io.EOF && n == end-off) {
					return out, err
				}
			}
			return out, nil
		}},
		{"Conn read", func(ctx context.Context, l *Limiter) ([]byte, error) {
			return io.ReadAll(Conn(ctx, &memConn{r: bytes.NewReader(data)}, l, nil))
		}},
		{"Conn write", func(ctx context.Context, l *Limiter) ([]byte, error) {
			m := &memConn{}
			_, err := Conn(ctx, m, nil, l).Write(data)
			return m.w.Bytes(), err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newSimClock(1)
			l := NewWithClock(rate, c)
			got, err := tc.run(context.Background(), l)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("data corrupted")
			}
			if el := c.since(); math.Abs(float64(el-want)) > float64(time.Millisecond) {
				t.Errorf("took %v, want %v", el, want)
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if _, err := tc.run(ctx, l); !errors.Is(err, context.Canceled) {
				t.Errorf("cancelled ctx: err = %v, want context.Canceled", err)
			}
		})
	}
}

// The real clock honours ctx and really sleeps.
func TestRealClock(t *testing.T) {
	var c realClock
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Fatalf("Sleep with cancelled ctx: %v", err)
	}
	start := c.Now()
	if err := c.Sleep(context.Background(), 5*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) < 5*time.Millisecond {
		t.Error("Sleep returned early")
	}
	l := New(10 * MiB)
	if err := l.WaitN(context.Background(), 64*KiB); err != nil {
		t.Fatal(err)
	}
}

// sizesWriter records the length of every Write, and runs after (if set)
// after the first.
type sizesWriter struct {
	sizes []int
	after func()
}

func (w *sizesWriter) Write(p []byte) (int, error) {
	w.sizes = append(w.sizes, len(p))
	if len(w.sizes) == 1 && w.after != nil {
		w.after()
	}
	return len(p), nil
}

// Writer passes a write on whole while nothing limits, and in pieces of
// at most maxChunk while something does (checked piece by piece, so a
// limit lifted mid-write lets the rest through at once).
func TestWriterPieces(t *testing.T) {
	data := make([]byte, 1*MiB)
	for _, tc := range []struct {
		name  string
		rates []int64 // one limiter per rate
		lift  bool    // SetLimit(0) on every limiter after the first piece
		want  []int
	}{
		{"unlimited", []int64{0}, false, []int{MiB}},
		{"unlimited, stacked", []int64{0, 0}, false, []int{MiB}},
		{"limited", []int64{100 * MiB}, false, repeatInt(maxChunk, MiB/maxChunk)},
		{"one of two limits", []int64{0, 100 * MiB}, false, repeatInt(maxChunk, MiB/maxChunk)},
		{"limit lifted after the first piece", []int64{100 * MiB}, true, []int{maxChunk, MiB - maxChunk}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newSimClock(1)
			var ls []*Limiter
			for _, r := range tc.rates {
				ls = append(ls, NewWithClock(r, c))
			}
			w := &sizesWriter{}
			if tc.lift {
				w.after = func() {
					for _, l := range ls {
						l.SetLimit(0)
					}
				}
			}
			n, err := Writer(context.Background(), w, ls...).Write(data)
			if err != nil || n != len(data) {
				t.Fatalf("Write = %d, %v", n, err)
			}
			if !slices.Equal(w.sizes, tc.want) {
				t.Errorf("writes of %v, want %v", w.sizes, tc.want)
			}
		})
	}
}

func repeatInt(v, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = v
	}
	return out
}

package parallel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var errBoom = errors.New("boom")

// src is an instrumented io.ReaderAt over data.
type src struct {
	data    []byte
	bytes   atomic.Int64
	calls   atomic.Int64
	cur     atomic.Int64
	maxCur  atomic.Int64
	failAt  int64 // reads covering this offset fail with errBoom (-1: never)
	block   chan struct{}
	entered chan struct{}
}

func newSrc(size int, seed uint64) *src {
	var key [32]byte
	key[0] = byte(seed)
	d := make([]byte, size)
	_, _ = rand.NewChaCha8(key).Read(d)
	return &src{data: d, failAt: -1}
}

func (s *src) ReadAt(b []byte, off int64) (int, error) {
	c := s.cur.Add(1)
	defer s.cur.Add(-1)
	for {
		m := s.maxCur.Load()
		if c <= m || s.maxCur.CompareAndSwap(m, c) {
			break
		}
	}
	s.calls.Add(1)
	if s.block != nil {
		select {
		case s.entered <- struct{}{}:
		default:
		}
		<-s.block
	}
	if s.failAt >= 0 && off <= s.failAt && s.failAt < off+int64(len(b)) {
		return 0, errBoom
	}
	if off >= int64(len(s.data)) {
		return 0, io.EOF
	}
	n := copy(b, s.data[off:])
	s.bytes.Add(int64(n))
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

// memDst is a goroutine-safe io.WriterAt.
type memDst struct {
	mu     sync.Mutex
	data   []byte
	failAt int64
}

func (d *memDst) WriteAt(b []byte, off int64) (int, error) {
	if d.failAt >= 0 && off <= d.failAt && d.failAt < off+int64(len(b)) {
		return 0, errBoom
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	copy(d.data[off:], b)
	return len(b), nil
}

// randomRanges returns non-overlapping ranges inside size, in random order.
func randomRanges(r *rand.Rand, size int64, n int) []Range {
	var out []Range
	off := int64(0)
	for range n {
		off += r.Int64N(size / int64(n) / 2)
		l := 1 + r.Int64N(size/int64(n))
		if off+l > size {
			break
		}
		out = append(out, Range{off, l})
		off += l
	}
	r.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

func sum(rs []Range) int64 {
	var n int64
	for _, r := range rs {
		n += r.Length
	}
	return n
}

// checkGoroutines fails if goroutines started during the test are still
// running after a generous grace period.
func checkGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<16)
				t.Errorf("goroutines leaked: %d > %d\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func TestDo(t *testing.T) {
	for _, tc := range []struct {
		name      string
		n, w      int
		failAt    int // -1: none
		wantErr   error
		cancelled bool
	}{
		{"all run", 100, 4, -1, nil, false},
		{"one worker", 10, 1, -1, nil, false},
		{"more workers than tasks", 3, 16, -1, nil, false},
		{"zero workers means one", 5, 0, -1, nil, false},
		{"no tasks", 0, 4, -1, nil, false},
		{"first error wins", 1000, 4, 10, errBoom, false},
		{"cancelled", 50, 4, -1, context.Canceled, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkGoroutines(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.cancelled {
				cancel()
			}
			var ran, cur, maxCur atomic.Int64
			seen := make([]atomic.Bool, tc.n)
			err := Do(ctx, tc.n, tc.w, func(ctx context.Context, i int) error {
				c := cur.Add(1)
				defer cur.Add(-1)
				for m := maxCur.Load(); c > m && !maxCur.CompareAndSwap(m, c); m = maxCur.Load() {
				}
				ran.Add(1)
				if seen[i].Swap(true) {
					t.Errorf("task %d ran twice", i)
				}
				if i == tc.failAt {
					return errBoom
				}
				time.Sleep(100 * time.Microsecond)
				return ctx.Err()
			})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if m := maxCur.Load(); m > int64(max(tc.w, 1)) {
				t.Errorf("%d tasks at once, limit %d", m, tc.w)
			}
			switch {
			case tc.wantErr == nil && ran.Load() != int64(tc.n):
				t.Errorf("ran %d of %d tasks", ran.Load(), tc.n)
			case tc.wantErr != nil && ran.Load() >= int64(tc.n):
				t.Errorf("error did not stop the remaining tasks (%d ran)", ran.Load())
			}
		})
	}
}

func TestCopy(t *testing.T) {
	for _, tc := range []struct {
		name     string
		workers  int
		chunk    int64
		srcFail  int64
		dstFail  int64
		cancel   bool
		wantErr  error
		badRange bool
	}{
		{"1 worker", 1, 4096, -1, -1, false, nil, false},
		{"8 workers small chunks", 8, 1000, -1, -1, false, nil, false},
		{"4 workers default chunk", 4, 0, -1, -1, false, nil, false},
		{"source error", 4, 4096, 300_000, -1, false, errBoom, false},
		{"destination error", 4, 4096, -1, 300_000, false, errBoom, false},
		{"cancelled", 4, 4096, -1, -1, true, context.Canceled, false},
		{"range past end", 2, 4096, -1, -1, false, io.ErrUnexpectedEOF, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkGoroutines(t)
			r := rand.New(rand.NewPCG(7, uint64(tc.workers)))
			s := newSrc(1<<20, 3)
			s.failAt = tc.srcFail
			ranges := randomRanges(r, 1<<20, 40)
			if tc.srcFail >= 0 || tc.dstFail >= 0 {
				ranges = append(ranges, Range{290_000, 20_000})
			}
			if tc.badRange {
				ranges = append(ranges, Range{1<<20 - 10, 100})
			}
			dst := &memDst{data: make([]byte, 1<<20), failAt: tc.dstFail}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.cancel {
				cancel()
			}
			n, err := Copy(ctx, dst, s, ranges, tc.workers, tc.chunk)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if n != sum(ranges) {
				t.Errorf("copied %d bytes, want %d", n, sum(ranges))
			}
			want := make([]byte, 1<<20)
			for _, rg := range ranges {
				copy(want[rg.Offset:rg.Offset+rg.Length], s.data[rg.Offset:])
			}
			if !bytes.Equal(dst.data, want) {
				t.Error("destination differs from the copied ranges")
			}
			if m := s.maxCur.Load(); m > int64(tc.workers) {
				t.Errorf("%d reads at once, want ≤ %d", m, tc.workers)
			}
			if got := s.bytes.Load(); got != sum(ranges) {
				t.Errorf("read %d bytes from src, want %d", got, sum(ranges))
			}
		})
	}
	if _, err := Copy(context.Background(), &memDst{}, newSrc(10, 1), []Range{{-1, 5}}, 1, 1); err == nil {
		t.Error("negative offset accepted")
	}
}

func TestPlanLocate(t *testing.T) {
	pl, err := newPlan([]Range{{100, 50}, {0, 10}, {300, 0}, {200, 25}}, 20)
	if err != nil {
		t.Fatal(err)
	}
	if pl.total() != 3+1+0+2 {
		t.Fatalf("total = %d", pl.total())
	}
	for _, tc := range []struct {
		off       int64
		chunk     int
		nextStart int64
	}{
		{0, 3, 0}, {9, 3, 0}, {10, -1, 100}, {99, -1, 100}, {100, 0, 0}, {119, 0, 0},
		{120, 1, 0}, {149, 2, 0}, {150, -1, 200}, {224, 5, 0}, {225, -1, -1}, {400, -1, -1},
	} {
		c, n := pl.locate(tc.off)
		if c != tc.chunk || (c < 0 && n != tc.nextStart) {
			t.Errorf("locate(%d) = %d, %d; want %d, %d", tc.off, c, n, tc.chunk, tc.nextStart)
		}
		if c >= 0 {
			if p := pl.piece(c); tc.off < p.Offset || tc.off >= p.Offset+p.Length {
				t.Errorf("piece(%d) = %+v does not hold %d", c, p, tc.off)
			}
		}
	}
}

// TestPrefetcherRandom reads random plans in roughly plan order, with
// re-reads, reads spanning chunks, reads outside the plan and far-ahead
// reads, and checks every byte and the memory bound.
func TestPrefetcherRandom(t *testing.T) {
	for seed := range uint64(12) {
		r := rand.New(rand.NewPCG(seed, 99))
		workers := 1 + r.IntN(6)
		chunk := int64(512 + r.IntN(16<<10))
		s := newSrc(1<<20, seed)
		ranges := randomRanges(r, 1<<20, 1+r.IntN(60))
		checkGoroutines(t)
		p := NewPrefetcher(context.Background(), s, ranges, workers, chunk)
		check := func(off, l int64) {
			l = min(l, int64(len(s.data))-off)
			b := make([]byte, l)
			n, err := p.ReadAt(b, off)
			if err != nil || int64(n) != l {
				t.Fatalf("seed %d: ReadAt(%d, %d) = %d, %v", seed, l, off, n, err)
			}
			if !bytes.Equal(b, s.data[off:off+l]) {
				t.Fatalf("seed %d: ReadAt(%d, %d): wrong data", seed, l, off)
			}
		}
		for _, rg := range ranges {
			for off := rg.Offset; off < rg.Offset+rg.Length; {
				l := min(1+r.Int64N(chunk*2), rg.Offset+rg.Length-off)
				switch r.IntN(10) {
				case 0: // re-read something recent
					back := r.Int64N(chunk * 2)
					check(max(0, off-back), 1+r.Int64N(chunk))
				case 1: // anywhere (metadata, far ahead, outside the plan)
					check(r.Int64N(int64(len(s.data))), 1+r.Int64N(4096))
				case 2: // a read that runs past the range's end
					l = min(l+r.Int64N(chunk), int64(len(s.data))-off)
				}
				check(off, l)
				off += l
			}
		}
		p.mu.Lock()
		maxLive := p.maxLive
		p.mu.Unlock()
		if maxLive > 2*workers {
			t.Errorf("seed %d: %d buffers held at once, want ≤ %d", seed, maxLive, 2*workers)
		}
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// An in-order consumer is served entirely from prefetched chunks: src sees
// each planned byte exactly once, and nothing else.
func TestPrefetcherInOrderReadsOnce(t *testing.T) {
	checkGoroutines(t)
	s := newSrc(4<<20, 5)
	ranges := randomRanges(rand.New(rand.NewPCG(5, 5)), 4<<20, 50)
	p := NewPrefetcher(context.Background(), s, ranges, 4, 64<<10)
	defer p.Close()
	b := make([]byte, 16<<10)
	for _, rg := range ranges {
		for off := rg.Offset; off < rg.Offset+rg.Length; off += int64(len(b)) {
			l := min(int64(len(b)), rg.Offset+rg.Length-off)
			if _, err := p.ReadAt(b[:l], off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b[:l], s.data[off:off+l]) {
				t.Fatalf("wrong data at %d", off)
			}
		}
	}
	if got, want := s.bytes.Load(), sum(ranges); got != want {
		t.Errorf("src read %d bytes, plan has %d", got, want)
	}
	if m := s.maxCur.Load(); m > 4 {
		t.Errorf("%d concurrent src reads, want ≤ 4", m)
	}
}

// A consumer that does not read keeps the workers parked at the window:
// memory stays bounded.
func TestPrefetcherBoundedMemory(t *testing.T) {
	checkGoroutines(t)
	s := newSrc(8<<20, 6)
	p := NewPrefetcher(context.Background(), s, []Range{{0, 8 << 20}}, 3, 64<<10)
	deadline := time.Now().Add(10 * time.Second)
	for s.bytes.Load() < 6*64<<10 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // give runaway workers a chance to show
	if got := s.bytes.Load(); got != 6*64<<10 {
		t.Errorf("prefetched %d bytes without a reader, want exactly 6 chunks (%d)", got, 6*64<<10)
	}
	p.mu.Lock()
	live := p.live
	p.mu.Unlock()
	if live != 6 {
		t.Errorf("%d buffers live, want 6", live)
	}
	_ = p.Close()
	p.mu.Lock()
	live = p.live
	p.mu.Unlock()
	if live != 0 {
		t.Errorf("%d buffers live after Close", live)
	}
}

func TestPrefetcherErrors(t *testing.T) {
	checkGoroutines(t)
	s := newSrc(1<<20, 8)
	s.failAt = 500_000
	p := NewPrefetcher(context.Background(), s, []Range{{0, 1 << 20}}, 2, 32<<10)
	defer p.Close()
	b := make([]byte, 32<<10)
	var err error
	for off := int64(0); off < 1<<20 && err == nil; off += int64(len(b)) {
		_, err = p.ReadAt(b, off)
	}
	if !errors.Is(err, errBoom) {
		t.Fatalf("err = %v, want the source error", err)
	}
	// Reads outside the failing chunk still work.
	if _, err := p.ReadAt(b[:10], 0); err != nil {
		t.Errorf("re-read of an earlier chunk: %v", err)
	}
	_ = p.Close()
	if _, err := p.ReadAt(b, 0); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("ReadAt after Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestPrefetcherCancel(t *testing.T) {
	checkGoroutines(t)
	s := newSrc(1<<20, 9)
	s.block = make(chan struct{})
	s.entered = make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	p := NewPrefetcher(ctx, s, []Range{{0, 1 << 20}}, 2, 64<<10)
	<-s.entered // a worker is stuck in src
	errc := make(chan error, 1)
	go func() {
		_, err := p.ReadAt(make([]byte, 100), 0)
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond) // let the reader start waiting (not required for correctness)
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("ReadAt after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ReadAt did not return after cancel")
	}
	close(s.block)
	closed := make(chan struct{})
	go func() { _ = p.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung")
	}
}

// Reading the plan backwards, or far ahead first, never deadlocks.
func TestPrefetcherOutOfOrder(t *testing.T) {
	for _, tc := range []struct {
		name  string
		order func(n int) []int
	}{
		{"backwards", func(n int) []int {
			o := make([]int, n)
			for i := range o {
				o[i] = n - 1 - i
			}
			return o
		}},
		{"last first", func(n int) []int {
			o := []int{n - 1}
			for i := range n - 1 {
				o = append(o, i)
			}
			return o
		}},
		{"skip every other", func(n int) []int {
			var o []int
			for i := 0; i < n; i += 2 {
				o = append(o, i)
			}
			return o
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkGoroutines(t)
			s := newSrc(1<<20, 10)
			const chunk = 16 << 10
			p := NewPrefetcher(context.Background(), s, []Range{{0, 1 << 20}}, 1, chunk)
			done := make(chan error, 1)
			go func() {
				b := make([]byte, chunk)
				for _, i := range tc.order(1 << 20 / chunk) {
					if _, err := p.ReadAt(b, int64(i)*chunk); err != nil {
						done <- err
						return
					}
					if !bytes.Equal(b, s.data[i*chunk:(i+1)*chunk]) {
						done <- errors.New("wrong data")
						return
					}
				}
				done <- nil
			}()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("deadlock")
			}
			_ = p.Close()
		})
	}
}

// Several goroutines reading the same Prefetcher at once get correct data.
func TestPrefetcherConcurrentReaders(t *testing.T) {
	checkGoroutines(t)
	s := newSrc(2<<20, 11)
	p := NewPrefetcher(context.Background(), s, []Range{{0, 2 << 20}}, 4, 32<<10)
	defer p.Close()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			b := make([]byte, 10_000)
			for off := int64(g * 1000); off+int64(len(b)) <= 2<<20; off += int64(len(b)) * 4 {
				if _, err := p.ReadAt(b, off); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(b, s.data[off:off+int64(len(b))]) {
					t.Errorf("wrong data at %d", off)
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestPrefetcherLagOutOfOrder: consumers taking consecutive pieces, as an
// ordered pipeline does (four workers, results taken in order, at most six
// pieces out at once), so reads arrive a few chunks out of plan order: all
// are served from the fetched chunks (src is read once per planned byte),
// and no more than the lag's budget of buffers is held.
func TestPrefetcherLagOutOfOrder(t *testing.T) {
	checkGoroutines(t)
	const chunk, consumers, workers, lag, size = 64 << 10, 4, 3, 8, 8 << 20
	s := newSrc(size, 9)
	p := NewPrefetcherLag(context.Background(), s, []Range{{Offset: 0, Length: size}}, workers, chunk, lag)
	defer p.Close()
	type job struct {
		off  int64
		done chan error
	}
	tokens := make(chan struct{}, consumers+2)
	jobs := make(chan *job)
	order := make(chan *job, consumers+2)
	go func() {
		defer close(jobs)
		defer close(order)
		for off := int64(0); off < size; off += chunk {
			tokens <- struct{}{}
			j := &job{off: off, done: make(chan error, 1)}
			order <- j
			jobs <- j
		}
	}()
	for range consumers {
		go func() {
			b := make([]byte, chunk/4)
			for j := range jobs {
				var err error
				for o := j.off; o < j.off+chunk && err == nil; o += int64(len(b)) {
					if _, err = p.ReadAt(b, o); err == nil && !bytes.Equal(b, s.data[o:o+int64(len(b))]) {
						err = fmt.Errorf("wrong data at %d", o)
					}
				}
				j.done <- err
			}
		}()
	}
	for j := range order {
		if err := <-j.done; err != nil {
			t.Fatal(err)
		}
		<-tokens
	}
	if got := s.bytes.Load(); got != size {
		t.Errorf("src read %d bytes for an 8 MiB plan (reads fell outside the fetched chunks)", got)
	}
	p.mu.Lock()
	maxLive := p.maxLive
	p.mu.Unlock()
	if maxLive > 2*workers+lag-2 {
		t.Errorf("%d buffers held at once, want ≤ %d", maxLive, 2*workers+lag-2)
	}
}

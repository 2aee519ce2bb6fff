package parallel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sync"
)

// Prefetcher serves ReadAt from ranges fetched ahead in parallel, in plan
// order, with bounded memory.
//
// The plan is split into chunks. Workers fetch chunks in order but only
// inside a window of `ahead` (= 2 × workers + lag − 2) chunks starting at the
// oldest chunk still held, and never hold more than `ahead` buffers. A chunk
// is released once the consumer has read it to its end, or once the consumer
// reads lag (NewPrefetcher: 2) chunks further on. Reads outside the plan, of released chunks,
// or of chunks beyond the window go straight to src, so an out-of-order
// consumer is never blocked on a chunk the workers are not allowed to fetch.
type Prefetcher struct {
	src    io.ReaderAt
	pl     *plan
	ahead  int
	lag    int // a chunk lag chunks behind the consumer's read is released
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	stop   func() bool

	mu      sync.Mutex
	next    int            // next chunk a worker will start
	held    map[int]*fetch // chunks being fetched or fetched and not released
	free    [][]byte
	live    int // buffers allocated and not returned to free
	maxLive int // high-water mark of live (tests)
	closed  bool
	changed chan struct{} // closed and replaced on every state change
}

type fetch struct {
	r     Range
	buf   []byte
	done  chan struct{}
	err   error
	ready bool
	hw    int64 // bytes read contiguously from the chunk's start
}

var errClosed = fmt.Errorf("parallel: prefetcher: %w", fs.ErrClosed)

// NewPrefetcher starts workers goroutines fetching ranges (in the order the
// consumer will read them) in pieces of chunk bytes. Close must be called.
func NewPrefetcher(ctx context.Context, src io.ReaderAt, ranges []Range, workers int, chunk int64) *Prefetcher {
	return NewPrefetcherLag(ctx, src, ranges, workers, chunk, 2)
}

// NewPrefetcherLag is NewPrefetcher for a consumer whose reads arrive up to
// a few chunks out of plan order (several goroutines taking consecutive
// pieces): a chunk is released once a read lands lag chunks further on
// (NewPrefetcher: 2), and the window and the buffer budget grow by lag
// chunks (2 × workers + lag − 2 buffers at most).
func NewPrefetcherLag(ctx context.Context, src io.ReaderAt, ranges []Range, workers int, chunk int64, lag int) *Prefetcher {
	workers = max(workers, 1)
	lag = max(lag, 2)
	pl, err := newPlan(ranges, chunk)
	if err != nil {
		// An invalid plan prefetches nothing: every read goes to src.
		pl, _ = newPlan(nil, chunk)
	}
	cctx, cancel := context.WithCancel(ctx)
	p := &Prefetcher{
		src: src, pl: pl, ahead: 2*workers + lag - 2, lag: lag, ctx: cctx, cancel: cancel,
		held: make(map[int]*fetch), changed: make(chan struct{}),
	}
	// Wake everyone waiting on a state change when ctx ends.
	p.stop = context.AfterFunc(cctx, func() {
		p.mu.Lock()
		p.notify()
		p.mu.Unlock()
	})
	for range min(workers, pl.total()) {
		p.wg.Go(p.worker)
	}
	return p
}

func (p *Prefetcher) notify() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// waitLocked drops the lock until the next state change or the end of ctx.
func (p *Prefetcher) waitLocked() {
	ch := p.changed
	p.mu.Unlock()
	select {
	case <-ch:
	case <-p.ctx.Done():
	}
	p.mu.Lock()
}

// pos is the oldest chunk not yet released.
func (p *Prefetcher) pos() int {
	pos := p.next
	for i := range p.held {
		pos = min(pos, i)
	}
	return pos
}

func (p *Prefetcher) getBuf(n int64) []byte {
	p.live++
	p.maxLive = max(p.maxLive, p.live)
	if k := len(p.free); k > 0 {
		b := p.free[k-1]
		p.free = p.free[:k-1]
		return b[:n]
	}
	return make([]byte, n, p.pl.chunk)
}

func (p *Prefetcher) putBuf(b []byte) {
	p.live--
	if len(p.free) < p.ahead {
		p.free = append(p.free, b)
	}
}

func (p *Prefetcher) releaseLocked(i int) {
	c, ok := p.held[i]
	if !ok {
		return
	}
	delete(p.held, i)
	if c.ready && c.buf != nil {
		p.putBuf(c.buf)
		c.buf = nil
	}
	// A chunk still being fetched returns its buffer when the fetch ends.
}

func (p *Prefetcher) worker() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		for {
			if p.closed || p.ctx.Err() != nil || p.next >= p.pl.total() {
				return
			}
			if p.next < p.pos()+p.ahead && p.live < p.ahead {
				break
			}
			p.waitLocked()
		}
		i := p.next
		p.next++
		c := &fetch{r: p.pl.piece(i), done: make(chan struct{})}
		c.buf = p.getBuf(c.r.Length)
		p.held[i] = c
		p.notify()
		p.mu.Unlock()

		err := readFull(p.src, c.buf, c.r.Offset)

		p.mu.Lock()
		c.err, c.ready = err, true
		close(c.done)
		if p.held[i] != c || err != nil {
			p.putBuf(c.buf) // released meanwhile, or nothing worth keeping
			c.buf = nil
		}
		p.notify()
	}
}

// ReadAt reads len(b) bytes at off, from fetched chunks where it can. It is
// safe for concurrent use. After the Prefetcher's ctx ends it returns the
// ctx's error.
func (p *Prefetcher) ReadAt(b []byte, off int64) (int, error) {
	total := 0
	for len(b) > 0 {
		if err := p.ctx.Err(); err != nil {
			if p.isClosed() {
				return total, errClosed
			}
			return total, err
		}
		i, nextStart := p.pl.locate(off)
		var n int
		var err error
		if i < 0 {
			l := int64(len(b))
			if nextStart >= 0 && nextStart-off < l {
				l = nextStart - off
			}
			n, err = p.direct(b[:l], off)
		} else {
			r := p.pl.piece(i)
			n, err = p.fromChunk(i, r, b[:min(int64(len(b)), r.Offset+r.Length-off)], off)
		}
		total += n
		if err != nil {
			return total, err
		}
		b, off = b[n:], off+int64(n)
	}
	return total, nil
}

func (p *Prefetcher) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

func (p *Prefetcher) direct(b []byte, off int64) (int, error) {
	n, err := p.src.ReadAt(b, off)
	if n == len(b) && errors.Is(err, io.EOF) {
		err = nil
	}
	return n, err
}

// fromChunk serves b (which lies inside chunk i = r) from the chunk, waiting
// for its fetch if it is inside the window, or reads it directly otherwise.
func (p *Prefetcher) fromChunk(i int, r Range, b []byte, off int64) (int, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return 0, errClosed
	}
	if i >= p.pos()+p.ahead {
		// Far ahead (e.g. metadata the plan also covers): do not disturb
		// the window.
		p.mu.Unlock()
		return p.direct(b, off)
	}
	// The consumer has moved on to chunk i: what lies lag chunks behind is
	// done with, fetched or not.
	moved := false
	for j := range p.held {
		if j <= i-p.lag {
			p.releaseLocked(j)
			moved = true
		}
	}
	if p.next < i-p.lag+1 {
		p.next = i - p.lag + 1
		moved = true
	}
	if moved {
		p.notify()
	}
	for {
		c, ok := p.held[i]
		switch {
		case p.closed:
			p.mu.Unlock()
			return 0, errClosed
		case p.ctx.Err() != nil:
			p.mu.Unlock()
			return 0, p.ctx.Err()
		case !ok && i < p.next: // released
			p.mu.Unlock()
			return p.direct(b, off)
		case !ok || !c.ready: // not started yet, or being fetched
			p.waitLocked()
			continue
		case c.err != nil:
			p.mu.Unlock()
			return 0, c.err
		}
		rel := off - r.Offset
		n := copy(b, c.buf[rel:])
		if rel <= c.hw {
			c.hw = max(c.hw, rel+int64(n))
		}
		if c.hw >= r.Length {
			p.releaseLocked(i)
			p.notify()
		}
		p.mu.Unlock()
		return n, nil
	}
}

// Close stops the workers, waits for them to exit and frees the buffers.
func (p *Prefetcher) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.notify()
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
	p.stop()
	p.mu.Lock()
	for i := range p.held {
		p.releaseLocked(i)
	}
	p.free = nil
	p.mu.Unlock()
	return nil
}

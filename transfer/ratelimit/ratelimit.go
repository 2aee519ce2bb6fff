// Package ratelimit is a byte-rate token bucket shared by all the streams of
// a job, with wrappers for readers, writers, ReaderAts and connections.
//
// Reservations are queued in arrival order (each reservation takes a ticket in
// a running byte count and waits until the bucket has produced up to it), so
// many streams sharing one Limiter get a fair share and the long-run rate is
// exact. The bucket holds at most 1/40 s of the rate, so bursts stay small.
package ratelimit

import (
	"context"
	"io"
	"math"
	"net"
	"sync"
	"time"
)

// Clock is injected so tests can run the limiter on virtual time.
type Clock interface {
	Now() time.Time
	// Sleep returns nil after d, or ctx.Err() if ctx ends first.
	Sleep(ctx context.Context, d time.Duration) error
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

const (
	// burstDivisor sets the bucket size to 1/40 s (25 ms) of the rate.
	burstDivisor = 40
	// minBurst keeps pieces from becoming absurdly small at tiny rates.
	minBurst = 512
	// maxChunk caps one Read/Write of the wrappers, so a large caller buffer
	// does not turn into one long wait followed by a large burst of data.
	maxChunk = 64 << 10
)

// Limiter is a token bucket of bytes per second. It is safe for concurrent
// use; a nil *Limiter or a rate of 0 means unlimited.
type Limiter struct {
	clock Clock

	mu    sync.Mutex
	rate  float64 // bytes/s; 0 = unlimited
	burst float64
	// produced and consumed are running byte counts: a reservation's ticket
	// is consumed after it, and it may proceed once produced reaches it.
	produced, consumed float64
	last               time.Time
	nextID             uint64
	waiters            map[uint64]context.CancelFunc // sleeping reservations, woken by SetLimit
}

// New returns a Limiter on the real clock. 0 (or negative) = unlimited.
func New(bytesPerSec int64) *Limiter { return NewWithClock(bytesPerSec, realClock{}) }

// NewWithClock returns a Limiter on clock c.
func NewWithClock(bytesPerSec int64, c Clock) *Limiter {
	if c == nil {
		c = realClock{}
	}
	l := &Limiter{clock: c, waiters: make(map[uint64]context.CancelFunc)}
	l.setLocked(bytesPerSec, c.Now())
	return l
}

func burstFor(rate float64) float64 {
	return math.Max(math.Floor(rate/burstDivisor), minBurst)
}

// refill adds what the bucket produced since last, capped at a full bucket.
func (l *Limiter) refill(now time.Time) {
	if now.After(l.last) {
		l.produced += now.Sub(l.last).Seconds() * l.rate
		l.last = now
	}
	if full := l.consumed + l.burst; l.produced > full {
		l.produced = full
	}
}

func (l *Limiter) setLocked(bytesPerSec int64, now time.Time) {
	if bytesPerSec < 0 {
		bytesPerSec = 0
	}
	old := l.rate
	if old > 0 {
		l.refill(now) // settle what the old rate produced
	}
	l.rate = float64(bytesPerSec)
	if l.rate == 0 {
		return
	}
	l.burst = burstFor(l.rate)
	if old == 0 {
		// Coming from unlimited: start with a full bucket, nothing owed.
		l.produced = l.consumed + l.burst
	}
	l.last = now
	l.refill(now)
}

// SetLimit changes the rate; reservations already waiting recompute their
// wait at the new rate.
func (l *Limiter) SetLimit(bytesPerSec int64) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.setLocked(bytesPerSec, l.clock.Now())
	l.wakeLocked()
}

// wakeLocked interrupts every sleeping reservation so it recomputes its wait.
func (l *Limiter) wakeLocked() {
	for id, cancel := range l.waiters {
		cancel()
		delete(l.waiters, id)
	}
}

// Limit returns the rate in bytes/s (0 = unlimited).
func (l *Limiter) Limit() int64 {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return int64(l.rate)
}

// WaitN blocks until n bytes may pass. n larger than the bucket is taken in
// bucket-sized pieces, each queued fairly behind other streams' pieces.
func (l *Limiter) WaitN(ctx context.Context, n int) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if l == nil {
		return nil
	}
	for n > 0 {
		l.mu.Lock()
		if l.rate == 0 {
			l.mu.Unlock()
			return nil
		}
		piece := min(n, int(l.burst))
		l.refill(l.clock.Now())
		l.consumed += float64(piece)
		ticket := l.consumed
		l.mu.Unlock()
		if err := l.await(ctx, ticket, float64(piece)); err != nil {
			return err
		}
		n -= piece
	}
	return nil
}

func (l *Limiter) await(ctx context.Context, ticket, piece float64) error {
	eps := 1e-6 + ticket*1e-12 // float rounding on long runs
	for {
		l.mu.Lock()
		if l.rate == 0 {
			l.mu.Unlock()
			return nil
		}
		l.refill(l.clock.Now())
		short := ticket - l.produced
		if short <= eps {
			l.mu.Unlock()
			return nil
		}
		d := time.Duration(math.Ceil(short / l.rate * 1e9))
		sctx, cancel := context.WithCancel(ctx)
		id := l.nextID
		l.nextID++
		l.waiters[id] = cancel
		l.mu.Unlock()

		err := l.clock.Sleep(sctx, d)

		l.mu.Lock()
		delete(l.waiters, id)
		if ctx.Err() != nil {
			// Give back what this reservation has not yet received, so the
			// streams queued behind it are not charged for it, and let them
			// recompute their waits.
			l.refill(l.clock.Now())
			if short := ticket - l.produced; short > 0 {
				l.produced += math.Min(short, piece)
				l.wakeLocked()
			}
			l.mu.Unlock()
			cancel()
			return ctx.Err()
		}
		l.mu.Unlock()
		cancel()
		_ = err // nil (slept) or woken by SetLimit: recompute either way
	}
}

func waitAll(ctx context.Context, ls []*Limiter, n int) error {
	for _, l := range ls {
		if err := l.WaitN(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// unlimited reports whether no limiter in ls limits right now.
func unlimited(ls []*Limiter) bool {
	for _, l := range ls {
		if l.Limit() != 0 {
			return false
		}
	}
	return true
}

func nonNil(ls []*Limiter) []*Limiter {
	var out []*Limiter
	for _, l := range ls {
		if l != nil {
			out = append(out, l)
		}
	}
	return out
}

// Reader limits r by every limiter in ls (e.g. the job's and the store's).
// Reads are charged after they return and capped at 64 KiB each.
func Reader(ctx context.Context, r io.Reader, ls ...*Limiter) io.Reader {
	ls = nonNil(ls)
	if len(ls) == 0 {
		return r
	}
	return &reader{ctx: ctx, r: r, ls: ls}
}

type reader struct {
	ctx context.Context
	r   io.Reader
	ls  []*Limiter
}

func (r *reader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	if len(p) > maxChunk {
		p = p[:maxChunk]
	}
	n, err := r.r.Read(p)
	if n > 0 {
		if werr := waitAll(r.ctx, r.ls, n); werr != nil {
			return n, werr
		}
	}
	return n, err
}

// Writer limits w by every limiter in ls. Writes are charged before they
// are passed on, in pieces of at most 64 KiB; while no limiter limits (a
// rate of 0), a write is passed on whole.
func Writer(ctx context.Context, w io.Writer, ls ...*Limiter) io.Writer {
	ls = nonNil(ls)
	if len(ls) == 0 {
		return w
	}
	return &writer{ctx: ctx, w: w, ls: ls}
}

type writer struct {
	ctx context.Context
	w   io.Writer
	ls  []*Limiter
}

func (w *writer) Write(p []byte) (int, error) {
	return limitedWrite(w.ctx, w.w, w.ls, p)
}

func limitedWrite(ctx context.Context, w io.Writer, ls []*Limiter, p []byte) (int, error) {
	done := 0
	for len(p) > 0 {
		if err := ctx.Err(); err != nil {
			return done, err
		}
		k := min(len(p), maxChunk)
		if unlimited(ls) {
			// Nothing to pace: the caller's write goes on whole. Cut into
			// 64 KiB pieces it costs the writer below a call (and, on a
			// connection, a write(2)) per piece: push's upload went out as
			// 64 KiB frames instead of 1 MiB ones.
			k = len(p)
		}
		if err := waitAll(ctx, ls, k); err != nil {
			return done, err
		}
		n, err := w.Write(p[:k])
		done += n
		if err != nil {
			return done, err
		}
		if n < k {
			return done, io.ErrShortWrite
		}
		p = p[k:]
	}
	return done, nil
}

// ReaderAt limits r by every limiter in ls; each ReadAt is charged for the
// bytes it returned before it returns.
func ReaderAt(ctx context.Context, r io.ReaderAt, ls ...*Limiter) io.ReaderAt {
	ls = nonNil(ls)
	if len(ls) == 0 {
		return r
	}
	return &readerAt{ctx: ctx, r: r, ls: ls}
}

type readerAt struct {
	ctx context.Context
	r   io.ReaderAt
	ls  []*Limiter
}

func (r *readerAt) ReadAt(p []byte, off int64) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := r.r.ReadAt(p, off)
	if n > 0 {
		if werr := waitAll(r.ctx, r.ls, n); werr != nil {
			return n, werr
		}
	}
	return n, err
}

// Conn limits the reads of c by read and its writes by write (either may be nil).
func Conn(ctx context.Context, c net.Conn, read, write *Limiter) net.Conn {
	if read == nil && write == nil {
		return c
	}
	return &conn{Conn: c, ctx: ctx, read: nonNil([]*Limiter{read}), write: nonNil([]*Limiter{write})}
}

type conn struct {
	net.Conn
	ctx         context.Context
	read, write []*Limiter
}

func (c *conn) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	if len(p) > maxChunk {
		p = p[:maxChunk]
	}
	n, err := c.Conn.Read(p)
	if n > 0 {
		if werr := waitAll(c.ctx, c.read, n); werr != nil {
			return n, werr
		}
	}
	return n, err
}

func (c *conn) Write(p []byte) (int, error) {
	return limitedWrite(c.ctx, c.Conn, c.write, p)
}

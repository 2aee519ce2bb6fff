package sshfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"imagestore/internal/retry"
)

// ErrFileChanged: the remote file's size or modification time changed
// while it was being read (found on reconnecting, or on opening another
// lane). Reading on would mix two versions of it.
var ErrFileChanged = errors.New("sshfs: file changed while being read")

// ReadOptions tune OpenReader; the zero value reads over one connection.
type ReadOptions struct {
	// Lanes is how many connections (Host.Lane, Host.Lane+1, ...) the reads
	// are spread over, taking them in turn, so that parallel reads do not
	// all queue behind one sshd process and one channel window. ≤ 1: one.
	Lanes int
	// LaneRefused, if set, is told when an extra lane could not be opened
	// (the host limits connections, say); the file is then read over the
	// lanes that did open.
	LaneRefused func(lane int, err error)
	// OnRead, if set, is told of every byte received, bytes of reads that
	// are retried included (progress, metrics).
	OnRead func(n int64)
	// Reconnect is when and how often a read whose connection was lost is
	// tried again on a fresh one (its Retryable is always Reconnectable).
	// Zero: DefaultReconnect().
	Reconnect retry.Policy
}

// DefaultReconnect is the reconnect policy of a Reader: a read survives
// four lost connections in a row, waiting 100 ms, 200 ms, 400 ms, 800 ms
// (±20 %) before each new one.
func DefaultReconnect() retry.Policy {
	return retry.Policy{Attempts: 5, Initial: 100 * time.Millisecond, Max: 2 * time.Second, Jitter: 0.2}
}

// Reconnectable is the one rule for whether a failed read (or reopen) is
// worth another try on a fresh connection: the connection was lost, or the
// host could not be reached. A status the server sent (no such file,
// permission denied), a refused host key or login, a changed file, a
// closed reader or pool and a cancelled context are answers, not accidents.
func Reconnectable(err error) bool {
	var cl *connLostError
	return errors.As(err, &cl) || errors.Is(err, ErrUnreachable)
}

// laneFile is what a Reader reads on one lane: a *handle, or a fake in tests.
type laneFile interface {
	io.ReaderAt
	io.Closer
	Size() int64
	ModTime() time.Time
}

// Reader is a remote file read over one or more SSH connections that
// survives lost connections: a read that loses its connection reopens the
// file on a fresh one (refusing a file whose size or modification time
// changed, ErrFileChanged) and is tried again, as ReadOptions.Reconnect
// allows. Reconnects of one lane do not hold up reads on the others.
// ReadAt is safe for concurrent use; Reader satisfies File.
type Reader struct {
	pool   *Pool
	host   Host
	name   string
	ctx    context.Context // bounds reconnects: the one OpenReader got
	policy retry.Policy
	onRead func(n int64)
	size   int64
	mtime  time.Time
	read   atomic.Int64
	next   atomic.Uint32 // the lane of the next read

	mu         sync.Mutex
	files      []laneFile            // one per lane; nil after Close
	gens       []int                 // per lane, bumped on each reopen
	reopening  map[int]chan struct{} // lanes being reopened; closed when done
	reconnects int                   // reopens begun, all lanes together
	broken     error                 // a reopen got a definite refusal

	// openLane opens the file on a lane for a reconnect (tests replace it).
	openLane func(ctx context.Context, lane int) (laneFile, error)
}

// Open opens name on h for reading over one connection. If the connection
// drops, reads reconnect and reopen the file (see Reader), provided its
// size and modification time have not changed meanwhile; ctx bounds those
// reconnects for as long as the file is open.
func (p *Pool) Open(ctx context.Context, h Host, name string) (File, error) {
	return p.OpenReader(ctx, h, name, ReadOptions{})
}

// OpenReader opens name on h for reading over opts.Lanes connections. ctx
// bounds the open and every later reconnect.
func (p *Pool) OpenReader(ctx context.Context, h Host, name string, opts ReadOptions) (*Reader, error) {
	r := &Reader{pool: p, host: h, name: name, ctx: ctx, policy: opts.Reconnect, onRead: opts.OnRead}
	if r.policy.Attempts == 0 {
		r.policy = DefaultReconnect()
	}
	r.openLane = r.openChecked
	first, err := p.openHandle(ctx, r.laneHost(0), name)
	if err != nil {
		return nil, err
	}
	r.files, r.gens, r.size, r.mtime = []laneFile{first}, []int{0}, first.size, first.mtime
	for lane := 1; lane < opts.Lanes; lane++ {
		// A lane that cannot open (the host limits connections, say) only
		// costs parallelism: read over the lanes that did.
		f, err := r.openChecked(ctx, lane)
		if cerr := ctx.Err(); cerr != nil || errors.Is(err, ErrFileChanged) {
			if f != nil {
				_ = f.Close()
			}
			_ = r.Close()
			if err == nil {
				err = cerr
			}
			return nil, err
		}
		if err != nil {
			p.log.Warn("sshfs: reading over fewer connections", "addr", h.Addr, "path", name, "lanes", lane, "err", err)
			if opts.LaneRefused != nil {
				opts.LaneRefused(lane, err)
			}
			break
		}
		r.files, r.gens = append(r.files, f), append(r.gens, 0)
	}
	return r, nil
}

func (r *Reader) laneHost(lane int) Host {
	h := r.host
	h.Lane += lane
	return h
}

// openChecked opens the file on lane's connection, refusing a file that is
// not the one the other lanes read (its size or mtime changed).
func (r *Reader) openChecked(ctx context.Context, lane int) (laneFile, error) {
	f, err := r.pool.openHandle(ctx, r.laneHost(lane), r.name)
	if err != nil {
		return nil, err
	}
	if f.size != r.size || !f.mtime.Equal(r.mtime) {
		_ = f.Close()
		return nil, fmt.Errorf("%s:%s: %w (size %d→%d); not reading a mix of both", r.host.Addr, r.name, ErrFileChanged, r.size, f.size)
	}
	return f, nil
}

// Size is the file's size when it was opened.
func (r *Reader) Size() int64 { return r.size }

// ModTime is the file's modification time when it was opened.
func (r *Reader) ModTime() time.Time { return r.mtime }

// BytesRead is every byte received so far, retried reads included.
func (r *Reader) BytesRead() int64 { return r.read.Load() }

// Lanes is how many connections the reads are spread over (0 after Close).
func (r *Reader) Lanes() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.files)
}

// Close closes the file on every lane.
func (r *Reader) Close() error {
	r.mu.Lock()
	files := r.files
	r.files = nil
	r.mu.Unlock()
	var err error
	for _, f := range files {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	return err
}

// ReadAt reads len(p) bytes at off, or says why it could not: io.EOF at
// the end of the file, io.ErrUnexpectedEOF for a short answer inside it.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	// The handle already reads on after a short answer inside the file;
	// this loop keeps Reader a strict io.ReaderAt over any lane file.
	var done int
	for {
		n, err := r.readAt(p[done:], off+int64(done))
		done += n
		if n == 0 || done == len(p) || err != io.EOF || off+int64(done) >= r.size {
			if done < len(p) && err == nil { // io.ReaderAt: a short read says why
				err = io.ErrUnexpectedEOF
				if off+int64(done) >= r.size {
					err = io.EOF
				}
			}
			return done, err
		}
	}
}

// readAt reads p at off over the next lane; a read whose connection is
// lost reopens that lane (unless another read did already) and is tried
// again, over the next lane, as the policy allows. The bytes a failed try
// read are read again (and counted again).
func (r *Reader) readAt(p []byte, off int64) (int, error) {
	var n int
	var readErr error
	failed, failedGen := -1, 0
	policy := r.policy
	policy.Retryable = Reconnectable
	policy.OnRetry = func(attempt int, err error, wait time.Duration) {
		r.pool.log.Warn("sshfs: connection lost while reading, reconnecting", "addr", r.host.Addr, "path", r.name, "attempt", attempt+1, "wait", wait, "err", err)
	}
	err := policy.Do(r.ctx, func(ctx context.Context, _ int) error {
		if failed >= 0 {
			if err := r.reopen(ctx, failed, failedGen); err != nil {
				return err
			}
			failed = -1
		}
		lane, f, gen, err := r.pick()
		if err != nil {
			return err
		}
		n, readErr = f.ReadAt(p, off)
		r.count(n)
		if readErr == nil || n == len(p) || !Reconnectable(readErr) {
			return nil // done, or an answer (io.EOF is one) for the caller
		}
		failed, failedGen = lane, gen
		return readErr
	})
	switch {
	case err == nil:
		return n, readErr
	case r.ctx.Err() != nil && !errors.Is(err, r.ctx.Err()):
		return n, fmt.Errorf("sshfs: %s:%s: reconnect after %w: %w", r.host.Addr, r.name, err, r.ctx.Err())
	case Reconnectable(err):
		return n, fmt.Errorf("sshfs: %s:%s: giving up after %d tries: %w", r.host.Addr, r.name, max(policy.Attempts, 1), err)
	}
	return n, err
}

// pick returns the next lane's file and its generation.
func (r *Reader) pick() (int, laneFile, int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.files == nil {
		return 0, nil, 0, os.ErrClosed
	}
	if r.broken != nil {
		return 0, nil, 0, r.broken
	}
	lane := int(r.next.Add(1) % uint32(len(r.files)))
	return lane, r.files[lane], r.gens[lane], nil
}

func (r *Reader) count(n int) {
	if n <= 0 {
		return
	}
	r.read.Add(int64(n))
	if r.onRead != nil {
		r.onRead(int64(n))
	}
}

// reopen replaces lane's file of generation gen with one on a fresh
// connection; if another read already did, it does nothing, and while one
// reopen of a lane runs, other reads of that lane wait for it. The lock is
// not held meanwhile, so reads on the other lanes go on.
func (r *Reader) reopen(ctx context.Context, lane, gen int) error {
	r.mu.Lock()
	for {
		switch {
		case r.files == nil:
			r.mu.Unlock()
			return os.ErrClosed
		case r.broken != nil:
			r.mu.Unlock()
			return r.broken
		case r.gens[lane] != gen:
			r.mu.Unlock()
			return nil // another read already reopened
		}
		busy := r.reopening[lane]
		if busy == nil {
			break
		}
		r.mu.Unlock()
		select {
		case <-busy:
		case <-ctx.Done():
			return ctx.Err()
		}
		r.mu.Lock()
	}
	r.reconnects++
	done := make(chan struct{})
	if r.reopening == nil {
		r.reopening = map[int]chan struct{}{}
	}
	r.reopening[lane] = done
	old := r.files[lane]
	r.mu.Unlock()

	discard(old)
	octx, cancel := context.WithTimeout(ctx, 2*r.pool.opts.DialTimeout)
	f, err := r.openLane(octx, lane)
	cancel()

	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.reopening, lane)
	close(done)
	switch {
	case err != nil:
		if !Reconnectable(err) && ctx.Err() == nil {
			r.broken = err // every later read would get the same answer
		}
		return fmt.Errorf("reconnect: %w", err)
	case r.files == nil: // closed meanwhile
		_ = f.Close()
		return os.ErrClosed
	}
	r.files[lane] = f
	r.gens[lane]++
	return nil
}

// discard gives up a lane file whose connection was lost.
func discard(f laneFile) {
	if d, ok := f.(interface{ discard() }); ok {
		d.discard()
		return
	}
	_ = f.Close()
}

package uploads

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"imagestore/agent/jobs"
)

// Upload sessions (imgurl upload://...): an import job waits in Receive
// for the host CLI to stream the image in chunks (Put) of at most
// MaxChunk bytes, each naming the import's taskuuid and the offset it
// starts at (the bytes received so far); the last one says it completes
// the upload. A chunk at the wrong offset is refused with the offset to
// resume from, so a cut upload continues where it stopped.

// Sink receives an upload's bytes.
type Sink interface {
	io.Writer
	// Offset is how many bytes the sink holds: where the next chunk starts.
	Offset() int64
	// Fatal reports whether a write error ends the upload (e.g. a size
	// cap); other errors fail only the chunk, which the client may resend.
	Fatal(err error) bool
}

// Errors of Put that a caller answers differently (wrapped with the detail).
var (
	// ErrNoUpload: no session waits for the taskuuid, or it is over.
	ErrNoUpload = errors.New("no such upload")
	// ErrChunkConflict: another chunk is being received, or the chunk
	// does not start at the session's offset (the result says where to resume).
	ErrChunkConflict = errors.New("upload chunk conflict")
	// ErrBadChunk: the chunk request is malformed.
	ErrBadChunk = errors.New("bad upload chunk")
)

// chunkError keeps the protocol's message while matching a sentinel.
type chunkError struct {
	kind error
	msg  string
}

func (e *chunkError) Error() string { return e.msg }
func (e *chunkError) Unwrap() error { return e.kind }

func chunkErr(kind error, format string, args ...any) error {
	return &chunkError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// session is an upload import waiting for chunks.
type session struct {
	mu   sync.Mutex
	sink Sink
	p    jobs.Progress
	err  error
	last time.Time
	done chan struct{} // closed on completion or failure
	over bool
	// busy marks a chunk being copied. The copy runs without mu so a stalled
	// client cannot block the idle check or the job's end; copying lets the
	// job's end wait for an in-flight copy before the sink goes away.
	busy    bool
	copying sync.WaitGroup
	// ended is set (before the active chunk's read deadline is forced to
	// now) when the job stops waiting, so an in-flight copy ends at once.
	ended       atomic.Bool
	setDeadline func(time.Time) error // of the chunk being copied, under mu
}

// end stops the session: no new chunk starts and the one being copied is
// cut off, so cancel and shutdown never wait on a stalled client.
func (s *session) end() {
	s.ended.Store(true)
	s.mu.Lock()
	s.over = true
	set := s.setDeadline
	s.mu.Unlock()
	if set != nil {
		_ = set(time.Now())
	}
}

// finish ends the session with err (nil: complete); under mu.
func (s *session) finish(err error) {
	s.err = err
	close(s.done)
	s.over = true
}

// Receive registers an upload session for taskuuid id and waits until a
// chunk completes it, a fatal sink error ends it, no chunk arrives for
// Options.Idle, or ctx ends. Every byte received goes to sink and counts
// as progress. When Receive returns, no chunk is writing to sink.
func (u *Uploads) Receive(ctx context.Context, id string, sink Sink, p jobs.Progress) error {
	s := &session{sink: sink, p: p, last: time.Now(), done: make(chan struct{})}
	u.mu.Lock()
	u.sessions[id] = s
	u.mu.Unlock()
	defer func() {
		u.mu.Lock()
		if u.sessions[id] == s {
			delete(u.sessions, id)
		}
		u.mu.Unlock()
		s.end()
		s.copying.Wait()
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			s.mu.Lock()
			defer s.mu.Unlock()
			return s.err
		case <-tick.C:
			s.mu.Lock()
			idle := time.Since(s.last)
			s.mu.Unlock()
			if idle > u.opts.Idle {
				return fmt.Errorf("upload idle for %v: no data from the host", idle.Round(time.Second))
			}
		}
	}
}

// Chunk is one piece of an upload.
type Chunk struct {
	ID string // the import's taskuuid
	// Offset is where the chunk starts, as the client sent it ("" = not
	// sent, allowed only for an empty chunk).
	Offset   string
	Length   int64 // the body's announced length (-1 unknown)
	Complete bool  // the last chunk
	// Total is the whole upload's size when the client says it (0 =
	// unknown); it becomes the job's progress total.
	Total int64
	Body  io.Reader
	// SetReadDeadline bounds the next read of Body (the connection's read
	// deadline): each read slides it by ChunkReadIdle, and ending the
	// session forces it to now. nil: reads are not bounded.
	SetReadDeadline func(time.Time) error
}

// ChunkResult is the session's state after a chunk.
type ChunkResult struct {
	Offset   int64 // bytes received: where the next chunk starts
	MaxChunk int64
	Complete bool
}

// session returns the session waiting for id, if any.
func (u *Uploads) session(id string) (*session, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	s, ok := u.sessions[id]
	return s, ok
}

// Receiving reports whether an upload session waits for id, and whether
// a chunk of it is being copied right now.
func (u *Uploads) Receiving(id string) (waiting, busy bool) {
	s, ok := u.session(id)
	if !ok {
		return false, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return true, s.busy
}

// Put copies a chunk into the session waiting for c.ID. Errors wrapping
// ErrNoUpload or ErrBadChunk come with a zero result; every other error
// (ErrChunkConflict included) comes with the session's state.
func (u *Uploads) Put(ctx context.Context, c Chunk) (ChunkResult, error) {
	s, ok := u.session(c.ID)
	if c.ID == "" || !ok {
		return ChunkResult{}, chunkErr(ErrNoUpload, "no upload import waiting for taskuuid %q", c.ID)
	}
	s.mu.Lock()
	if s.over {
		s.mu.Unlock()
		return ChunkResult{}, chunkErr(ErrNoUpload, "upload %s is over", c.ID)
	}
	cur := s.sink.Offset()
	res := ChunkResult{Offset: cur, MaxChunk: u.opts.MaxChunk}
	if s.busy {
		s.mu.Unlock()
		return res, chunkErr(ErrChunkConflict, "upload %s: another chunk is being received", c.ID)
	}
	if c.Offset != "" {
		off, err := strconv.ParseInt(c.Offset, 10, 64)
		if err != nil || off != cur {
			s.mu.Unlock()
			return res, chunkErr(ErrChunkConflict, "Upload-Offset %q: resume from offset %d", c.Offset, cur)
		}
	} else if c.Length != 0 {
		s.mu.Unlock()
		return ChunkResult{}, chunkErr(ErrBadChunk, "missing header Upload-Offset")
	}
	if c.SetReadDeadline == nil {
		c.SetReadDeadline = func(time.Time) error { return nil }
	}
	s.last = time.Now()
	s.busy = true
	s.setDeadline = c.SetReadDeadline
	if c.Total > 0 {
		s.p.SetTotal(c.Total)
	}
	s.copying.Add(1)
	s.mu.Unlock()

	n, err := io.Copy(s.sink, chunkBody{ctx: ctx, r: c.Body, set: c.SetReadDeadline, idle: u.opts.ChunkReadIdle, s: s})
	_ = c.SetReadDeadline(time.Time{})

	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.copying.Done()
	s.busy = false
	s.setDeadline = nil
	s.last = time.Now()
	s.p.Add(n)
	res.Offset = s.sink.Offset()
	if err != nil {
		if s.sink.Fatal(err) && !s.over {
			s.finish(err)
		}
		return res, err
	}
	if s.over {
		return res, fmt.Errorf("upload %s ended while this chunk was received", c.ID)
	}
	if c.Complete {
		res.Complete = true
		s.finish(nil)
	}
	return res, nil
}

// chunkBody reads a chunk, sliding the connection's read deadline on each
// read so only an idle body times out, and stopping once the session (or
// the request) ended.
type chunkBody struct {
	ctx  context.Context
	r    io.Reader
	set  func(time.Time) error
	idle time.Duration
	s    *session
}

func (b chunkBody) Read(p []byte) (int, error) {
	_ = b.set(time.Now().Add(b.idle))
	// Checked after setting the deadline: end() stores ended before it
	// forces the deadline, so one of the two always stops this read.
	if b.s.ended.Load() {
		return 0, errors.New("upload ended")
	}
	if err := b.ctx.Err(); err != nil {
		return 0, err
	}
	return b.r.Read(p)
}

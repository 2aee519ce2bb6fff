package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"imagestore/blobstore"

	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/opencontainers/go-digest"
)

// Sequential reads (blobstore.RangeReader): a long range is one streaming
// GET; shorter ones (a client pulling a blob by 1 MiB ranges, a few at a
// time, each its own registry request) are served from readahead chunks.
// Once a blob's reads look sequential, one streaming GET per blob (a
// readahead stream) reads its chunks in order, staying raDepth chunks
// ahead of the furthest chunk asked for and pausing there, so a 1 GiB
// pull costs a few GETs, not one per chunk: every request costs a loaded
// RGW CPU time whatever its size. A chunk no stream brings is fetched by
// its reader with one ranged GET. The chunks live in their own small LRU
// so they never evict the read cache's small random reads (qcow2
// metadata, instant restore); what is held or being read is capped: raCap
// held, plus one chunk being read per stream and per reader's own fetch.
const (
	streamMin = 16 << 20 // ranges of this or more: one streaming GET
	raChunk   = 4 << 20
	raDepth   = 4 // chunks a stream reads ahead of the furthest one asked for
	raStreams = 4 // readahead streams at once, across all blobs
	raLoads   = 4 // readers' own chunk fetches in flight
	raCap     = 8 * raChunk
	// raFree is how many released chunk buffers are kept for reuse: a
	// sequential read frees about one as each new chunk comes (the
	// oldest read one is evicted), so a few cover several streams.
	raFree = 4
	// raIdle ends a readahead stream nobody asked anything of for this
	// long (its reader went away, or jumped elsewhere).
	raIdle = 10 * time.Second
	// streamRetries is how often a broken streaming GET is reopened where
	// it stopped before the read fails.
	streamRetries = 3
)

// errStreamEnded fails the chunks a readahead stream had promised when it
// ends without them (idle, replaced, closed); their readers fetch them.
var errStreamEnded = errors.New("s3store: readahead stream ended")

// readahead is the Backend's state for sequential reads.
type readahead struct {
	chunks *chunkCache
	bufs   *bufPool // the chunks' buffers
	loads  chan struct{}

	mu      sync.Mutex
	streams map[blobID]*raStream
	opened  int64 // streams started (tests)
	closed  bool
}

// blobID is one version of a blob (cached chunks are per version).
type blobID struct {
	d    digest.Digest
	etag string
}

func newReadahead() *readahead {
	return &readahead{
		chunks:  newChunkCache(raCap),
		bufs:    newBufPool(raChunk, raFree),
		loads:   make(chan struct{}, raLoads),
		streams: map[blobID]*raStream{},
	}
}

// halt ends the streams of blob d (every blob if d is "") and waits for
// them; with closing, no stream starts after it.
func (ra *readahead) halt(d digest.Digest, closing bool) {
	ra.mu.Lock()
	ra.closed = ra.closed || closing
	var ss []*raStream
	for id, s := range ra.streams {
		if d == "" || id.d == d {
			s.done = true
			delete(ra.streams, id)
			ss = append(ss, s)
		}
	}
	ra.mu.Unlock()
	for _, s := range ss {
		s.cancel()
		<-s.ended
	}
}

// forget drops blob d (deleted or quarantined): its streams end, its
// chunks go.
func (ra *readahead) forget(d digest.Digest) {
	ra.halt(d, false)
	ra.chunks.drop(d)
}

// streamStats reports how many readahead streams were started and how
// many run now.
func (ra *readahead) streamStats() (opened int64, running int) {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	return ra.opened, len(ra.streams)
}

var _ blobstore.RangeReader = (*blob)(nil)

// ReadRange returns the n bytes at off (clamped to the blob) as a stream:
// one GET for a long range, readahead chunks for a shorter one. The bytes
// are the stored object's; nothing here is served from the read cache.
func (o *blob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("s3store: range %d+%d", off, n)
	}
	if err := o.ctx.Err(); err != nil {
		return nil, fmt.Errorf("s3store: read of closed blob %s: %w", o.d, err)
	}
	end := min(off+n, o.size)
	off = min(off, end)
	if end-off >= streamMin {
		return &rangeStream{b: o.b, ctx: ctx, key: o.key, pos: off, end: end}, nil
	}
	return &raReader{o: o, ctx: ctx, pos: off, end: end}, nil
}

// rangeStream reads [pos, end) of key with one GET, reopened where it
// stopped if the connection breaks.
type rangeStream struct {
	b        *Backend
	ctx      context.Context
	key      string
	pos, end int64
	body     io.ReadCloser
	fails    int
}

func (s *rangeStream) Read(p []byte) (int, error) {
	if s.pos >= s.end {
		return 0, io.EOF
	}
	if int64(len(p)) > s.end-s.pos {
		p = p[:s.end-s.pos]
	}
	for {
		if s.body == nil {
			body, err := s.b.openRange(s.ctx, s.key, s.pos, s.end)
			if err != nil {
				return 0, err
			}
			s.body = body
		}
		n, err := s.body.Read(p)
		s.pos += int64(n)
		if n > 0 {
			return n, nil
		}
		if err == nil {
			continue
		}
		s.body.Close()
		s.body = nil
		if err == io.EOF {
			return 0, fmt.Errorf("s3store: %s: object ends at %d, before %d: %w", s.key, s.pos, s.end, io.ErrUnexpectedEOF)
		}
		if s.ctx.Err() != nil || s.fails >= streamRetries {
			return 0, fmt.Errorf("s3store: read %s at %d: %w", s.key, s.pos, err)
		}
		s.fails++
		s.b.log.Warn("s3 stream broke, reopening", "key", s.key, "at", s.pos, "err", err)
	}
}

func (s *rangeStream) Close() error {
	if s.body != nil {
		s.body.Close()
		s.body = nil
	}
	return nil
}

// openRange opens a GET of [off, end) of key (retried until it answers).
// The body runs under a stall guard: a Read that waits ReadStall for a
// byte fails (errStalled), and so does a response that takes that long.
func (b *Backend) openRange(ctx context.Context, key string, off, end int64) (io.ReadCloser, error) {
	rng := fmt.Sprintf("bytes=%d-%d", off, end-1)
	var body io.ReadCloser
	err := b.do(ctx, func(ctx context.Context) error {
		g := newStallGuard(ctx, b.opts.ReadStall)
		out, err := b.cli.GetObject(g.ctx, &s3.GetObjectInput{Bucket: &b.bucket, Key: &key, Range: &rng})
		if err != nil {
			g.stop()
			return g.err(err)
		}
		g.timer.Stop() // armed again by each Read
		body = &guardedBody{r: g.reader(out.Body), c: out.Body, g: g}
		return nil
	})
	if err != nil {
		if isNotFound(err) {
			return nil, b.gone(key)
		}
		return nil, fmt.Errorf("s3store: read %s %s: %w", key, rng, err)
	}
	return body, nil
}

// guardedBody is a GET's body read under its stall guard.
type guardedBody struct {
	r io.Reader
	c io.Closer
	g *stallGuard
}

func (b *guardedBody) Read(p []byte) (int, error) { return b.r.Read(p) }

func (b *guardedBody) Close() error {
	err := b.c.Close()
	b.g.stop()
	return err
}

// raReader reads [pos, end) of a blob from readahead chunks.
type raReader struct {
	o        *blob
	ctx      context.Context
	pos, end int64
}

func (r *raReader) Read(p []byte) (int, error) {
	if r.pos >= r.end {
		return 0, io.EOF
	}
	if int64(len(p)) > r.end-r.pos {
		p = p[:r.end-r.pos]
	}
	idx := r.pos / raChunk
	c, err := r.o.raChunk(r.ctx, idx)
	if err != nil {
		return 0, err
	}
	n := copy(p, c.b[r.pos-idx*raChunk:])
	c.release()
	r.pos += int64(n)
	return n, nil
}

// WriteTo writes the rest of the range to w straight from the chunks,
// one Write per chunk it spans, with no copy into a buffer of the
// caller's (io.Copy's, the registry's response copy).
func (r *raReader) WriteTo(w io.Writer) (int64, error) {
	var done int64
	for r.pos < r.end {
		idx := r.pos / raChunk
		c, err := r.o.raChunk(r.ctx, idx)
		if err != nil {
			return done, err
		}
		p := c.b[r.pos-idx*raChunk:]
		if int64(len(p)) > r.end-r.pos {
			p = p[:r.end-r.pos]
		}
		// The Writer must not keep p (io.Writer's contract): the
		// buffer may be reused once released.
		n, err := w.Write(p)
		c.release()
		r.pos += int64(n)
		done += int64(n)
		if err != nil {
			return done, err
		}
		if n < len(p) {
			return done, io.ErrShortWrite
		}
	}
	return done, nil
}

func (r *raReader) Close() error { return nil }

// raChunk returns readahead chunk idx: from the LRU, from the blob's
// readahead stream (started or moved ahead by this read), or fetched by
// this reader with one ranged GET. The caller releases it.
func (o *blob) raChunk(ctx context.Context, idx int64) (*chunkBuf, error) {
	ra := o.b.ra
	ra.follow(o, idx)
	load := func() (*chunkBuf, error) {
		select {
		case ra.loads <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		defer func() { <-ra.loads }()
		return o.fetchChunk(ctx, idx)
	}
	data, err := ra.chunks.get(ctx, o.raKey(idx), load)
	if err != nil && ctx.Err() == nil && !errors.Is(err, blobstore.ErrNotFound) {
		// Perhaps a stream's chunk this read had waited for, and the
		// stream broke or ended: a failed fetch is not kept, so this
		// one is our own.
		data, err = ra.chunks.get(ctx, o.raKey(idx), load)
	}
	return data, err
}

func (o *blob) raKey(idx int64) chunkKey { return chunkKey{o.d, o.etag, idx} }

func (o *blob) fetchChunk(ctx context.Context, idx int64) (*chunkBuf, error) {
	start := idx * raChunk
	c := o.b.ra.bufs.get(int(min(raChunk, o.size-start)))
	k, err := o.b.getRange(ctx, o.key, start, c.b)
	if err == nil && k != len(c.b) {
		err = fmt.Errorf("s3store: %s: short read %d of %d at %d", o.key, k, len(c.b), start)
	}
	if err != nil {
		c.release()
		return nil, err
	}
	return c, nil
}

// follow keeps blob o's readahead stream raDepth chunks ahead of a read
// of chunk idx: it moves the stream's goal on, or, when the reads look
// sequential (idx is the first chunk, or the one before it is held or
// coming) and no stream serves them, starts one at the first chunk from
// idx that is neither held nor being fetched.
func (ra *readahead) follow(o *blob, idx int64) {
	last := (o.size - 1) / raChunk
	upto := min(idx+raDepth, last)
	id := blobID{o.d, o.etag}
	ra.mu.Lock()
	defer ra.mu.Unlock()
	if ra.closed {
		return
	}
	s := ra.streams[id]
	if s != nil && !s.done && idx <= s.want+raDepth {
		s.extendLocked(upto)
		return
	}
	if idx > 0 && !ra.chunks.has(o.raKey(idx-1)) {
		return // not sequential (yet)
	}
	if s != nil {
		// The reader jumped past what the stream would bring.
		s.done = true
		delete(ra.streams, id)
		s.cancel()
	}
	if len(ra.streams) >= raStreams {
		return
	}
	start := idx
	for start <= upto && ra.chunks.has(o.raKey(start)) {
		start++
	}
	if start > upto {
		return
	}
	ctx, cancel := context.WithCancel(context.WithoutCancel(o.ctx))
	s = &raStream{
		ra: ra, b: o.b, id: id, key: o.key, size: o.size, ctx: ctx, cancel: cancel,
		next: start, want: start - 1, fills: map[int64]*fill{}, wake: make(chan struct{}, 1), ended: make(chan struct{}),
	}
	ra.streams[id] = s
	ra.opened++
	s.extendLocked(upto)
	go s.run()
}

// raStream is one streaming GET of a blob from chunk next on, cut into
// readahead chunks.
type raStream struct {
	ra     *readahead
	b      *Backend
	id     blobID
	key    string
	size   int64
	ctx    context.Context
	cancel context.CancelFunc
	wake   chan struct{} // want moved on
	ended  chan struct{} // closed when run returns

	// guarded by ra.mu
	next  int64           // the chunk the body delivers next
	want  int64           // the last chunk to read before pausing
	fills map[int64]*fill // chunks in [next, want] readers can wait for
	done  bool
}

// extendLocked moves the stream's goal to chunk upto, promising the
// chunks on the way that are neither held nor being fetched. ra.mu held.
func (s *raStream) extendLocked(upto int64) {
	if upto <= s.want {
		return
	}
	for j := s.want + 1; j <= upto; j++ {
		if f := s.ra.chunks.reserve(chunkKey{s.id.d, s.id.etag, j}); f != nil {
			s.fills[j] = f
		}
	}
	s.want = upto
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *raStream) run() {
	defer close(s.ended)
	err := s.read()
	s.cancel()
	ra := s.ra
	ra.mu.Lock()
	s.done = true
	if ra.streams[s.id] == s {
		delete(ra.streams, s.id)
	}
	fills := s.fills
	s.fills = nil
	ra.mu.Unlock()
	if err == nil {
		err = errStreamEnded
	}
	for j, f := range fills {
		ra.chunks.complete(chunkKey{s.id.d, s.id.etag, j}, f, nil, err, false)
	}
	ra.chunks.settle(s.id.d, s.id.etag)
}

// read reads chunks in order while there is a goal ahead, pausing (body
// open, unread) until one comes or raIdle passes. A broken body ends the
// stream: the chunks it promised are fetched by their readers.
func (s *raStream) read() error {
	ra := s.ra
	ra.mu.Lock()
	first := s.next
	ra.mu.Unlock()
	body, err := s.b.openRange(s.ctx, s.key, first*raChunk, s.size)
	if err != nil {
		return err
	}
	defer body.Close()
	idle := time.NewTimer(raIdle)
	defer idle.Stop()
	for {
		ra.mu.Lock()
		idx, ready, done := s.next, s.next <= s.want, s.done
		ra.mu.Unlock()
		if done {
			return nil
		}
		if !ready {
			idle.Reset(raIdle)
			select {
			case <-s.wake:
				continue
			case <-idle.C:
				return nil
			case <-s.ctx.Done():
				return nil
			}
		}
		buf := ra.bufs.get(int(min(raChunk, s.size-idx*raChunk)))
		if _, err := io.ReadFull(body, buf.b); err != nil {
			buf.release()
			if s.ctx.Err() == nil {
				s.b.log.Debug("s3 readahead stream broke", "key", s.key, "chunk", idx, "err", err)
			}
			return fmt.Errorf("s3store: readahead %s chunk %d: %w", s.key, idx, err)
		}
		ra.mu.Lock()
		f := s.fills[idx]
		delete(s.fills, idx)
		s.next++
		ra.mu.Unlock()
		if f != nil {
			ra.chunks.complete(chunkKey{s.id.d, s.id.etag, idx}, f, buf, nil, true)
		} // else a reader held or fetched it meanwhile: these bytes are not needed
		buf.release()
		if (idx+1)*raChunk >= s.size {
			return nil
		}
	}
}

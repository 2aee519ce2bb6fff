package s3store

import (
	"context"
	"fmt"
	"io"
	"time"

	"imagestore/blobstore"

	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// Sequential reads (blobstore.RangeReader): a long range is one streaming
// GET; a shorter one (a client pulling a blob by 1 MiB ranges, a few at a
// time) is served from readahead chunks, larger than the client's ranges,
// fetched ahead in parallel once the reads look sequential. The readahead
// chunks live in their own small LRU so they never evict the read cache's
// small random reads (qcow2 metadata, instant restore), and the bytes in
// flight are capped: at most raLoads chunks fetched for readers and
// raPrefetch ahead of them, plus raCap held.
const (
	streamMin  = 16 << 20 // ranges of this or more: one streaming GET
	raChunk    = 4 << 20
	raDepth    = 4 // chunks fetched ahead of a sequential reader
	raPrefetch = 4 // prefetches in flight, across all blobs
	raLoads    = 4 // readers' own chunk fetches in flight
	raCap      = 8 * raChunk
	// raTimeout bounds a prefetch, which outlives the request that started it.
	raTimeout = time.Minute
	// streamRetries is how often a broken streaming GET is reopened where
	// it stopped before the read fails.
	streamRetries = 3
)

// readahead is the Backend's state for sequential reads.
type readahead struct {
	chunks   *chunkCache
	prefetch chan struct{}
	loads    chan struct{}
}

func newReadahead() *readahead {
	return &readahead{
		chunks:   newChunkCache(raCap),
		prefetch: make(chan struct{}, raPrefetch),
		loads:    make(chan struct{}, raLoads),
	}
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
func (b *Backend) openRange(ctx context.Context, key string, off, end int64) (io.ReadCloser, error) {
	rng := fmt.Sprintf("bytes=%d-%d", off, end-1)
	var body io.ReadCloser
	err := b.do(ctx, func(ctx context.Context) error {
		out, err := b.cli.GetObject(ctx, &s3.GetObjectInput{Bucket: &b.bucket, Key: &key, Range: &rng})
		if err != nil {
			return err
		}
		body = out.Body
		return nil
	})
	if err != nil {
		if isNotFound(err) {
			return nil, fmt.Errorf("%w: %s", blobstore.ErrNotFound, key)
		}
		return nil, fmt.Errorf("s3store: read %s %s: %w", key, rng, err)
	}
	return body, nil
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
	data, err := r.o.raChunk(r.ctx, idx)
	if err != nil {
		return 0, err
	}
	n := copy(p, data[r.pos-idx*raChunk:])
	r.pos += int64(n)
	return n, nil
}

func (r *raReader) Close() error { return nil }

// raChunk returns readahead chunk idx, fetching it if needed; when the
// chunk before it was read too (or it is the first), the next raDepth
// chunks are fetched ahead in the background.
func (o *blob) raChunk(ctx context.Context, idx int64) ([]byte, error) {
	ra := o.b.ra
	if idx == 0 || ra.chunks.has(o.raKey(idx-1)) {
		for j := idx + 1; j <= idx+raDepth && j*raChunk < o.size; j++ {
			o.prefetch(j)
		}
	}
	load := func() ([]byte, error) {
		select {
		case ra.loads <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		defer func() { <-ra.loads }()
		return o.fetchChunk(ctx, idx)
	}
	data, err := ra.chunks.get(o.raKey(idx), load)
	if err != nil && ctx.Err() == nil {
		// Perhaps a failed prefetch this read had joined: a failed fetch
		// is not kept, so this one is our own.
		data, err = ra.chunks.get(o.raKey(idx), load)
	}
	return data, err
}

// prefetch fetches chunk idx in the background unless it is held or being
// fetched, or raPrefetch fetches are already in flight.
func (o *blob) prefetch(idx int64) {
	ra := o.b.ra
	k := o.raKey(idx)
	if ra.chunks.has(k) {
		return
	}
	select {
	case ra.prefetch <- struct{}{}:
	default:
		return
	}
	go func() {
		defer func() { <-ra.prefetch }()
		ctx, cancel := context.WithTimeout(context.WithoutCancel(o.ctx), raTimeout)
		defer cancel()
		_, err := ra.chunks.get(k, func() ([]byte, error) { return o.fetchChunk(ctx, idx) })
		if err != nil {
			o.b.log.Debug("s3 readahead failed", "key", o.key, "chunk", idx, "err", err)
		}
	}()
}

func (o *blob) raKey(idx int64) chunkKey { return chunkKey{o.d, o.etag, idx} }

func (o *blob) fetchChunk(ctx context.Context, idx int64) ([]byte, error) {
	start := idx * raChunk
	buf := make([]byte, min(raChunk, o.size-start))
	k, err := o.b.getRange(ctx, o.key, start, buf)
	if err != nil {
		return nil, err
	}
	if k != len(buf) {
		return nil, fmt.Errorf("s3store: %s: short read %d of %d at %d", o.key, k, len(buf), start)
	}
	return buf, nil
}

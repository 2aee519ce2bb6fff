package oci

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"sync"

	"github.com/opencontainers/go-digest"

	"imagestore/internal/retry"
)

// Producer writes a blob's bytes to w and returns how many it wrote. It
// must write the same bytes every time it is called (a deterministic
// encoder over a source that does not change): PushProduced calls it again
// after a cut and skips what the server already holds.
type Producer func(ctx context.Context, w io.Writer) (int64, error)

// ErrProducer wraps an error the Producer returned: the upload was
// cancelled and nothing was committed. Callers match it with errors.Is on
// the producer's own error (it is wrapped, not replaced).
var ErrProducer = errors.New("oci: blob producer failed")

// PushProduced uploads the blob produce writes, with its size and digest
// learnt on the way: the bytes go out as one streaming PATCH while they
// are produced (memory: a pipe, no copy of the blob), are hashed as they
// pass, and the completing PUT names the digest. After a broken connection
// a status GET learns the server's durable offset; produce runs again from
// the start, its bytes are hashed again, the first offset of them are
// dropped and the rest sent as a new PATCH. If produce fails, the upload
// is cancelled and the error (wrapped in ErrProducer) returned. If the
// bytes of a rerun differ from the first run's (the source changed), the
// server's digest check at the PUT refuses the blob.
//
// opts.ChunkSize is ignored; opts.Progress is told the bytes sent (negative
// after a resume rewinds to the server's durable offset).
func (c *Client) PushProduced(ctx context.Context, name string, produce Producer, opts StreamOptions) (digest.Digest, int64, error) {
	progress := opts.Progress
	if progress == nil {
		progress = func(int64) {}
	}
	loc, err := c.startUpload(ctx, name)
	if err != nil {
		return "", 0, err
	}
	var (
		sent, offset, size int64
		d                  digest.Digest
		tries              int
	)
	err = c.resumePolicy().Do(ctx, func(ctx context.Context, attempt int) error {
		tries++
		if attempt > 0 {
			nloc, off, serr := c.resync(ctx, name, loc)
			if serr != nil {
				return serr
			}
			loc = nloc
			progress(off - sent)
			sent, offset = off, off
		}
		var perr error
		d, size, perr = c.patchProduced(ctx, loc, produce, offset, func(n int64) { sent += n; progress(n) })
		return perr
	})
	if err != nil {
		c.cancelUpload(context.WithoutCancel(ctx), loc)
		if errors.Is(err, ErrProducer) {
			return "", size, err
		}
		return "", size, c.resumeErr(ctx, "oci: streamed upload", tries, err)
	}
	if err := c.finishUpload(ctx, loc, d); err != nil {
		return "", size, err
	}
	return d, size, nil
}

// patchProduced runs produce once, hashing everything it writes and sending
// what comes after skip as one PATCH; it returns the digest and size of
// the whole blob once the server acknowledged all of it.
func (c *Client) patchProduced(ctx context.Context, loc string, produce Producer, skip int64, progress func(int64)) (digest.Digest, int64, error) {
	u, err := c.resolve(loc)
	if err != nil {
		return "", 0, err
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pr, pw := io.Pipe()
	sw := &skipWriter{w: pw, skip: skip, h: sha256.New(), progress: progress}
	var (
		wg   sync.WaitGroup
		n    int64
		perr error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		n, perr = produce(pctx, sw)
		if perr != nil {
			pw.CloseWithError(fmt.Errorf("%w: %w", ErrProducer, perr))
			return
		}
		pw.Close()
	}()
	hdr := http.Header{"Content-Type": {"application/octet-stream"}}
	resp, err := c.do(ctx, http.MethodPatch, u, pipeBody{pr}, hdr)
	// The request is over either way: stop the producer (a Write into the
	// closed pipe fails) and wait, so its state is ours again.
	pr.CloseWithError(errBodyStopped)
	cancel()
	wg.Wait()
	// A write into a pipe the transport closed (a cut) or we closed is not
	// the producer's failure.
	if perr != nil && !errors.Is(perr, errBodyStopped) && !errors.Is(perr, io.ErrClosedPipe) && !errors.Is(perr, context.Canceled) {
		if resp != nil {
			drain(resp)
		}
		return "", n, retry.Permanent(fmt.Errorf("%w: %w", ErrProducer, perr))
	}
	if err != nil {
		return "", n, err
	}
	if err := expect(resp, http.StatusAccepted, http.StatusNoContent); err != nil {
		return "", n, err
	}
	drain(resp)
	if perr != nil {
		return "", n, perr // the server answered before the producer finished
	}
	end, err := UploadOffset(resp.Header)
	if err != nil {
		return "", n, err
	}
	if n != sw.n || end != n {
		return "", n, &Error{Method: http.MethodPatch, URL: u, Status: http.StatusRequestedRangeNotSatisfiable,
			Errors: []ErrorInfo{{Code: CodeRangeInvalid, Message: fmt.Sprintf("server holds %d of %d bytes", end, n)}}}
	}
	return digest.NewDigest(digest.SHA256, sw.h), n, nil
}

// skipWriter hashes every byte, drops the first skip of them and passes
// the rest on. A large write is hashed on a goroutine of its own while it
// is passed on (the pipe's reader sends it meanwhile), so the hash and the
// send of the same bytes overlap instead of taking turns.
type skipWriter struct {
	w        io.Writer
	skip     int64
	h        hash.Hash
	n        int64 // bytes written to the skipWriter
	progress func(int64)
}

func (s *skipWriter) Write(p []byte) (int, error) {
	s.n += int64(len(p))
	q := p
	if s.skip > 0 {
		k := min(s.skip, int64(len(q)))
		q, s.skip = q[k:], s.skip-k
	}
	if len(q) < overlapHash {
		s.h.Write(p)
	} else {
		hashed := make(chan struct{})
		go func() {
			s.h.Write(p)
			close(hashed)
		}()
		defer func() { <-hashed }() // p is the caller's again only once hashed
	}
	if len(q) == 0 {
		return len(p), nil
	}
	m, err := s.w.Write(q)
	s.progress(int64(m))
	if err != nil {
		return len(p) - len(q) + m, err
	}
	return len(p), nil
}

// overlapHash is the smallest write skipWriter hashes beside the send.
const overlapHash = 256 << 10

// pipeBody is the produced body as the HTTP transport reads it: the pipe,
// copied out in up to 1 MiB pieces (WriterTo) rather than the transport's
// 32 KiB, so each of the producer's 1 MiB writes goes out as one chunk and
// one write to the connection (and the store reads it in few reads).
type pipeBody struct{ r *io.PipeReader }

func (b pipeBody) Read(p []byte) (int, error) { return b.r.Read(p) }
func (b pipeBody) Close() error               { return b.r.Close() }

func (b pipeBody) WriteTo(w io.Writer) (int64, error) {
	buf := make([]byte, 1<<20)
	var n int64
	for {
		k, err := b.r.Read(buf)
		if k > 0 {
			m, werr := w.Write(buf[:k])
			n += int64(m)
			if werr != nil {
				return n, werr
			}
		}
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

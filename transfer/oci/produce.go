package oci

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync"

	"github.com/opencontainers/go-digest"

	"imagestore/internal/retry"
	"imagestore/transfer/crcframe"
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
// are produced (handed to the connection from the producer's own buffers,
// no copy of the blob), and the completing PUT names the blob.
//
// When the upload session offers the checked upload (ExtCRC32CFrames, our
// store), the bytes go out as crc32c frames the store checks before it
// accepts them, the PUT names the size, and the digest is the one the
// store computed from what it accepted (it answers it); the client spends
// no SHA-256 on the blob. Otherwise the bytes are hashed as they pass and
// the PUT names that digest, which the store checks (the distribution
// protocol, for any registry).
//
// After a broken connection a status GET learns the server's durable
// offset; produce runs again from the start, the first offset of its
// bytes are dropped and the rest sent as a new PATCH. Every rerun must
// write what the runs before it wrote: its CRC-32C is compared with theirs
// over the bytes they produced, and a difference (the source changed)
// cancels the upload with ErrSourceChanged, as does a failing produce
// (its error wrapped in ErrProducer). Nothing is committed then.
//
// opts.ChunkSize is ignored; opts.Progress is told the bytes sent (negative
// after a resume rewinds to the server's durable offset).
func (c *Client) PushProduced(ctx context.Context, name string, produce Producer, opts StreamOptions) (digest.Digest, int64, error) {
	progress := opts.Progress
	if progress == nil {
		progress = func(int64) {}
	}
	up, err := c.startSession(ctx, name)
	if err != nil {
		return "", 0, err
	}
	var (
		sent, offset, size int64
		d                  digest.Digest
		tries              int
		seen               []producedSum
	)
	err = c.resumePolicy().Do(ctx, func(ctx context.Context, attempt int) error {
		tries++
		if attempt > 0 {
			nup, off, serr := c.resyncSession(ctx, name, up)
			if serr != nil {
				return serr
			}
			up = nup
			progress(off - sent)
			sent, offset = off, off
		}
		var perr error
		d, size, perr = c.patchProduced(ctx, up, produce, offset, &seen, func(n int64) { sent += n; progress(n) })
		return perr
	})
	if err != nil {
		c.cancelUpload(context.WithoutCancel(ctx), up.loc)
		if errors.Is(err, ErrProducer) || errors.Is(err, ErrSourceChanged) {
			return "", size, err
		}
		return "", size, c.resumeErr(ctx, "oci: streamed upload", tries, err)
	}
	if up.checked {
		if d, err = c.finishChecked(ctx, up.loc, size); err != nil {
			return "", size, err
		}
		return d, size, nil
	}
	if err := c.finishUpload(ctx, up.loc, d); err != nil {
		return "", size, err
	}
	return d, size, nil
}

// session is an upload session: its location, and whether it offers the
// checked upload (ExtCRC32CFrames).
type session struct {
	loc     string
	checked bool
}

func (c *Client) startSession(ctx context.Context, name string) (session, error) {
	loc, hdr, err := c.startUploadHeader(ctx, name)
	if err != nil {
		return session{}, err
	}
	return session{loc: loc, checked: hasToken(hdr.Get(HeaderUploadExtensions), ExtCRC32CFrames)}, nil
}

// resyncSession is resync keeping the session's mode, or that of the new
// session the server opened when it lost the old one (a rerun starts from
// byte 0 then, so the mode may change with it).
func (c *Client) resyncSession(ctx context.Context, name string, up session) (session, int64, error) {
	off, nloc, err := c.uploadStatus(ctx, up.loc)
	if errors.Is(err, ErrNotFound) {
		nup, err := c.startSession(ctx, name)
		return nup, 0, err
	}
	if err != nil {
		return up, 0, err
	}
	up.loc = nloc
	return up, off, nil
}

// finishChecked completes a checked upload by its size: the store commits
// the bytes under the digest it computed and answers it.
func (c *Client) finishChecked(ctx context.Context, loc string, size int64) (digest.Digest, error) {
	u, err := c.resolve(loc)
	if err != nil {
		return "", err
	}
	resp, err := c.do(ctx, http.MethodPut, addQuery(u, "size", strconv.FormatInt(size, 10)), http.NoBody, nil)
	if err != nil {
		return "", err
	}
	if err := expect(resp, http.StatusCreated); err != nil {
		return "", err
	}
	drain(resp)
	d, err := digest.Parse(resp.Header.Get(HeaderContentDigest))
	if err != nil || d.Algorithm() != digest.SHA256 {
		return "", fmt.Errorf("oci: the store committed a checked upload but answered no sha256 %s (%q)", HeaderContentDigest, resp.Header.Get(HeaderContentDigest))
	}
	return d, nil
}

// producedSum is what one run of a producer wrote: how many bytes, and
// their CRC-32C. A rerun must write the same: the store may hold bytes of
// any earlier run, each below that run's n.
type producedSum struct {
	n   int64
	crc uint32
}

// patchProduced runs produce once, sending what comes after skip as one
// PATCH (crc32c frames in a checked session); it returns the size of the
// whole blob and, outside a checked session, its digest, once the server
// acknowledged all of it.
func (c *Client) patchProduced(ctx context.Context, up session, produce Producer, skip int64, seen *[]producedSum, progress func(int64)) (digest.Digest, int64, error) {
	u, err := c.resolve(up.loc)
	if err != nil {
		return "", 0, err
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	body := newHandoff()
	hdr := http.Header{"Content-Type": {"application/octet-stream"}}
	sw := &skipWriter{w: body, skip: skip, progress: progress, want: *seen}
	if up.checked {
		sw.framed = crcframe.NewWriter(body, frameSize)
		hdr.Set("Content-Encoding", crcframe.Encoding)
	} else {
		sw.h = sha256.New()
	}
	var (
		wg   sync.WaitGroup
		n    int64
		perr error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		n, perr = produce(pctx, sw)
		switch {
		case perr == nil && len(sw.want) > 0:
			perr = fmt.Errorf("%w: it wrote %d bytes, an earlier run %d", ErrSourceChanged, sw.n, sw.want[len(sw.want)-1].n)
			body.CloseWrite(perr)
		case perr != nil:
			body.CloseWrite(fmt.Errorf("%w: %w", ErrProducer, perr))
		default:
			body.CloseWrite(nil)
		}
	}()
	resp, err := c.do(ctx, http.MethodPatch, u, body, hdr)
	// The request is over either way: stop the producer (a Write into the
	// closed body fails) and wait, so its state is ours again.
	body.Close()
	cancel()
	wg.Wait()
	// Every run's sum is kept (a run whose write was cut was not checked
	// past the cut, yet the store may hold its bytes); two runs that wrote
	// as many bytes but others fail every later run.
	if run := (producedSum{n: sw.n, crc: sw.crc}); run.n > 0 && !slices.Contains(*seen, run) {
		*seen = append(*seen, run)
		slices.SortFunc(*seen, func(a, b producedSum) int { return cmp.Compare(a.n, b.n) })
	}
	if errors.Is(perr, ErrSourceChanged) {
		if resp != nil {
			drain(resp)
		}
		return "", n, retry.Permanent(perr)
	}
	// A write into a body the transport closed (a cut) or we closed is not
	// the producer's failure.
	if perr != nil && !errors.Is(perr, errBodyStopped) && !errors.Is(perr, context.Canceled) {
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
	if sw.h == nil {
		return "", n, nil
	}
	return digest.NewDigest(digest.SHA256, sw.h), n, nil
}

// frameSize is the data of one crc32c frame of a checked upload: what the
// store buffers, checks and then writes as one piece. The largest the
// encoding allows: every frame costs both ends a header of its own on the
// connection (the transport sends it as an HTTP chunk and flushes it, a
// write(2) and a wakeup of the store for 8 bytes) and the store one
// handoff to its hash and disk writes, so 4 MiB frames cost a quarter of
// what 1 MiB ones did. The qcow2 writer hands over 4 MiB chunks, which
// then go out as one frame each.
const frameSize = crcframe.MaxFrame

// skipWriter counts and checksums every byte (CRC-32C), hashes it too
// when h is set, drops the first skip of them and passes the rest on,
// framed when framed is set. The CRC-32C is the rerun check: when the
// bytes written reach an earlier run's n, their CRC-32C must be that
// run's, else Write fails with ErrSourceChanged. A framed write's
// CRC-32C comes from its frames' own, so the bytes are checksummed once.
// A large write is hashed on a goroutine of its own while it is passed
// on (the connection sends it meanwhile), so the hash and the send of the
// same bytes overlap instead of taking turns.
type skipWriter struct {
	w        io.Writer
	framed   *crcframe.Writer // nil: w takes the bytes as they are
	skip     int64
	h        hash.Hash     // nil: no digest (a checked upload)
	n        int64         // bytes written to the skipWriter
	crc      uint32        // their CRC-32C
	want     []producedSum // the earlier runs not yet checked, by n
	progress func(int64)
}

func (s *skipWriter) Write(p []byte) (int, error) {
	var done int
	for len(s.want) > 0 && s.n+int64(len(p)) >= s.want[0].n {
		k := s.want[0].n - s.n
		n, err := s.write(p[:k])
		done += n
		if err != nil {
			return done, err
		}
		if s.crc != s.want[0].crc {
			return done, fmt.Errorf("%w: its first %d bytes differ from an earlier run's (crc32c %08x, was %08x)", ErrSourceChanged, s.n, s.crc, s.want[0].crc)
		}
		s.want, p = s.want[1:], p[k:]
	}
	n, err := s.write(p)
	return done + n, err
}

// write takes p whole into the count and the CRC-32C, whatever becomes of
// sending it: they describe what the producer wrote.
func (s *skipWriter) write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.n += int64(len(p))
	q := p
	if s.skip > 0 {
		k := min(s.skip, int64(len(q)))
		s.crc = crcframe.Update(s.crc, q[:k])
		q, s.skip = q[k:], s.skip-k
	}
	if s.h != nil {
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
	}
	if len(q) == 0 {
		return len(p), nil
	}
	var err error
	if s.framed != nil {
		var sum uint32
		if sum, err = s.framed.WriteSum(q); err == nil {
			s.crc = crcframe.Combine(s.crc, sum, int64(len(q)))
		}
	} else {
		_, err = s.w.Write(q)
	}
	if err != nil {
		s.crc = crcframe.Update(s.crc, q)
		return len(p) - len(q), err
	}
	if s.framed == nil {
		s.crc = crcframe.Update(s.crc, q)
	}
	s.progress(int64(len(q)))
	return len(p), nil
}

// overlapHash is the smallest write skipWriter hashes beside the send.
const overlapHash = 256 << 10

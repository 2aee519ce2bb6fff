package oci

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"imagestore/internal/retry"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// PushOptions tune PushBlob.
type PushOptions struct {
	// Progress is told how many source bytes were sent (negative after a
	// resume rewinds to the server's durable offset).
	Progress func(delta int64)
	// NoCompress forces identity encoding for this blob.
	NoCompress bool
}

// PushBlob uploads blob d of size bytes from src with a resumable upload:
// one streaming PATCH (zstd-encoded when the server takes it and a sample
// compresses), and after a broken connection a status GET learns the
// server's durable offset and the PATCH resumes from there. The source is
// hashed as it is sent; if it does not hash to d the upload is cancelled
// before the completing PUT and ErrSourceDigest is returned, so a corrupt
// local blob is never committed at the peer.
func (c *Client) PushBlob(ctx context.Context, name string, d digest.Digest, size int64, src io.ReaderAt, opts PushOptions) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("oci: unsupported digest algorithm %s", d.Algorithm())
	}
	progress := opts.Progress
	if progress == nil {
		progress = func(int64) {}
	}
	useZ := !opts.NoCompress && c.zstdOK(ctx) && Compressible(io.NewSectionReader(src, 0, size))
	loc, err := c.startUpload(ctx, name)
	if err != nil {
		return err
	}
	h := &prefixHasher{src: src, h: sha256.New()}
	var sent, offset int64
	tries := 0
	err = c.resumePolicy().Do(ctx, func(ctx context.Context, attempt int) error {
		tries++
		if attempt > 0 {
			nloc, off, serr := c.resync(ctx, name, loc)
			if serr != nil {
				return serr // peer still unreachable; counts as an attempt
			}
			loc = nloc
			progress(off - sent)
			sent = off
			offset = off
		}
		return c.patch(ctx, loc, src, offset, size, useZ, h, func(n int64) { sent += n; progress(n) })
	})
	if err != nil {
		return c.resumeErr(ctx, fmt.Sprintf("oci: upload of %s", d), tries, err)
	}
	if got := h.digest(); got != d {
		c.cancelUpload(ctx, loc)
		return fmt.Errorf("%w: %s hashes to %s", ErrSourceDigest, d, got)
	}
	return c.finishUpload(ctx, loc, d)
}

// resync is how an interrupted upload goes on: the server's durable offset
// and location, or a new session at offset 0 when the server lost the old
// one (expired, or the peer restarted without it).
func (c *Client) resync(ctx context.Context, name, loc string) (string, int64, error) {
	off, nloc, err := c.uploadStatus(ctx, loc)
	if errors.Is(err, ErrNotFound) {
		nloc, err = c.startUpload(ctx, name)
		return nloc, 0, err
	}
	return nloc, off, err
}

// finishUpload closes the upload at loc as blob d (the final PUT).
func (c *Client) finishUpload(ctx context.Context, loc string, d digest.Digest) error {
	u, err := c.resolve(loc)
	if err != nil {
		return err
	}
	resp, err := c.do(ctx, http.MethodPut, addQuery(u, "digest", d.String()), http.NoBody, nil)
	if err != nil {
		return err
	}
	if err := expect(resp, http.StatusCreated); err != nil {
		return err
	}
	drain(resp)
	return nil
}

// resumePolicy is how a blob transfer resumes after a cut: up to
// ResumeAttempts more tries, 200 ms doubling to 4 s, ±20 % jitter; a
// definite answer from the server (other than 416, which a status query
// resolves) ends it.
func (c *Client) resumePolicy() retry.Policy {
	return retry.Policy{
		Attempts: c.resumes + 1,
		Initial:  200 * time.Millisecond,
		Max:      4 * time.Second,
		Jitter:   0.2,
		Retryable: func(err error) bool {
			var oe *Error
			return !errors.As(err, &oe) || oe.Temporary() || oe.Status == http.StatusRequestedRangeNotSatisfiable
		},
	}
}

// resumeErr is the error of a transfer resumePolicy ended: the ctx's if it
// ended, the server's answer if it was definite, else a give-up.
func (c *Client) resumeErr(ctx context.Context, what string, tries int, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if tries > c.resumes && c.resumePolicy().Retryable(err) {
		return fmt.Errorf("%s: giving up after %d resumes: %w", what, tries-1, err)
	}
	return err
}

// MountBlob asks the registry to link blob d into repository name without
// sending it (a cross-repository mount from name itself): true when the
// registry has it (ours then keeps it from GC long enough for a manifest
// naming it to follow), false when it has not, the upload session a
// registry opens instead being cancelled.
func (c *Client) MountBlob(ctx context.Context, name string, d digest.Digest) (bool, error) {
	if err := d.Validate(); err != nil {
		return false, err
	}
	ctx, cancel := c.quick(ctx)
	defer cancel()
	u := c.url("/v2/" + name + "/blobs/uploads/?mount=" + url.QueryEscape(d.String()) + "&from=" + url.QueryEscape(name))
	resp, err := c.do(ctx, http.MethodPost, u, http.NoBody, nil)
	if err != nil {
		return false, err
	}
	switch resp.StatusCode {
	case http.StatusCreated:
		drain(resp)
		return true, nil
	case http.StatusAccepted:
		drain(resp)
		if loc := resp.Header.Get("Location"); loc != "" {
			c.cancelUpload(ctx, loc)
		}
		return false, nil
	}
	return false, expect(resp, http.StatusCreated, http.StatusAccepted)
}

func (c *Client) startUpload(ctx context.Context, name string) (string, error) {
	loc, _, err := c.startUploadHeader(ctx, name)
	return loc, err
}

// startUploadHeader starts an upload session: its location and the
// answer's headers (the extensions it offers).
func (c *Client) startUploadHeader(ctx context.Context, name string) (string, http.Header, error) {
	resp, err := c.do(ctx, http.MethodPost, c.url("/v2/"+name+"/blobs/uploads/"), http.NoBody, nil)
	if err != nil {
		return "", nil, err
	}
	if err := expect(resp, http.StatusAccepted); err != nil {
		return "", nil, err
	}
	drain(resp)
	loc := resp.Header.Get("Location")
	if loc == "" {
		return "", nil, errors.New("oci: upload started without Location")
	}
	return loc, resp.Header, nil
}

func (c *Client) cancelUpload(ctx context.Context, loc string) {
	u, err := c.resolve(loc)
	if err != nil {
		return
	}
	if resp, err := c.do(ctx, http.MethodDelete, u, nil, nil); err == nil {
		drain(resp)
	}
}

// uploadStatus asks how many bytes of an upload the server holds durably.
func (c *Client) uploadStatus(ctx context.Context, loc string) (int64, string, error) {
	ctx, cancel := c.quick(ctx)
	defer cancel()
	u, err := c.resolve(loc)
	if err != nil {
		return 0, "", err
	}
	resp, err := c.do(ctx, http.MethodGet, u, nil, nil)
	if err != nil {
		return 0, "", err
	}
	if err := expect(resp, http.StatusNoContent); err != nil {
		return 0, "", err
	}
	drain(resp)
	off, err := UploadOffset(resp.Header)
	if err != nil {
		return 0, "", err
	}
	if l := resp.Header.Get("Location"); l != "" {
		loc = l
	}
	return off, loc, nil
}

// UploadOffset is an upload's next offset from a response: our server's
// exact HeaderUploadOffset when present, else the Range header
// (ParseRangeEnd). The spec's "Range: 0-0" means both "empty" and "one
// byte"; HeaderUploadOffset tells them apart.
func UploadOffset(h http.Header) (int64, error) {
	if v := h.Get(HeaderUploadOffset); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("oci: bad %s %q", HeaderUploadOffset, v)
		}
		return n, nil
	}
	return ParseRangeEnd(h.Get("Range"))
}

// ParseRangeEnd turns an upload "Range: 0-<last>" header into the next
// offset (last+1); no header or "0--1" is an empty upload. A lone "0-0"
// is read as one byte (servers that send it for an empty upload too are
// ambiguous; ours also sends HeaderUploadOffset).
func ParseRangeEnd(h string) (int64, error) {
	h = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(h), "bytes="))
	if h == "" {
		return 0, nil
	}
	a, b, ok := strings.Cut(h, "-")
	if !ok || a != "0" {
		return 0, fmt.Errorf("oci: bad upload Range %q", h)
	}
	n, err := strconv.ParseInt(b, 10, 64)
	if err != nil || n < -1 {
		return 0, fmt.Errorf("oci: bad upload Range %q", h)
	}
	return n + 1, nil
}

// patch streams src[offset:size] as one PATCH.
func (c *Client) patch(ctx context.Context, loc string, src io.ReaderAt, offset, size int64, useZ bool, h *prefixHasher, progress func(int64)) error {
	u, err := c.resolve(loc)
	if err != nil {
		return err
	}
	if err := h.rewind(offset); err != nil {
		return err
	}
	if offset >= size {
		return nil
	}
	// Tee into h itself (not h.h) so h knows how far it hashed for the next rewind.
	body := &bodyGuard{r: io.TeeReader(&countingReader{r: io.NewSectionReader(src, offset, size-offset), fn: progress}, h)}
	defer body.stop()
	hdr := http.Header{
		"Content-Type":  {"application/octet-stream"},
		"Content-Range": {fmt.Sprintf("%d-%d", offset, size-1)},
	}
	var rd io.Reader = body
	var wg sync.WaitGroup
	var pr *io.PipeReader
	if useZ {
		hdr.Set("Content-Encoding", "zstd")
		var pw *io.PipeWriter
		pr, pw = io.Pipe()
		wg.Add(1)
		go func() {
			defer wg.Done()
			zw, err := zstd.NewWriter(pw, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(1<<20))
			if err != nil {
				pw.CloseWithError(err)
				return
			}
			if _, err := io.CopyBuffer(zw, body, make([]byte, 1<<20)); err != nil {
				zw.Close()
				pw.CloseWithError(err)
				return
			}
			pw.CloseWithError(zw.Close())
		}()
		rd = pr
	}
	resp, err := c.do(ctx, http.MethodPatch, u, rd, hdr)
	if pr != nil {
		pr.CloseWithError(errors.New("request finished"))
		wg.Wait()
	}
	if err != nil {
		return err
	}
	if err := expect(resp, http.StatusAccepted, http.StatusNoContent); err != nil {
		return err
	}
	drain(resp)
	end, err := UploadOffset(resp.Header)
	if err != nil {
		return err
	}
	if end != size {
		return &Error{Method: http.MethodPatch, URL: u, Status: http.StatusRequestedRangeNotSatisfiable,
			Errors: []ErrorInfo{{Code: CodeRangeInvalid, Message: fmt.Sprintf("server holds %d of %d bytes", end, size)}}}
	}
	return nil
}

// bodyGuard is a request body that is no longer read once stopped.
// net/http may go on reading a request's body after Do returned (when the
// server answered before taking it all), while what the body feeds (the
// progress callback, the hasher of the next attempt) belongs to the caller
// again from then on. stop waits for a Read in progress.
type bodyGuard struct {
	mu      sync.Mutex
	r       io.Reader
	stopped bool
}

var errBodyStopped = errors.New("oci: request finished")

func (g *bodyGuard) Read(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stopped {
		return 0, errBodyStopped
	}
	return g.r.Read(p)
}

func (g *bodyGuard) stop() {
	g.mu.Lock()
	g.stopped = true
	g.mu.Unlock()
}

type countingReader struct {
	r  io.Reader
	fn func(int64)
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.fn(int64(n))
	}
	return n, err
}

// prefixHasher hashes the source as it is sent; after a resume at an
// offset below what was hashed, it re-hashes the prefix from src.
type prefixHasher struct {
	src    io.ReaderAt
	h      hash.Hash
	hashed int64 // bytes fed to h
}

func (p *prefixHasher) Write(b []byte) (int, error) { p.hashed += int64(len(b)); return p.h.Write(b) }

func (p *prefixHasher) rewind(offset int64) error {
	if offset == p.hashed {
		return nil
	}
	p.h.Reset()
	p.hashed = 0
	if offset == 0 {
		return nil
	}
	_, err := io.CopyBuffer(p, io.NewSectionReader(p.src, 0, offset), make([]byte, 1<<20))
	return err
}

func (p *prefixHasher) digest() digest.Digest {
	return digest.NewDigest(digest.SHA256, p.h)
}

// Compressible sample-compresses the first MiB: false when zstd saves
// under 10%, so incompressible layers go out as they are.
func Compressible(r io.Reader) bool {
	buf := make([]byte, 1<<20)
	n, _ := io.ReadFull(r, buf)
	if n == 0 {
		return false
	}
	// One encoder per call: Compressible runs once per blob, so a pool
	// would save little and be state shared by every Client.
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return false
	}
	defer enc.Close()
	out := enc.EncodeAll(buf[:n], make([]byte, 0, n))
	return len(out) < n*9/10
}

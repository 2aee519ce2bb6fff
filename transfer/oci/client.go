package oci

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"imagestore/internal/retry"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// Options configure a Client.
type Options struct {
	// Addr is "host:port" or a URL ("http://host:port", "https://host:port").
	// A bare host:port means https when CA is set, http otherwise.
	Addr string
	// CA is a PEM bundle trusted for the peer's certificate (https).
	CA []byte
	// Token is sent as "Authorization: Bearer <token>"; never logged.
	Token string
	// Compress enables zstd on the wire when the server offers it.
	Compress bool
	// HTTPClient overrides the transport (tests); CA is then ignored.
	HTTPClient *http.Client
	// ResumeAttempts bounds how often one blob transfer resumes after a
	// broken connection (default 6, with backoff up to ~10 s in total).
	ResumeAttempts int
}

// Client talks to one registry. Safe for concurrent use.
type Client struct {
	base     *url.URL
	hc       *http.Client
	token    string
	compress bool
	resumes  int

	once       sync.Once
	serverZstd bool
}

// New builds a client; it does not contact the server.
func New(opts Options) (*Client, error) {
	addr := opts.Addr
	if !strings.Contains(addr, "://") {
		if len(opts.CA) > 0 {
			addr = "https://" + addr
		} else {
			addr = "http://" + addr
		}
	}
	u, err := url.Parse(addr)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("oci: bad registry address %q", opts.Addr)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	hc := opts.HTTPClient
	if hc == nil {
		tr := &http.Transport{
			Proxy:                 nil,
			DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost:   64,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: 5 * time.Minute,
			DisableCompression:    true,
			WriteBufferSize:       256 << 10,
			ReadBufferSize:        256 << 10,
		}
		if len(opts.CA) > 0 {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(opts.CA) {
				return nil, errors.New("oci: CA holds no PEM certificate")
			}
			tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		}
		hc = &http.Client{Transport: tr}
	}
	n := opts.ResumeAttempts
	if n <= 0 {
		n = 6
	}
	return &Client{base: u, hc: hc, token: opts.Token, compress: opts.Compress, resumes: n}, nil
}

// CloseIdleConnections releases pooled connections.
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

func (c *Client) url(p string) string { return c.base.String() + p }

func (c *Client) resolve(loc string) (string, error) {
	u, err := url.Parse(loc)
	if err != nil {
		return "", fmt.Errorf("oci: bad Location %q: %w", loc, err)
	}
	return c.base.ResolveReference(u).String(), nil
}

func (c *Client) do(ctx context.Context, method, u string, body io.Reader, hdr http.Header) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	return c.hc.Do(req)
}

func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

func expect(resp *http.Response, codes ...int) error {
	for _, c := range codes {
		if resp.StatusCode == c {
			return nil
		}
	}
	e := readError(resp)
	resp.Body.Close()
	return e
}

// Ping checks GET /v2/ (auth included) and learns which encodings the server takes.
func (c *Client) Ping(ctx context.Context) error {
	resp, err := c.do(ctx, http.MethodGet, c.url("/v2/"), nil, nil)
	if err != nil {
		return err
	}
	if err := expect(resp, http.StatusOK); err != nil {
		return err
	}
	c.once.Do(func() { c.serverZstd = hasToken(resp.Header.Get(HeaderEncodings), "zstd") })
	drain(resp)
	return nil
}

func (c *Client) zstdOK(ctx context.Context) bool {
	if !c.compress {
		return false
	}
	c.once.Do(func() {
		resp, err := c.do(ctx, http.MethodGet, c.url("/v2/"), nil, nil)
		if err != nil {
			return
		}
		c.serverZstd = resp.StatusCode == http.StatusOK && hasToken(resp.Header.Get(HeaderEncodings), "zstd")
		drain(resp)
	})
	return c.serverZstd
}

func hasToken(list, tok string) bool {
	for _, p := range strings.Split(list, ",") {
		p, _, _ = strings.Cut(p, ";")
		if strings.EqualFold(strings.TrimSpace(p), tok) {
			return true
		}
	}
	return false
}

// StatBlob returns the size of a blob the registry holds; ErrNotFound if none.
func (c *Client) StatBlob(ctx context.Context, name string, d digest.Digest) (int64, error) {
	resp, err := c.do(ctx, http.MethodHead, c.url("/v2/"+name+"/blobs/"+d.String()), nil, nil)
	if err != nil {
		return 0, err
	}
	defer drain(resp)
	if resp.StatusCode != http.StatusOK {
		return 0, &Error{Method: http.MethodHead, URL: resp.Request.URL.Redacted(), Status: resp.StatusCode}
	}
	return resp.ContentLength, nil
}

// GetBlob streams blob d from offset. size is the blob's declared size
// (-1 unknown); a response that decodes to more than size-offset bytes
// fails with ErrTooLarge, so a zstd bomb cannot fill the disk. zstd is
// asked for only from offset 0 (a resumed read is a plain Range request).
func (c *Client) GetBlob(ctx context.Context, name string, d digest.Digest, offset, size int64) (io.ReadCloser, error) {
	hdr := http.Header{}
	useZ := offset == 0 && c.zstdOK(ctx)
	if useZ {
		hdr.Set("Accept-Encoding", "zstd")
	} else {
		hdr.Set("Accept-Encoding", "identity")
	}
	if offset > 0 {
		hdr.Set("Range", fmt.Sprintf("bytes=%d-", offset))
	}
	resp, err := c.do(ctx, http.MethodGet, c.url("/v2/"+name+"/blobs/"+d.String()), nil, hdr)
	if err != nil {
		return nil, err
	}
	want := http.StatusOK
	if offset > 0 {
		want = http.StatusPartialContent
	}
	if err := expect(resp, want); err != nil {
		return nil, err
	}
	limit := int64(-1)
	if size >= 0 {
		limit = size - offset
	}
	var r io.Reader = resp.Body
	closeFn := resp.Body.Close
	switch enc := strings.ToLower(resp.Header.Get("Content-Encoding")); enc {
	case "", "identity":
	case "zstd":
		if !useZ {
			resp.Body.Close()
			return nil, fmt.Errorf("oci: blob %s: unrequested zstd encoding", d)
		}
		zr, err := zstd.NewReader(resp.Body, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(256<<20), zstd.WithDecoderMaxWindow(64<<20))
		if err != nil {
			resp.Body.Close()
			return nil, err
		}
		r = zr
		closeFn = func() error { zr.Close(); return resp.Body.Close() }
	default:
		resp.Body.Close()
		return nil, fmt.Errorf("oci: blob %s: unsupported Content-Encoding %q", d, enc)
	}
	if limit >= 0 {
		r = &boundedReader{r: r, n: limit}
	}
	return &readCloser{Reader: r, close: closeFn}, nil
}

type readCloser struct {
	io.Reader
	close func() error
}

func (r *readCloser) Close() error { return r.close() }

// boundedReader fails once more than n bytes come out.
type boundedReader struct {
	r io.Reader
	n int64
}

func (b *boundedReader) Read(p []byte) (int, error) {
	if b.n < 0 {
		return 0, ErrTooLarge
	}
	if int64(len(p)) > b.n+1 {
		p = p[:b.n+1]
	}
	n, err := b.r.Read(p)
	b.n -= int64(n)
	if b.n < 0 {
		return n + int(b.n), ErrTooLarge
	}
	return n, err
}

// PutBlob uploads a small blob in one request (POST ?digest=).
func (c *Client) PutBlob(ctx context.Context, name string, d digest.Digest, data []byte) error {
	hdr := http.Header{"Content-Type": {"application/octet-stream"}}
	resp, err := c.do(ctx, http.MethodPost, c.url("/v2/"+name+"/blobs/uploads/?digest="+url.QueryEscape(d.String())), bytes.NewReader(data), hdr)
	if err != nil {
		return err
	}
	if err := expect(resp, http.StatusCreated); err != nil {
		return err
	}
	drain(resp)
	return nil
}

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
			// Learn the server's durable offset and go on from there.
			off, nloc, serr := c.uploadStatus(ctx, loc)
			switch {
			case serr == nil:
				loc = nloc
			case errors.Is(serr, ErrNotFound):
				// The session is gone (expired or the peer lost it): start over.
				if nloc, serr = c.startUpload(ctx, name); serr != nil {
					return serr
				}
				loc, off = nloc, 0
			default:
				return serr // peer still unreachable; counts as an attempt
			}
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
	u, err := c.resolve(loc)
	if err != nil {
		return err
	}
	u = addQuery(u, "digest", d.String())
	resp, err := c.do(ctx, http.MethodPut, u, http.NoBody, nil)
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

func addQuery(u, k, v string) string {
	sep := "?"
	if strings.Contains(u, "?") {
		sep = "&"
	}
	return u + sep + url.QueryEscape(k) + "=" + url.QueryEscape(v)
}

func (c *Client) startUpload(ctx context.Context, name string) (string, error) {
	resp, err := c.do(ctx, http.MethodPost, c.url("/v2/"+name+"/blobs/uploads/"), http.NoBody, nil)
	if err != nil {
		return "", err
	}
	if err := expect(resp, http.StatusAccepted); err != nil {
		return "", err
	}
	drain(resp)
	loc := resp.Header.Get("Location")
	if loc == "" {
		return "", errors.New("oci: upload started without Location")
	}
	return loc, nil
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
	off, err := ParseRangeEnd(resp.Header.Get("Range"))
	if err != nil {
		return 0, "", err
	}
	if l := resp.Header.Get("Location"); l != "" {
		loc = l
	}
	return off, loc, nil
}

// ParseRangeEnd turns an upload "Range: 0-<last>" header into the next
// offset (last+1). Our server omits the header for an empty upload (the
// spec's "0-0" would be ambiguous); "0--1" is accepted as empty too.
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
	end, err := ParseRangeEnd(resp.Header.Get("Range"))
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

// HeadManifest returns the descriptor of a manifest; ErrNotFound if none.
func (c *Client) HeadManifest(ctx context.Context, name, ref string) (Descriptor, error) {
	resp, err := c.do(ctx, http.MethodHead, c.url("/v2/"+name+"/manifests/"+ref), nil, http.Header{"Accept": {MediaTypeManifest}})
	if err != nil {
		return Descriptor{}, err
	}
	defer drain(resp)
	if resp.StatusCode != http.StatusOK {
		return Descriptor{}, &Error{Method: http.MethodHead, URL: resp.Request.URL.Redacted(), Status: resp.StatusCode}
	}
	d, err := digest.Parse(resp.Header.Get(HeaderContentDigest))
	if err != nil {
		return Descriptor{}, fmt.Errorf("oci: manifest %s:%s: bad %s: %w", name, ref, HeaderContentDigest, err)
	}
	return Descriptor{MediaType: resp.Header.Get("Content-Type"), Digest: d, Size: resp.ContentLength}, nil
}

// GetManifest fetches a manifest's bytes (at most MaxManifestSize).
func (c *Client) GetManifest(ctx context.Context, name, ref string) ([]byte, Descriptor, error) {
	resp, err := c.do(ctx, http.MethodGet, c.url("/v2/"+name+"/manifests/"+ref), nil, http.Header{"Accept": {MediaTypeManifest}})
	if err != nil {
		return nil, Descriptor{}, err
	}
	if err := expect(resp, http.StatusOK); err != nil {
		return nil, Descriptor{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	if err != nil {
		return nil, Descriptor{}, err
	}
	if len(b) > MaxManifestSize {
		return nil, Descriptor{}, fmt.Errorf("%w: manifest over %d bytes", ErrTooLarge, MaxManifestSize)
	}
	d := digest.FromBytes(b)
	if h := resp.Header.Get(HeaderContentDigest); h != "" && h != d.String() {
		return nil, Descriptor{}, fmt.Errorf("%w: manifest %s:%s digest %s, header says %s", ErrDigestInvalid, name, ref, d, h)
	}
	if strings.HasPrefix(ref, "sha256:") && ref != d.String() {
		return nil, Descriptor{}, fmt.Errorf("%w: manifest %s digest %s", ErrDigestInvalid, ref, d)
	}
	return b, Descriptor{MediaType: resp.Header.Get("Content-Type"), Digest: d, Size: int64(len(b))}, nil
}

// FetchSmallBlob reads a blob of at most max bytes and verifies its digest.
func (c *Client) FetchSmallBlob(ctx context.Context, name string, d digest.Digest, max int64) ([]byte, error) {
	rc, err := c.GetBlob(ctx, name, d, 0, -1)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%w: blob %s over %d bytes", ErrTooLarge, d, max)
	}
	if got := digest.FromBytes(b); got != d {
		return nil, fmt.Errorf("%w: blob %s hashes to %s", ErrDigestInvalid, d, got)
	}
	return b, nil
}

// PutManifest uploads a manifest under ref (a tag or its digest).
func (c *Client) PutManifest(ctx context.Context, name, ref, mediaType string, body []byte) (digest.Digest, error) {
	resp, err := c.do(ctx, http.MethodPut, c.url("/v2/"+name+"/manifests/"+ref), bytes.NewReader(body), http.Header{"Content-Type": {mediaType}})
	if err != nil {
		return "", err
	}
	if err := expect(resp, http.StatusCreated); err != nil {
		return "", err
	}
	drain(resp)
	return digest.FromBytes(body), nil
}

// Tags lists the tags of a repository.
func (c *Client) Tags(ctx context.Context, name string) ([]string, error) {
	resp, err := c.do(ctx, http.MethodGet, c.url("/v2/"+name+"/tags/list"), nil, nil)
	if err != nil {
		return nil, err
	}
	if err := expect(resp, http.StatusOK); err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var tl struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, MaxManifestSize)).Decode(&tl); err != nil {
		return nil, fmt.Errorf("oci: tags of %s: %w", name, err)
	}
	return tl.Tags, nil
}

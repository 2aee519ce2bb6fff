package oci

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"imagestore/internal/tlsconf"
)

// Options configure a Client.
type Options struct {
	// Addr is "host:port" or a URL ("http://host:port", "https://host:port").
	// A bare host:port means https when CA is set, http otherwise.
	Addr string
	// CA is a PEM bundle trusted for the peer's certificate (https).
	CA []byte
	// ServerName is the name verified in the peer's certificate instead of
	// the dialled host ("" = the dialled host): store.zstack.org for
	// ZStack's certificate, which peers are dialled around by IP.
	ServerName string
	// TLS, when set, is the https client configuration (internal/tlsconf
	// builds one that verifies a fixed server name); CA is then ignored.
	TLS *tls.Config
	// Token is sent as "Authorization: Bearer <token>"; never logged.
	Token string
	// Compress enables zstd on the wire when the server offers it.
	Compress bool
	// HTTPClient overrides the transport (tests); CA is then ignored.
	HTTPClient *http.Client
	// ResumeAttempts bounds how often one blob transfer resumes after a
	// broken connection (default 6, with backoff up to ~10 s in total).
	ResumeAttempts int
	// HeaderTimeout bounds the wait for a response's headers (default
	// 5 min); with HTTPClient it is that client's business.
	HeaderTimeout time.Duration
	// QuickTimeout bounds a whole request whose answer the server has at
	// hand: HEAD of a manifest or blob, an upload's status, GET /v2/
	// (default 1 min), so a peer that takes the connection and hangs costs
	// that much per attempt.
	QuickTimeout time.Duration
	// ManifestTimeout bounds the wait for a manifest PUT's answer (default
	// 30 min): our store answers only after it checked every new layer by
	// encoding it again, minutes for a large compressed layer on a busy
	// store (8 GiB took over 5 under load). Only that request gets it.
	ManifestTimeout time.Duration
}

// Client talks to one registry. Safe for concurrent use.
type Client struct {
	base *url.URL
	hc   *http.Client
	// manifestHC is hc with ManifestTimeout for the response headers: it
	// carries only manifest PUTs.
	manifestHC *http.Client
	quickTO    time.Duration
	token      string
	compress   bool
	resumes    int

	once       sync.Once
	serverZstd bool
}

// New builds a client; it does not contact the server.
func New(opts Options) (*Client, error) {
	addr := opts.Addr
	if !strings.Contains(addr, "://") {
		if len(opts.CA) > 0 || opts.TLS != nil {
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
	if opts.HeaderTimeout <= 0 {
		opts.HeaderTimeout = 5 * time.Minute
	}
	if opts.QuickTimeout <= 0 {
		opts.QuickTimeout = time.Minute
	}
	if opts.ManifestTimeout <= 0 {
		opts.ManifestTimeout = 30 * time.Minute
	}
	hc, manifestHC := opts.HTTPClient, opts.HTTPClient
	if hc == nil {
		tr := &http.Transport{
			Proxy:                 nil,
			DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost:   64,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: opts.HeaderTimeout,
			DisableCompression:    true,
			WriteBufferSize:       256 << 10,
			ReadBufferSize:        256 << 10,
		}
		switch {
		case opts.TLS != nil:
			tr.TLSClientConfig = opts.TLS.Clone()
		case len(opts.CA) > 0:
			tc, err := tlsconf.Client(opts.CA, opts.ServerName)
			if err != nil {
				return nil, fmt.Errorf("oci: %w", err)
			}
			tr.TLSClientConfig = tc
		}
		hc = &http.Client{Transport: tr}
		// A transport of its own: ResponseHeaderTimeout is per transport,
		// and no other request may wait that long.
		mtr := tr.Clone()
		mtr.ResponseHeaderTimeout = opts.ManifestTimeout
		manifestHC = &http.Client{Transport: mtr}
	}
	n := opts.ResumeAttempts
	if n <= 0 {
		n = 6
	}
	return &Client{base: u, hc: hc, manifestHC: manifestHC, quickTO: opts.QuickTimeout, token: opts.Token, compress: opts.Compress, resumes: n}, nil
}

// CloseIdleConnections releases pooled connections.
func (c *Client) CloseIdleConnections() {
	c.hc.CloseIdleConnections()
	c.manifestHC.CloseIdleConnections()
}

func (c *Client) url(p string) string { return c.base.String() + p }

func (c *Client) resolve(loc string) (string, error) {
	u, err := url.Parse(loc)
	if err != nil {
		return "", fmt.Errorf("oci: bad Location %q: %w", loc, err)
	}
	return c.base.ResolveReference(u).String(), nil
}

func (c *Client) do(ctx context.Context, method, u string, body io.Reader, hdr http.Header) (*http.Response, error) {
	return c.send(ctx, c.hc, method, u, body, hdr)
}

// errQuickTimeout is the cause of a quick request's deadline.
type errQuickTimeout time.Duration

func (e errQuickTimeout) Error() string {
	return fmt.Sprintf("oci: no answer within %v", time.Duration(e))
}

// quick bounds a request whose answer the server has at hand
// (QuickTimeout); the caller reads the response before it calls cancel.
func (c *Client) quick(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, c.quickTO, errQuickTimeout(c.quickTO))
}

func (c *Client) send(ctx context.Context, hc *http.Client, method, u string, body io.Reader, hdr http.Header) (*http.Response, error) {
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
	resp, err := hc.Do(req)
	if err != nil {
		// Say why a deadline of ours ended it (Do reports only ctx.Err()).
		if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w: %w", err, cause)
		}
		return nil, err
	}
	return resp, nil
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
	ctx, cancel := c.quick(ctx)
	defer cancel()
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
		ctx, cancel := c.quick(ctx)
		defer cancel()
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
	ctx, cancel := c.quick(ctx)
	defer cancel()
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

func addQuery(u, k, v string) string {
	sep := "?"
	if strings.Contains(u, "?") {
		sep = "&"
	}
	return u + sep + url.QueryEscape(k) + "=" + url.QueryEscape(v)
}

// PutJSON sends body (JSON) with PUT to path on the same server, with the
// client's TLS and token: the side channel a store uses to tell its peer
// about a replication task (/v1/tasks/<id>). Any 2xx is success.
func (c *Client) PutJSON(ctx context.Context, path string, body []byte) error {
	resp, err := c.do(ctx, http.MethodPut, c.url(path), bytes.NewReader(body), http.Header{"Content-Type": {"application/json"}})
	if err != nil {
		return err
	}
	defer drain(resp)
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return fmt.Errorf("oci: PUT %s: %s: %s", path, resp.Status, bytes.TrimSpace(b))
	}
	return nil
}

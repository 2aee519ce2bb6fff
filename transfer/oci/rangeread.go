package oci

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/opencontainers/go-digest"
)

// BlobReaderAt reads blob d of a repository (size bytes, from its
// descriptor) by byte ranges: each ReadAt is one Range request (identity
// encoding), and a read cut mid-way continues from the bytes it got (the
// same resume policy as blob transfers). Safe for concurrent use. The
// bytes are not checked against d (a range cannot be); callers that need
// the digest read the whole blob with GetBlob.
func (c *Client) BlobReaderAt(ctx context.Context, name string, d digest.Digest, size int64) io.ReaderAt {
	return &blobReaderAt{c: c, ctx: ctx, u: c.url("/v2/" + name + "/blobs/" + d.String()), size: size}
}

type blobReaderAt struct {
	c    *Client
	ctx  context.Context
	u    string
	size int64
}

func (b *blobReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("oci: negative read offset %d", off)
	}
	if off >= b.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > b.size-off {
		p, eof = p[:b.size-off], io.EOF
	}
	n, tries := 0, 0
	err := b.c.resumePolicy().Do(b.ctx, func(ctx context.Context, _ int) error {
		tries++
		if n == len(p) {
			return nil
		}
		m, err := b.get(ctx, p[n:], off+int64(n))
		n += m
		return err
	})
	if err != nil {
		return n, b.c.resumeErr(b.ctx, "oci: range read", tries, err)
	}
	return n, eof
}

// get reads p at off with one Range request; it returns what arrived.
func (b *blobReaderAt) get(ctx context.Context, p []byte, off int64) (int, error) {
	hdr := http.Header{
		"Accept-Encoding": {"identity"},
		"Range":           {fmt.Sprintf("bytes=%d-%d", off, off+int64(len(p))-1)},
	}
	resp, err := b.c.do(ctx, http.MethodGet, b.u, nil, hdr)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		// The whole blob: skip to off (a server that ignores Range).
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			return 0, err
		}
	default:
		return 0, expect(resp, http.StatusPartialContent)
	}
	if enc := resp.Header.Get("Content-Encoding"); enc != "" && enc != "identity" {
		return 0, fmt.Errorf("oci: range read: unrequested Content-Encoding %q", enc)
	}
	n, err := io.ReadFull(resp.Body, p)
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

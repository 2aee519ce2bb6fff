package oci

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"imagestore/internal/retry"
	"io"
	"net/http"

	"github.com/opencontainers/go-digest"
)

// StreamOptions tune PushStream.
type StreamOptions struct {
	// ChunkSize is the bytes held in memory and sent per PATCH (default 8 MiB).
	ChunkSize int
	// Progress is told how many source bytes each acknowledged chunk carried.
	Progress func(delta int64)
}

// ErrStreamLost: the server lost an upload session of a stream; a stream
// cannot be rewound, so the upload must be started over by the caller.
var ErrStreamLost = errors.New("upload session lost; a streamed blob cannot be resumed")

// PushStream uploads a blob whose size and digest are not known in advance
// (a dump piped from another process) as a chunked upload: each chunk is one
// PATCH with a Content-Range, and a chunk cut mid-way resumes at the
// server's durable offset, so memory stays at one chunk. When r is drained
// the completing PUT names the digest computed on the way; r returning an
// error other than io.EOF cancels the upload and nothing is committed.
func (c *Client) PushStream(ctx context.Context, name string, r io.Reader, opts StreamOptions) (digest.Digest, int64, error) {
	chunk := opts.ChunkSize
	if chunk <= 0 {
		chunk = 8 << 20
	}
	progress := opts.Progress
	if progress == nil {
		progress = func(int64) {}
	}
	loc, err := c.startUpload(ctx, name)
	if err != nil {
		return "", 0, err
	}
	h := sha256.New()
	buf := make([]byte, chunk)
	var off int64
	for {
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			h.Write(buf[:n])
			if loc, err = c.sendChunk(ctx, loc, buf[:n], off); err != nil {
				c.cancelUpload(context.WithoutCancel(ctx), loc)
				return "", off, err
			}
			off += int64(n)
			progress(int64(n))
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			c.cancelUpload(context.WithoutCancel(ctx), loc)
			return "", off, fmt.Errorf("oci: stream source: %w", rerr)
		}
	}
	d := digest.NewDigest(digest.SHA256, h)
	if err := c.finishUpload(ctx, loc, d); err != nil {
		return "", off, err
	}
	return d, off, nil
}

// sendChunk PATCHes p at offset base, resuming within p after a cut.
func (c *Client) sendChunk(ctx context.Context, loc string, p []byte, base int64) (string, error) {
	pos := 0
	tries := 0
	err := c.resumePolicy().Do(ctx, func(ctx context.Context, attempt int) error {
		tries++
		if attempt > 0 {
			got, nloc, serr := c.uploadStatus(ctx, loc)
			if errors.Is(serr, ErrNotFound) {
				return retry.Permanent(fmt.Errorf("oci: %w: %v", ErrStreamLost, serr))
			}
			if serr != nil {
				return serr // still unreachable; counts as an attempt
			}
			loc = nloc
			if got < base || got > base+int64(len(p)) {
				return retry.Permanent(fmt.Errorf("oci: %w: server holds %d bytes, chunk spans %d-%d", ErrStreamLost, got, base, base+int64(len(p))))
			}
			pos = int(got - base)
			if pos == len(p) {
				return nil
			}
		}
		return c.patchBytes(ctx, loc, p[pos:], base+int64(pos))
	})
	if err != nil {
		return loc, c.resumeErr(ctx, "oci: streamed upload", tries, err)
	}
	return loc, nil
}

func (c *Client) patchBytes(ctx context.Context, loc string, p []byte, off int64) error {
	u, err := c.resolve(loc)
	if err != nil {
		return err
	}
	hdr := http.Header{
		"Content-Type":  {"application/octet-stream"},
		"Content-Range": {fmt.Sprintf("%d-%d", off, off+int64(len(p))-1)},
	}
	resp, err := c.do(ctx, http.MethodPatch, u, bytes.NewReader(p), hdr)
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
	if want := off + int64(len(p)); end != want {
		return &Error{Method: http.MethodPatch, URL: u, Status: http.StatusRequestedRangeNotSatisfiable,
			Errors: []ErrorInfo{{Code: CodeRangeInvalid, Message: fmt.Sprintf("server holds %d bytes, want %d", end, want)}}}
	}
	return nil
}

// Package ctxio makes long copies stop when their context ends.
package ctxio

import (
	"context"
	"io"
)

// Reader returns a reader that fails with ctx's error, before reading,
// once ctx has ended; so an io.Copy from it stops at the next read.
func Reader(ctx context.Context, r io.Reader) io.Reader {
	return reader{ctx, r}
}

type reader struct {
	ctx context.Context
	r   io.Reader
}

func (r reader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

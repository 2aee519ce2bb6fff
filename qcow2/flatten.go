package qcow2

import (
	"bufio"
	"context"
	"fmt"
	"imagestore/internal/countio"
	"io"

	"golang.org/x/sync/errgroup"
)

// Flatten writes a chain as one standalone image: format "qcow2" or "raw".
//
// qcow2 output is a canonical base layer (no backing file; opts.BackingFile
// must be empty). raw output is exactly VirtualSize bytes, holes written as
// zeros, so it can go to a pipe or socket.
func Flatten(ctx context.Context, w io.Writer, c *Chain, format string, opts WriteOptions) (int64, error) {
	if c == nil {
		return 0, fmt.Errorf("qcow2: flatten: nil chain")
	}
	if opts.BackingFile != "" {
		return 0, fmt.Errorf("qcow2: flatten: a flattened image is standalone, got backing file %q", opts.BackingFile)
	}
	ext, err := c.Extents()
	if err != nil {
		return 0, fmt.Errorf("qcow2: flatten: %w", err)
	}
	switch format {
	case "qcow2":
		return Write(ctx, w, c.VirtualSize(), ext, c, opts)
	case "raw":
		return wrFlattenRaw(ctx, w, c.VirtualSize(), ext, c)
	}
	return 0, fmt.Errorf("qcow2: flatten: unknown format %q (want qcow2 or raw)", format)
}

// wrFlattenRaw streams the guest view: workers fill fixed-size chunks in
// parallel, and this goroutine writes them in order.
func wrFlattenRaw(ctx context.Context, w io.Writer, vsize int64, ext []Extent, data io.ReaderAt) (int64, error) {
	p := &wrPlan{vsize: vsize, extents: ext}
	const chunk = wrChunkBytes
	nChunks := (vsize + chunk - 1) / chunk
	workers := wrWorkers()
	type job struct {
		off  int64
		buf  []byte
		done chan error
	}
	free := make(chan []byte, workers+2)
	for range cap(free) {
		free <- make([]byte, chunk)
	}
	jobs := make(chan *job)
	order := make(chan *job, cap(free))
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(order)
		defer close(jobs)
		for i := int64(0); i < nChunks; i++ {
			var buf []byte
			select {
			case buf = <-free:
			case <-gctx.Done():
				return gctx.Err()
			}
			off := i * chunk
			j := &job{off: off, buf: buf[:min(chunk, vsize-off)], done: make(chan error, 1)}
			order <- j // never blocks: at most cap(free) jobs exist
			select {
			case jobs <- j:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range workers {
		g.Go(func() error {
			for j := range jobs {
				j.done <- p.fill(j.buf, j.off, data)
			}
			return nil
		})
	}
	cw := &countio.Writer{W: w}
	bw := bufio.NewWriterSize(cw, wrBufBytes)
	g.Go(func() error {
		for j := range order {
			select {
			case err := <-j.done:
				if err != nil {
					return err
				}
			case <-gctx.Done():
				return gctx.Err()
			}
			if _, err := bw.Write(j.buf); err != nil {
				return err
			}
			free <- j.buf[:cap(j.buf)]
		}
		return bw.Flush()
	})
	err := g.Wait()
	return cw.N, err
}

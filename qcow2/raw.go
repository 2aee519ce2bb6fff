package qcow2

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"imagestore/internal/fsutil"
)

// ErrRawSize means a raw image's size is not a whole number of 512-byte
// sectors, so it cannot be a disk (and qcow2 cannot describe it).
var ErrRawSize = errors.New("qcow2: raw image size is not a multiple of 512")

// NormalizeRaw writes the raw disk image r (size bytes) as a canonical
// layer, exactly as Write would for one Data extent covering the disk: the
// all-zero clusters of a base layer are left unallocated, a delta
// (opts.BackingFile set) zero-flags them.
//
// When r is an *os.File its holes (SEEK_HOLE) are described as Zero extents
// and never read, so a sparse multi-GiB raw file costs only its allocated
// bytes. The file's offset is moved; ReadAt callers are unaffected.
func NormalizeRaw(ctx context.Context, w io.Writer, r io.ReaderAt, size int64, opts WriteOptions) (int64, error) {
	if size < 0 || size%512 != 0 {
		return 0, fmt.Errorf("%w (size %d)", ErrRawSize, size)
	}
	ext := []Extent{{Offset: 0, Length: size, Kind: Data}}
	if f, ok := r.(*os.File); ok {
		if holes, err := rawFileExtents(f, size); err == nil {
			ext = holes
		}
	}
	return Write(ctx, w, size, ext, r, opts)
}

// rawFileExtents maps a file's data and holes with SEEK_DATA/SEEK_HOLE.
// An error means "cannot tell" (filesystem without hole support); the caller
// then reads everything.
func rawFileExtents(f *os.File, size int64) ([]Extent, error) {
	fd := int(f.Fd())
	var ext []Extent
	add := func(off, end int64, k Kind) {
		if end <= off {
			return
		}
		if n := len(ext); n > 0 && ext[n-1].Kind == k && ext[n-1].End() == off {
			ext[n-1].Length += end - off
			return
		}
		ext = append(ext, Extent{Offset: off, Length: end - off, Kind: k})
	}
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = size // only a hole remains
		} else if err != nil {
			return nil, err
		}
		data = min(data, size)
		add(off, data, Zero)
		if data == size {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		hole = min(hole, size)
		add(data, hole, Data)
		off = hole
	}
	return ext, nil
}

// FlattenRawSparse writes the chain's guest view to w as a raw image without
// sending zeros: only Data extents are written, in ascending offset order
// (so a caller can hash or count in stream order, filling the gaps with
// zeros), and the file is given its full size: by Truncate(VirtualSize) when
// w has that method, else by writing the last sector even when it is zero.
// It returns the bytes written to w. w must start empty (holes read as zero).
// The chain is read by parallel workers in 4 MiB pieces (memory: workers + 2
// pieces), so decompression and remote reads overlap; writes stay in order.
func FlattenRawSparse(ctx context.Context, w io.WriterAt, c *Chain) (int64, error) {
	if c == nil {
		return 0, fmt.Errorf("qcow2: flatten: nil chain")
	}
	ext, err := c.Extents()
	if err != nil {
		return 0, fmt.Errorf("qcow2: flatten: %w", err)
	}
	vsize := c.VirtualSize()
	var written int64
	put := func(b []byte, off int64) error {
		n, err := w.WriteAt(b, off)
		written += int64(n)
		return err
	}
	// Pieces of the Data extents, read by parallel workers (decompression
	// and remote reads overlap), written strictly in order by this goroutine.
	type piece struct {
		off  int64
		buf  []byte
		done chan error
	}
	workers := wrWorkers()
	free := make(chan []byte, workers+2)
	for range cap(free) {
		// Pieces go to w as they were read: in huge pages, a direct
		// write (fsutil.DirectWriter) takes each in one or two requests.
		hb := fsutil.NewHugeBuffer(wrChunkBytes)
		defer hb.Free() // after g.Wait: nothing holds a piece any more
		free <- hb.Bytes()
	}
	jobs := make(chan *piece)
	order := make(chan *piece, cap(free))
	g, gctx := errgroup.WithContext(ctx)
	var dataEnd int64 // end of the last Data extent
	g.Go(func() error {
		defer close(order)
		defer close(jobs)
		for _, e := range ext {
			if e.Kind != Data {
				continue
			}
			for off := e.Offset; off < e.End(); {
				var buf []byte
				select {
				case buf = <-free:
				case <-gctx.Done():
					return gctx.Err()
				}
				pc := &piece{off: off, buf: buf[:min(int64(len(buf)), e.End()-off)], done: make(chan error, 1)}
				order <- pc // never blocks: at most cap(free) pieces exist
				select {
				case jobs <- pc:
				case <-gctx.Done():
					return gctx.Err()
				}
				off += int64(len(pc.buf))
			}
			dataEnd = e.End()
		}
		return nil
	})
	for range workers {
		g.Go(func() error {
			for pc := range jobs {
				pc.done <- wrReadFull(c, pc.buf, pc.off)
			}
			return nil
		})
	}
	g.Go(func() error {
		for pc := range order {
			select {
			case err := <-pc.done:
				if err != nil {
					return err
				}
			case <-gctx.Done():
				return gctx.Err()
			}
			if err := put(pc.buf, pc.off); err != nil {
				return err
			}
			free <- pc.buf[:cap(pc.buf)]
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return written, err
	}
	if dataEnd == vsize {
		return written, nil
	}
	if t, ok := w.(interface{ Truncate(int64) error }); ok {
		return written, t.Truncate(vsize)
	}
	// Zeros after the last data only, so the ascending order holds.
	start := max(dataEnd, vsize-512)
	return written, put(make([]byte, vsize-start), start)
}

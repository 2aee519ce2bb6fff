package qcow2

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
)

// ErrNotNormalized: the bytes of an image are not what Normalize writes
// for its content with the given options.
var ErrNotNormalized = errors.New("qcow2: image is not in the writer's canonical form")

// canonProbe is how many leading bytes of a data cluster CheckNormalized
// reads to learn that it is not all zeros; only a cluster that starts
// with that many zeros is read whole.
const canonProbe = 4096

// ZeroMap knows, from a record made while an image's bytes were written,
// whether host bytes [off, off+n) are all zeros; known is false when it
// cannot tell.
type ZeroMap interface {
	AllZero(off, n int64) (zero, known bool)
}

// CheckNormalized reports whether r, the size bytes src was opened from,
// is byte for byte what Normalize(ctx, w, src, opts) writes; if not, the
// error wraps ErrNotNormalized. It gives the same verdict as re-encoding
// and comparing, at a fraction of the reads:
//
// Without compression the writer's output is its metadata (header, L1,
// refcounts, L2 tables), then the plain data clusters, in guest order.
// The metadata is computed (the layout needs only which data clusters are
// all zeros, learnt from their first bytes) and compared with r's. Once
// it is equal, src's own L2 tables are the canonical ones, so each data
// cluster src reads is read from exactly the host offset the writer puts
// it at: the data area equals the writer's by construction and is not
// read again (but for the zeros past the virtual size in a last, partial
// cluster, which src never reads). zeros, if not nil, answers whether a
// data cluster is all zeros without reading it (a cluster it does not
// know is read).
//
// With compression every cluster's stored form depends on its bytes (is
// zstd's frame of it short enough, and which frame), so the layer is
// re-encoded and compared with r, byte for byte. The encoding is done
// once: the scan pass, which encodes every cluster to learn its size,
// also compares each frame with the one src stores for that cluster, and
// the write pass takes the stored frames found equal instead of decoding
// and encoding them again (wrFrames).
func CheckNormalized(ctx context.Context, src *Image, r io.ReaderAt, size int64, opts WriteOptions, zeros ZeroMap) error {
	if src == nil {
		return fmt.Errorf("qcow2: check: nil image")
	}
	ext, err := src.Extents()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotNormalized, err)
	}
	vsize := src.VirtualSize()
	opts = normalizeOptions(ext, vsize, opts)
	opts.AssumeNoZeroData = false
	cw := &compareWriter{r: r, size: size}
	if opts.Compress {
		p, err := wrNewPlan(vsize, ext, opts)
		if err != nil {
			return err
		}
		p.frames = newWrFrames(src, r, p.nData)
		n, err := p.write(ctx, cw, src, false)
		if err != nil {
			return err
		}
		if n != size {
			return fmt.Errorf("%w: %d bytes re-encode to %d", ErrNotNormalized, size, n)
		}
		return nil
	}
	p, err := wrNewPlan(vsize, ext, opts)
	if err != nil {
		return err
	}
	if err := p.probeZeros(ctx, src, zeros); err != nil {
		return err
	}
	if err := p.layout(); err != nil {
		return err
	}
	if want := p.hostClusters * p.cs; size != want {
		return fmt.Errorf("%w: %d bytes, the canonical form of this content has %d", ErrNotNormalized, size, want)
	}
	bw := bufio.NewWriterSize(cw, wrBufBytes)
	if err := p.writeMetadata(ctx, bw); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	// Without compressed clusters the data area is the plain clusters,
	// back to back, up to the end: nothing is padded.
	if cw.pos != p.dataOff || p.dataOff+p.nPlain*p.cs != size {
		return fmt.Errorf("qcow2: check: internal error: metadata ends at %d (planned %d), %d plain clusters, %d bytes", cw.pos, p.dataOff, p.nPlain, size)
	}
	return p.checkTail(src, r)
}

// checkTail: the one part of a plain data cluster src does not read is
// what lies past the virtual size in the last cluster; the writer fills
// it with zeros.
func (p *wrPlan) checkTail(src *Image, r io.ReaderAt) error {
	tail := p.vsize & (p.cs - 1)
	if tail == 0 {
		return nil
	}
	gc := p.vsize >> p.cb
	e := src.entry(gc)
	host := int64(e & offsetMask)
	if host == 0 || e&entryCompressed != 0 {
		return nil // not stored plain: nothing of it is in the data area
	}
	b := make([]byte, p.cs-tail)
	if _, err := r.ReadAt(b, host+tail); err != nil {
		return fmt.Errorf("qcow2: check: reading at %d: %w", host+tail, err)
	}
	if !p.isZero(b) {
		return fmt.Errorf("%w: bytes past the virtual size in [%d, %d) are not zeros", ErrNotNormalized, host+tail, host+p.cs)
	}
	return nil
}

// normalizeOptions is the cluster size Normalize picks when opts leaves
// it to the layer's ranges (see Normalize).
func normalizeOptions(ext []Extent, vsize int64, opts WriteOptions) WriteOptions {
	if opts.ClusterBits == 0 && opts.BackingFile != "" {
		cb := wrDefaultClusterBits
		for cb > wrMinClusterBits && !wrAligned(ext, int64(1)<<cb, vsize) {
			cb--
		}
		opts.ClusterBits = cb
	}
	return opts
}

// probeZeros is the scan pass without compression: each data cluster is
// stored plain unless it is all zeros. zeros answers for the clusters src
// stores plain where it knows their host bytes; of the others, a cluster
// whose first canonProbe bytes are not all zeros is not; only the rest are
// read whole.
func (p *wrPlan) probeZeros(ctx context.Context, src *Image, zeros ZeroMap) error {
	p.sizes = make([]uint32, p.nData)
	buf := make([]byte, p.cs)
	probe := min(int64(canonProbe), p.cs)
	for _, r := range p.runs {
		if r.class != wrClassData {
			continue
		}
		for gc := r.start; gc < r.end; gc++ {
			if (gc-r.start)%1024 == 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			if zeros != nil {
				if zero, known := p.hostZeros(src, zeros, gc); known {
					if !zero {
						p.sizes[r.dataIdx+gc-r.start] = uint32(p.cs)
						p.nPlain++
					}
					continue
				}
			}
			head := buf[:probe]
			if err := p.fill(head, gc*p.cs, src); err != nil {
				return err
			}
			if p.isZero(head) {
				if err := p.fill(buf, gc*p.cs, src); err != nil {
					return err
				}
				if p.isZero(buf) {
					continue // size 0: left out
				}
			}
			p.sizes[r.dataIdx+gc-r.start] = uint32(p.cs)
			p.nPlain++
		}
	}
	return nil
}

// hostZeros asks zeros whether guest cluster gc reads as all zeros: for a
// cluster src stores plain, whose guest bytes (those before the virtual
// size) are its host bytes from the L2 entry's offset on.
func (p *wrPlan) hostZeros(src *Image, zeros ZeroMap, gc int64) (zero, known bool) {
	e := src.entry(gc)
	host := int64(e & offsetMask)
	if e&entryCompressed != 0 || e&entryZero != 0 || host == 0 || src.cs != p.cs {
		return false, false
	}
	return zeros.AllZero(host, min(p.cs, p.vsize-gc*p.cs))
}

// compareWriter compares what is written with r from offset 0 on; the
// first difference (or a byte past size) is ErrNotNormalized.
type compareWriter struct {
	r    io.ReaderAt
	size int64
	pos  int64
	buf  []byte
}

func (c *compareWriter) Write(p []byte) (int, error) {
	for done := 0; done < len(p); {
		n := min(len(p)-done, wrBufBytes)
		if c.pos+int64(n) > c.size {
			return done, fmt.Errorf("%w: the canonical form is longer than %d bytes", ErrNotNormalized, c.size)
		}
		if cap(c.buf) < n {
			c.buf = make([]byte, wrBufBytes)
		}
		b := c.buf[:n]
		if m, err := c.r.ReadAt(b, c.pos); m < n {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return done, fmt.Errorf("qcow2: check: reading at %d: %w", c.pos+int64(m), err)
		}
		if !bytes.Equal(b, p[done:done+n]) {
			return done, fmt.Errorf("%w: bytes differ in [%d, %d)", ErrNotNormalized, c.pos, c.pos+int64(n))
		}
		c.pos += int64(n)
		done += n
	}
	return len(p), nil
}

// wrFrames holds, for a re-encoding that checks an image (CheckNormalized),
// which data clusters the image stores as exactly the frame our encoder
// makes of their content: the scan pass, which encodes every cluster,
// compares (match); the write pass then reads those frames from the image
// (read) instead of encoding the clusters again. The verdict is the
// re-encoding's: a frame is reused only where it equals the encoding, and
// the write pass's output is still compared with the image byte for byte.
// A nil *wrFrames (a plain Write) matches nothing.
type wrFrames struct {
	src *Image
	r   io.ReaderAt
	at  []int64 // per data cluster (wrPlan.sizes' index): host offset of the equal frame, or -1
}

func newWrFrames(src *Image, r io.ReaderAt, nData int64) *wrFrames {
	at := make([]int64, nData)
	for i := range at {
		at[i] = -1
	}
	return &wrFrames{src: src, r: r, at: at}
}

// match compares frame, the encoding of guest cluster gc (data cluster
// idx), with the frame the image stores for gc, if it stores one.
// scratch is the caller's buffer for the read. Safe for concurrent use on
// distinct clusters.
func (f *wrFrames) match(gc, idx int64, frame []byte, scratch *[]byte) error {
	if f == nil {
		return nil
	}
	e := f.src.entry(gc)
	if e&entryCompressed == 0 {
		return nil
	}
	off, n := f.src.compressedRange(e)
	if end := off + uint64(len(frame)); uint64(len(frame)) > n || end > uint64(f.src.size) {
		return nil // a stored frame that short (or cut by the end of the file) is not this one
	}
	if cap(*scratch) < len(frame) {
		*scratch = make([]byte, len(frame), max(len(frame), int(f.src.cs)))
	}
	b := (*scratch)[:len(frame)]
	if err := wrReadFull(f.r, b, int64(off)); err != nil {
		return fmt.Errorf("qcow2: check: %w", err)
	}
	if bytes.Equal(b, frame) {
		f.at[idx] = int64(off)
	}
	return nil
}

// cover reports whether every cluster of c has an equal stored frame.
func (f *wrFrames) cover(c *wrChunk) bool {
	if f == nil {
		return false
	}
	for _, at := range f.at[c.dataIdx : c.dataIdx+c.n] {
		if at < 0 {
			return false
		}
	}
	return true
}

// read appends data cluster idx's stored frame, n bytes, to out.
func (f *wrFrames) read(out []byte, idx int64, n uint32) ([]byte, error) {
	start := len(out)
	out = slices.Grow(out, int(n))[:start+int(n)]
	if err := wrReadFull(f.r, out[start:], f.at[idx]); err != nil {
		return out[:start], fmt.Errorf("qcow2: check: %w", err)
	}
	return out, nil
}

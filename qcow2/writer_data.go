package qcow2

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"runtime"
	"sort"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"
)

// wrChunk is one unit of the scan and write pipelines: n consecutive guest
// clusters of one data run.
type wrChunk struct {
	first   int64 // guest cluster
	n       int64
	dataIdx int64
	in      []byte
	out     []byte
	scratch []byte // the scan pass's read of a stored frame (CheckNormalized)
	// spans[i] is cluster i's stored bytes within in or out (nil = left out).
	spans [][]byte
	done  chan struct{}
	err   error
}

// outCap leaves room for zstd's worst case on the chunk's last cluster.
func (p *wrPlan) outCap() int64 {
	return p.chunkClusters()*p.cs + p.cs/64 + 4096
}

func (p *wrPlan) chunkClusters() int64 {
	return max(1, wrChunkBytes/p.cs)
}

// eachChunk lists, in guest order, chunks of consecutive data clusters
// whose size (in p.sizes) passes keep; nil keeps all.
func (p *wrPlan) eachChunk(keep func(size uint32) bool, fn func(first, n, dataIdx int64) bool) {
	k := p.chunkClusters()
	for _, r := range p.runs {
		if r.class != wrClassData {
			continue
		}
		for c := r.start; c < r.end; {
			if keep != nil && !keep(p.sizes[r.dataIdx+c-r.start]) {
				c++
				continue
			}
			n := int64(1)
			for c+n < r.end && n < k && (keep == nil || keep(p.sizes[r.dataIdx+c+n-r.start])) {
				n++
			}
			if !fn(c, n, r.dataIdx+c-r.start) {
				return
			}
			c += n
		}
	}
}

func wrWorkers() int {
	return max(1, min(runtime.GOMAXPROCS(0), 8))
}

func (p *wrPlan) isZero(b []byte) bool {
	return bytes.Equal(b, p.zero[:len(b)])
}

func wrNewEncoder() (*zstd.Encoder, error) {
	return zstd.NewWriter(nil,
		zstd.WithEncoderConcurrency(1),
		zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderCRC(false),
		zstd.WithLowerEncoderMem(true))
}

// fill reads guest bytes [off, off+len(buf)) of the layer into buf: Data
// extents from data, anything else as zeros.
func (p *wrPlan) fill(buf []byte, off int64, data io.ReaderAt) error {
	end := off + int64(len(buf))
	i := sort.Search(len(p.extents), func(i int) bool { return p.extents[i].End() > off })
	pos := off
	for ; i < len(p.extents) && p.extents[i].Offset < end; i++ {
		e := p.extents[i]
		if e.Kind != Data {
			continue
		}
		s, t := max(e.Offset, off), min(e.End(), end)
		clear(buf[pos-off : s-off])
		if err := wrReadFull(data, buf[s-off:t-off], s); err != nil {
			return err
		}
		pos = t
	}
	clear(buf[pos-off:])
	return nil
}

func wrReadFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("qcow2: write: reading source at %d: %w", off+int64(n), err)
}

// process reads a chunk and decides each cluster's stored form. In the scan
// pass (verify=false) it records sizes; in the write pass it checks that the
// source still agrees and fills spans.
func (p *wrPlan) process(c *wrChunk, data io.ReaderAt, enc *zstd.Encoder, verify bool) error {
	in := c.in[:c.n*p.cs]
	c.out = c.out[:0]
	c.spans = c.spans[:0]
	if verify && p.frames.cover(c) {
		// Every cluster's frame was found equal to its encoding by the
		// scan pass: the stored frames are the encodings.
		for i := int64(0); i < c.n; i++ {
			start := len(c.out)
			var err error
			if c.out, err = p.frames.read(c.out, c.dataIdx+i, p.sizes[c.dataIdx+i]); err != nil {
				return err
			}
			c.spans = append(c.spans, c.out[start:])
		}
		return nil
	}
	if err := p.fill(in, c.first*p.cs, data); err != nil {
		return err
	}
	for i := int64(0); i < c.n; i++ {
		clus := in[i*p.cs : (i+1)*p.cs]
		size := &p.sizes[c.dataIdx+i]
		var got uint32
		var span []byte
		switch {
		case p.isZero(clus):
		case !p.compress || (verify && int64(*size) == p.cs):
			got, span = uint32(p.cs), clus
		default:
			start := len(c.out)
			c.out = enc.EncodeAll(clus, c.out)
			// Compress only what saves at least 1/16 of a cluster: the rest
			// would cost decompression on every read for little gain.
			if n := int64(len(c.out) - start); n <= p.cs-p.cs/16 {
				got, span = uint32(n), c.out[start:]
				if !verify {
					if err := p.frames.match(c.first+i, c.dataIdx+i, span, &c.scratch); err != nil {
						return err
					}
				}
			} else {
				c.out = c.out[:start]
				got, span = uint32(p.cs), clus
			}
		}
		if !verify {
			*size = got
		} else if *size != got {
			return p.mismatch(c.first+i, got)
		}
		c.spans = append(c.spans, span)
	}
	return nil
}

// scan is the first pass: zero detection and compressed sizes, in parallel.
func (p *wrPlan) scan(ctx context.Context, data io.ReaderAt) error {
	p.sizes = make([]uint32, p.nData)
	if p.nData == 0 {
		return nil
	}
	g, gctx := errgroup.WithContext(ctx)
	jobs := make(chan wrChunk)
	g.Go(func() error {
		defer close(jobs)
		var err error
		p.eachChunk(nil, func(first, n, idx int64) bool {
			select {
			case jobs <- wrChunk{first: first, n: n, dataIdx: idx}:
				return true
			case <-gctx.Done():
				err = gctx.Err()
				return false
			}
		})
		return err
	})
	for range wrWorkers() {
		g.Go(func() error {
			var enc *zstd.Encoder
			if p.compress {
				var err error
				if enc, err = wrNewEncoder(); err != nil {
					return err
				}
				defer enc.Close()
			}
			var buf, out, scratch []byte // made at the worker's first chunk
			for c := range jobs {
				if err := gctx.Err(); err != nil {
					return err
				}
				if buf == nil {
					buf = make([]byte, p.chunkClusters()*p.cs)
					if p.compress {
						out = make([]byte, 0, p.outCap())
					}
				}
				c.in, c.out, c.scratch = buf, out, scratch
				if err := p.process(&c, data, enc, false); err != nil {
					return err
				}
				out, scratch = c.out[:0], c.scratch // keep buffers that had to grow
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for _, n := range p.sizes {
		if int64(n) == p.cs {
			p.nPlain++
		}
	}
	return nil
}

// writeData is the second pass, in host order: the plain clusters, then
// the compressed ones (each read once more), then padding to a whole cluster.
func (p *wrPlan) writeData(ctx context.Context, w *bufio.Writer, data io.ReaderAt) error {
	pos := p.dataOff
	plain := func(n uint32) bool { return int64(n) == p.cs }
	compressed := func(n uint32) bool { return n != 0 && int64(n) < p.cs }
	for _, keep := range []func(uint32) bool{plain, compressed} {
		if p.nData == 0 {
			// No data clusters (an empty backup target): no phase
			// pipeline to start and wait for.
			break
		}
		if err := p.writePhase(ctx, w, data, keep, &pos); err != nil {
			return err
		}
	}
	end := p.hostClusters * p.cs
	if pos > end {
		return fmt.Errorf("qcow2: write: internal error: data ran to %d past the planned end %d", pos, end)
	}
	return p.pad(w, &pos, end)
}

func (p *wrPlan) pad(w io.Writer, pos *int64, to int64) error {
	z := p.zero
	for *pos < to {
		n, err := w.Write(z[:min(int64(len(z)), to-*pos)])
		*pos += int64(n)
		if err != nil {
			return err
		}
	}
	return nil
}

// writePhase reads and compresses the chunks keep selects with parallel
// workers, and writes them strictly in guest order from one goroutine.
func (p *wrPlan) writePhase(ctx context.Context, w *bufio.Writer, data io.ReaderAt, keep func(uint32) bool, pos *int64) error {
	workers := wrWorkers()
	// Chunk buffers (4 MiB each) are made as chunks need them, up to
	// cap(free): an image with few or no stored clusters (an empty
	// backup target) does not pay for the whole pipeline's memory.
	free := make(chan *wrChunk, workers+2)
	made := 0
	newChunk := func() *wrChunk {
		made++
		c := &wrChunk{in: make([]byte, p.chunkClusters()*p.cs)}
		if p.compress {
			c.out = make([]byte, 0, p.outCap())
		}
		return c
	}
	jobs := make(chan *wrChunk)
	order := make(chan *wrChunk, cap(free))
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(order)
		defer close(jobs)
		var err error
		p.eachChunk(keep, func(first, n, idx int64) bool {
			var c *wrChunk
			select {
			case c = <-free:
			default:
				if made < cap(free) {
					c = newChunk()
					break
				}
				select {
				case c = <-free:
				case <-gctx.Done():
					err = gctx.Err()
					return false
				}
			}
			c.first, c.n, c.dataIdx, c.err = first, n, idx, nil
			c.done = make(chan struct{})
			order <- c // never blocks: at most cap(free) chunks exist
			select {
			case jobs <- c:
				return true
			case <-gctx.Done():
				err = gctx.Err()
				return false
			}
		})
		return err
	})
	for range workers {
		g.Go(func() error {
			var enc *zstd.Encoder
			if p.compress {
				var err error
				if enc, err = wrNewEncoder(); err != nil {
					return err
				}
				defer enc.Close()
			}
			for c := range jobs {
				c.err = p.process(c, data, enc, true)
				close(c.done)
			}
			return nil
		})
	}
	g.Go(func() error {
		a := p.newAllocator()
		for c := range order {
			select {
			case <-c.done:
			case <-gctx.Done():
				return gctx.Err()
			}
			if c.err != nil {
				return c.err
			}
			if err := p.emit(w, a, c, pos); err != nil {
				return err
			}
			free <- c
		}
		return nil
	})
	return g.Wait()
}

// emit writes chunk c's spans at the offsets a places them. Spans adjacent
// both in memory and on the host go out as one write, which bufio passes
// straight through when it is large.
func (p *wrPlan) emit(w *bufio.Writer, a *wrAllocator, c *wrChunk, pos *int64) error {
	var run []byte
	var runOff int64
	flush := func() error {
		if err := p.pad(w, pos, runOff); err != nil {
			return err
		}
		n, err := w.Write(run)
		*pos += int64(n)
		return err
	}
	for _, span := range c.spans {
		off := p.dataOff + a.place(uint32(len(span)))
		if len(run) > 0 && off == runOff+int64(len(run)) && cap(run) > len(run) && &run[:len(run)+1][len(run)] == &span[0] {
			run = run[:len(run)+len(span)]
			continue
		}
		if len(run) > 0 {
			if err := flush(); err != nil {
				return err
			}
		}
		run, runOff = span, off
	}
	if len(run) > 0 {
		return flush()
	}
	return nil
}

// Package parallel moves byte ranges with several goroutines while keeping
// memory bounded: Copy for scatter copies, Prefetcher for a consumer that
// reads in a known order, and Do for "n tasks, at most workers at once".
package parallel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
)

// Range is a byte range [Offset, Offset+Length).
type Range struct{ Offset, Length int64 }

// DefaultChunk is used when chunk ≤ 0.
const DefaultChunk = 1 << 20

// Do runs fn(ctx, i) for i in [0, n) with at most workers running at once.
// The first error cancels the ctx passed to the others, stops new tasks from
// starting, and is returned; otherwise Do returns ctx's error if ctx ended
// before every task ran.
func Do(ctx context.Context, n, workers int, fn func(ctx context.Context, i int) error) error {
	if n <= 0 {
		return ctx.Err()
	}
	workers = max(1, min(workers, n))
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next, done atomic.Int64
		once       sync.Once
		first      error
		wg         sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			for cctx.Err() == nil {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				if err := fn(cctx, int(i)); err != nil {
					once.Do(func() { first = err })
					cancel()
					return
				}
				done.Add(1)
			}
		})
	}
	wg.Wait()
	if first != nil {
		return first
	}
	if done.Load() < int64(n) {
		return ctx.Err()
	}
	return nil
}

// plan maps chunk indexes to byte ranges without materialising one entry per
// chunk: memory is O(len(ranges)), not O(bytes/chunk).
type plan struct {
	ranges []Range
	chunk  int64
	first  []int // first[k] = index of the first chunk of ranges[k]; first[len] = total
	byOff  []int // range indexes sorted by offset
}

func newPlan(ranges []Range, chunk int64) (*plan, error) {
	if chunk <= 0 {
		chunk = DefaultChunk
	}
	p := &plan{ranges: ranges, chunk: chunk, first: make([]int, len(ranges)+1)}
	for k, r := range ranges {
		if r.Offset < 0 || r.Length < 0 {
			return nil, fmt.Errorf("parallel: invalid range %d+%d", r.Offset, r.Length)
		}
		p.first[k+1] = p.first[k] + int((r.Length+chunk-1)/chunk)
	}
	p.byOff = make([]int, 0, len(ranges))
	for k, r := range ranges {
		if r.Length > 0 {
			p.byOff = append(p.byOff, k)
		}
	}
	sort.SliceStable(p.byOff, func(i, j int) bool { return ranges[p.byOff[i]].Offset < ranges[p.byOff[j]].Offset })
	return p, nil
}

func (p *plan) total() int { return p.first[len(p.ranges)] }

// piece returns chunk i's byte range.
func (p *plan) piece(i int) Range {
	k := sort.Search(len(p.ranges), func(k int) bool { return p.first[k+1] > i })
	r := p.ranges[k]
	off := int64(i-p.first[k]) * p.chunk
	return Range{r.Offset + off, min(p.chunk, r.Length-off)}
}

// locate returns the chunk containing off, or (-1, start of the next planned
// range after off, or -1 if none).
func (p *plan) locate(off int64) (chunk int, next int64) {
	j := sort.Search(len(p.byOff), func(j int) bool { return p.ranges[p.byOff[j]].Offset > off })
	if j > 0 {
		k := p.byOff[j-1]
		if r := p.ranges[k]; off < r.Offset+r.Length {
			return p.first[k] + int((off-r.Offset)/p.chunk), 0
		}
	}
	if j < len(p.byOff) {
		return -1, p.ranges[p.byOff[j]].Offset
	}
	return -1, -1
}

// readFull reads exactly len(b) bytes at off.
func readFull(src io.ReaderAt, b []byte, off int64) error {
	n, err := src.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("parallel: read %d bytes at %d: %w", len(b), off, err)
}

// Copy reads ranges of src with workers goroutines, in chunks of at most
// chunk bytes, and writes each at the same offset of dst. Memory: workers ×
// chunk. The first error cancels the rest and is returned with the number of
// bytes written by then.
func Copy(ctx context.Context, dst io.WriterAt, src io.ReaderAt, ranges []Range, workers int, chunk int64) (int64, error) {
	pl, err := newPlan(ranges, chunk)
	if err != nil {
		return 0, err
	}
	var written atomic.Int64
	bufs := sync.Pool{New: func() any { b := make([]byte, pl.chunk); return &b }}
	err = Do(ctx, pl.total(), workers, func(ctx context.Context, i int) error {
		pc := pl.piece(i)
		bp := bufs.Get().(*[]byte)
		defer bufs.Put(bp)
		b := (*bp)[:pc.Length]
		if err := readFull(src, b, pc.Offset); err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := dst.WriteAt(b, pc.Offset); err != nil {
			return fmt.Errorf("parallel: write %d bytes at %d: %w", len(b), pc.Offset, err)
		}
		written.Add(pc.Length)
		return nil
	})
	return written.Load(), err
}

package parallel

import (
	"context"
	"fmt"
	"io"
	"sync"
)

// Split cuts ranges into pieces of at most chunk bytes (chunk ≤ 0:
// DefaultChunk), in order.
func Split(ranges []Range, chunk int64) []Range {
	if chunk <= 0 {
		chunk = DefaultChunk
	}
	var pieces []Range
	for _, r := range ranges {
		for off := r.Offset; off < r.Offset+r.Length; off += chunk {
			pieces = append(pieces, Range{Offset: off, Length: min(chunk, r.Offset+r.Length-off)})
		}
	}
	return pieces
}

// Buffers hands out reusable buffers, each as long as the largest of the
// pieces it was made for, so a fetched piece can be kept (or passed on)
// without a copy and returned once done with.
type Buffers struct{ pool sync.Pool }

// NewBuffers returns buffers for pieces.
func NewBuffers(pieces []Range) *Buffers {
	var size int64
	for _, p := range pieces {
		size = max(size, p.Length)
	}
	b := &Buffers{}
	b.pool.New = func() any { buf := make([]byte, size); return &buf }
	return b
}

// Get returns a buffer of the largest piece's length.
func (b *Buffers) Get() *[]byte { return b.pool.Get().(*[]byte) }

// Put returns a buffer for reuse.
func (b *Buffers) Put(bp *[]byte) { b.pool.Put(bp) }

// Sink takes fetched piece i (its bytes are (*bp)[:pieces[i].Length]). It
// keeps the buffer (returns true; it must Put it back later) or is done
// with it on return.
type Sink func(i int, bp *[]byte) (kept bool, err error)

// Fetch reads pieces of src with workers streams into buffers from bufs
// and hands each to sink. Workers take pieces in order, so what the sink
// sees grows roughly front to back. Memory: workers × the largest piece,
// plus what the sink keeps. The first error (a short read is one) cancels
// the rest and is returned. (Its wording names the usual src, a remote
// host, and the usual sink, a staging file.)
func Fetch(ctx context.Context, src io.ReaderAt, pieces []Range, workers int, bufs *Buffers, sink Sink) error {
	return Do(ctx, len(pieces), workers, func(ctx context.Context, i int) error {
		p := pieces[i]
		bp := bufs.Get()
		b := (*bp)[:p.Length]
		if _, err := io.ReadFull(io.NewSectionReader(src, p.Offset, p.Length), b); err != nil {
			bufs.Put(bp)
			return fmt.Errorf("reading host bytes [%d, +%d): %w", p.Offset, p.Length, err)
		}
		kept, err := sink(i, bp)
		if !kept {
			bufs.Put(bp)
		}
		if err != nil {
			return fmt.Errorf("staging: %w", err)
		}
		return ctx.Err()
	})
}

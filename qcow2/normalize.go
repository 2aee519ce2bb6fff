package qcow2

import (
	"context"
	"fmt"
	"io"
)

// Normalize re-encodes the clusters an untrusted layer allocates or zeroes into a canonical layer.
//
// Only src's Data and Zero ranges are carried over; its Unallocated ranges
// stay unallocated, and its own backing file name is ignored: the parent is
// whatever opts.BackingFile names. When opts.ClusterBits is 0 and the layer
// has a parent, the cluster size is the largest up to 64 KiB at which src's
// allocated ranges are whole clusters (a host delta with 4 KiB clusters may
// allocate 4 KiB pieces, which a 64 KiB cluster could not express without
// reading the parent).
func Normalize(ctx context.Context, w io.Writer, src *Image, opts WriteOptions) (int64, error) {
	if src == nil {
		return 0, fmt.Errorf("qcow2: normalize: nil image")
	}
	ext, err := src.Extents()
	if err != nil {
		return 0, fmt.Errorf("qcow2: normalize: %w", err)
	}
	vsize := src.VirtualSize()
	return Write(ctx, w, vsize, ext, src, normalizeOptions(ext, vsize, opts))
}

// wrAligned reports whether every boundary between an Unallocated range and
// an allocated (Data or Zero) one falls on a cluster boundary or at vsize.
func wrAligned(ext []Extent, cs, vsize int64) bool {
	alloc := func(k Kind) bool { return k != Unallocated }
	prev := Unallocated
	var pos int64
	for _, e := range ext {
		if e.Offset != pos { // a gap is unallocated
			if alloc(prev) && pos%cs != 0 {
				return false
			}
			prev = Unallocated
		}
		if alloc(e.Kind) != alloc(prev) && e.Offset%cs != 0 {
			return false
		}
		prev, pos = e.Kind, e.End()
	}
	return !alloc(prev) || pos%cs == 0 || pos == vsize
}

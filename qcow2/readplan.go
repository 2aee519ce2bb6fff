package qcow2

// LayerRange is a host byte range of one layer of a Chain (Layer indexes
// the chain top first, as NewChain took them).
type LayerRange struct {
	Layer int
	HostRange
}

// ReadPlan lists the host ranges that reading the chain's guest view front
// to back touches (what Flatten reads), in that order: for each guest
// range, the layer that provides it and the bytes of that layer read for
// it (a compressed cluster's whole run, clamped to the file). Consecutive
// ranges of one layer that touch or overlap are merged, so a remote reader
// can fetch them ahead, in the order they will be consumed, with few
// requests. Memory is one entry per change of layer or of host contiguity.
func (c *Chain) ReadPlan() []LayerRange {
	var out []LayerRange
	add := func(layer int, off, n int64) {
		if n <= 0 {
			return
		}
		if l := len(out); l > 0 {
			p := &out[l-1]
			if p.Layer == layer && off >= p.Offset && off <= p.Offset+p.Length {
				p.Length = max(p.Length, off+n-p.Offset)
				return
			}
		}
		out = append(out, LayerRange{Layer: layer, HostRange: HostRange{Offset: off, Length: n}})
	}
	for pos := int64(0); pos < c.size; {
		layer, _, span := c.resolve(pos, c.size-pos)
		if layer < 0 {
			pos += span
			continue
		}
		im := c.layers[layer]
		for end := pos + span; pos < end; {
			within := pos & (im.cs - 1)
			n := min(end-pos, im.cs-within)
			e := im.entry(pos >> im.cb)
			if e&entryCompressed != 0 {
				off, rn := im.compressedRange(e)
				rn = min(rn, uint64(im.size)-min(off, uint64(im.size)))
				add(layer, int64(off), int64(rn))
			} else {
				host := int64(e&offsetMask) + within
				add(layer, host, max(0, min(n, im.size-host)))
			}
			pos += n
		}
	}
	return out
}

package qcow2

import (
	"fmt"
	"io"
)

// Chain is the guest view of layers ordered top → base. The caller decides
// which image is each layer's parent (the store resolves parents by digest);
// backing file names inside the images are ignored.
type Chain struct {
	layers []*Image
	size   int64
}

// NewChain builds a chain from layers ordered top → base. All layers must
// have the same virtual size.
func NewChain(layers ...*Image) (*Chain, error) {
	if len(layers) == 0 {
		return nil, fmt.Errorf("qcow2: empty chain")
	}
	for i, l := range layers {
		if l == nil {
			return nil, fmt.Errorf("qcow2: chain layer %d is nil", i)
		}
		if l.VirtualSize() != layers[0].VirtualSize() {
			return nil, fmt.Errorf("%w: chain layer %d has virtual size %d, top layer has %d",
				ErrUnsupported, i, l.VirtualSize(), layers[0].VirtualSize())
		}
	}
	return &Chain{layers: append([]*Image(nil), layers...), size: layers[0].VirtualSize()}, nil
}

// VirtualSize is the guest disk size in bytes.
func (c *Chain) VirtualSize() int64 { return c.size }

// Layers returns the chain's layers, top first.
func (c *Chain) Layers() []*Image { return append([]*Image(nil), c.layers...) }

// resolve finds which layer provides guest offset off and for how many bytes
// (at most limit) that answer holds. layer is -1 when the range reads as zeros.
func (c *Chain) resolve(off, limit int64) (layer int, kind Kind, span int64) {
	span = limit
	for i, l := range c.layers {
		ex := extentAt(l.extents, off)
		span = min(span, ex.End()-off)
		switch ex.Kind {
		case Data:
			return i, Data, span
		case Zero:
			return -1, Zero, span
		}
	}
	return -1, Zero, span
}

// ReadAt reads the guest view of the chain: each byte comes from the topmost
// layer holding Data or Zero for it; bytes no layer allocates read as zeros.
func (c *Chain) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("qcow2: negative offset %d", off)
	}
	if off >= c.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > c.size-off {
		p = p[:c.size-off]
		eof = io.EOF
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		layer, _, span := c.resolve(pos, int64(len(p)-n))
		if layer < 0 {
			clear(p[n : n+int(span)])
		} else if m, err := c.layers[layer].ReadAt(p[n:n+int(span)], pos); m < int(span) {
			return n + m, err
		}
		n += int(span)
	}
	return n, eof
}

// Extents lists the chain's merged guest view: Data where some layer's data
// shows through, Zero elsewhere (zeroed or unallocated in every layer).
func (c *Chain) Extents() ([]Extent, error) {
	var out []Extent
	for pos := int64(0); pos < c.size; {
		layer, kind, span := c.resolve(pos, c.size-pos)
		if layer >= 0 {
			kind = Data
		}
		if l := len(out); l > 0 && out[l-1].Kind == kind {
			out[l-1].Length += span
		} else {
			out = append(out, Extent{Offset: pos, Length: span, Kind: kind})
		}
		pos += span
	}
	return out, nil
}

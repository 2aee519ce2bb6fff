// Package qcow2 reads untrusted qcow2 images and writes canonical qcow2 v3
// layers. It never opens a file named inside an image.
package qcow2

import "fmt"

// Kind says what a guest range holds at one layer.
type Kind uint8

const (
	// Unallocated ranges defer to the backing layer (or read as zeros at the base).
	Unallocated Kind = iota
	// Zero ranges read as zeros whatever the backing layer holds.
	Zero
	// Data ranges hold bytes stored in this layer.
	Data
)

func (k Kind) String() string {
	switch k {
	case Unallocated:
		return "unallocated"
	case Zero:
		return "zero"
	case Data:
		return "data"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Extent is a guest range [Offset, Offset+Length) of one Kind.
// Extent lists are sorted by Offset, non-overlapping, and adjacent extents
// of the same Kind are merged.
type Extent struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
	Kind   Kind  `json:"kind"`
}

// End is Offset+Length.
func (e Extent) End() int64 { return e.Offset + e.Length }

package qcow2

// Info carries the fields of `qemu-img info --output=json` that can be known
// from the image bytes alone, with the same JSON names.
type Info struct {
	VirtualSize           int64          `json:"virtual-size"`
	Format                string         `json:"format"` // always "qcow2"
	ClusterSize           int64          `json:"cluster-size"`
	ActualSize            int64          `json:"actual-size"` // file length given to Open (qemu reports disk usage)
	BackingFilename       string         `json:"backing-filename,omitempty"`
	BackingFilenameFormat string         `json:"backing-filename-format,omitempty"`
	DirtyFlag             bool           `json:"dirty-flag"`
	Snapshots             int            `json:"snapshots,omitempty"` // count only; snapshots are not read
	FormatSpecific        FormatSpecific `json:"format-specific"`
}

// FormatSpecific mirrors qemu's "format-specific" object for qcow2.
type FormatSpecific struct {
	Type string        `json:"type"` // "qcow2"
	Data Qcow2Specific `json:"data"`
}

// Qcow2Specific mirrors qemu's qcow2 "format-specific" data.
type Qcow2Specific struct {
	Compat          string `json:"compat"`           // "0.10" (v2) or "1.1" (v3)
	CompressionType string `json:"compression-type"` // "zlib" or "zstd"
	LazyRefcounts   bool   `json:"lazy-refcounts"`
	RefcountBits    int    `json:"refcount-bits"`
	Corrupt         bool   `json:"corrupt"`
	ExtendedL2      bool   `json:"extended-l2"`
}

// Info reports the image's qemu-img-info fields.
func (im *Image) Info() Info {
	h := im.h
	compat, ctype := "0.10", "zlib"
	if h.version == 3 {
		compat = "1.1"
	}
	if h.compressionType == compressionZstd {
		ctype = "zstd"
	}
	return Info{
		VirtualSize:           int64(h.size),
		Format:                "qcow2",
		ClusterSize:           im.cs,
		ActualSize:            im.size,
		BackingFilename:       h.backingFile,
		BackingFilenameFormat: h.backingFormat,
		DirtyFlag:             h.incompatible&incDirty != 0,
		Snapshots:             int(h.nbSnapshots),
		FormatSpecific: FormatSpecific{Type: "qcow2", Data: Qcow2Specific{
			Compat:          compat,
			CompressionType: ctype,
			LazyRefcounts:   h.compatible&1 != 0,
			RefcountBits:    1 << h.refcountOrder,
			Corrupt:         h.incompatible&incCorrupt != 0,
			ExtendedL2:      h.incompatible&incExtendedL2 != 0,
		}},
	}
}

// MapEntry is one entry of `qemu-img map --output=json` for this layer alone
// (depth 0): Present is false for unallocated ranges; Offset is the host
// offset of uncompressed data.
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
}

// Map lists this layer like `qemu-img map --output=json` on an image without
// backing file: entries are merged when their flags match and host offsets
// continue contiguously. Zero clusters with preallocated host space carry
// their offset, as in qemu.
func (im *Image) Map() []MapEntry {
	var out []MapEntry
	push := func(me MapEntry) {
		if l := len(out); l > 0 {
			p := &out[l-1]
			if p.Present == me.Present && p.Zero == me.Zero && p.Data == me.Data &&
				p.Start+p.Length == me.Start && (p.Offset == nil) == (me.Offset == nil) &&
				(p.Offset == nil || *p.Offset+p.Length == *me.Offset) {
				p.Length += me.Length
				return
			}
		}
		out = append(out, me)
	}
	for _, ex := range im.extents {
		if ex.Kind == Unallocated {
			push(MapEntry{Start: ex.Offset, Length: ex.Length, Zero: true})
			continue
		}
		for pos := ex.Offset; pos < ex.End(); {
			n := min(im.cs-pos&(im.cs-1), ex.End()-pos)
			e := im.entry(pos >> im.cb)
			me := MapEntry{Start: pos, Length: n, Present: true, Data: ex.Kind == Data, Zero: ex.Kind == Zero}
			if e&entryCompressed == 0 && e&offsetMask != 0 {
				h := int64(e&offsetMask) + pos&(im.cs-1)
				me.Offset = &h
			}
			push(me)
			pos += n
		}
	}
	return out
}

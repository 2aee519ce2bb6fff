package qcow2

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// Limits, all at or below QEMU's own (block/qcow2.h), so anything we accept
// QEMU accepts too, and a header cannot make us allocate more than these.
const (
	magic            = 0x514649fb // "QFI\xfb"
	minClusterBits   = 9
	maxClusterBits   = 21
	maxL1Bytes       = 32 << 20 // QCOW_MAX_L1_SIZE
	maxRefTableBytes = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	maxBackingName   = 1023     // QEMU's backing file name limit
	maxSnapshots     = 65536    // QCOW_MAX_SNAPSHOTS
	maxHostOffset    = 1 << 56  // offsets in tables have 56 bits at most
	v2HeaderLen      = 72
	v3HeaderLen      = 104
)

// Incompatible feature bits.
const (
	incDirty       = 1 << 0
	incCorrupt     = 1 << 1
	incDataFile    = 1 << 2
	incCompression = 1 << 3
	incExtendedL2  = 1 << 4
	incKnown       = incDirty | incCorrupt | incDataFile | incCompression | incExtendedL2
)

// Header extension types.
const (
	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureNames = 0x6803f857
	extBitmaps      = 0x23852875
	extEncryption   = 0x0537be77
	extDataFile     = 0x44415441
)

// Compression types (header byte 104).
const (
	compressionZlib = 0
	compressionZstd = 1
)

// header is the parsed, validated fixed header plus its extensions.
type header struct {
	version           int
	backingOffset     uint64
	backingSize       uint32
	clusterBits       uint32
	size              uint64
	cryptMethod       uint32
	l1Size            uint32
	l1Offset          uint64
	refTableOffset    uint64
	refTableClusters  uint32
	nbSnapshots       uint32
	snapshotsOffset   uint64
	incompatible      uint64
	compatible        uint64
	autoclear         uint64
	refcountOrder     uint32
	headerLength      uint32
	compressionType   uint8
	backingFile       string
	backingFormat     string
	featureNames      map[featureKey]string
	unknownExtensions int
}

type featureKey struct {
	kind uint8 // 0 incompatible, 1 compatible, 2 autoclear
	bit  uint8
}

func (h *header) clusterSize() int64 { return 1 << h.clusterBits }

// peekHeader parses just enough of the header to know how many bytes the
// full header cluster has: it returns the cluster size, or an error for
// bytes that are not qcow2 or that carry an impossible cluster size.
func peekHeader(b []byte) (int64, error) {
	if len(b) < 4 || binary.BigEndian.Uint32(b) != magic {
		return 0, ErrNotQcow2
	}
	if len(b) < 8 {
		return 0, formatErr("header", "truncated: %d bytes", len(b))
	}
	switch v := binary.BigEndian.Uint32(b[4:]); v {
	case 2, 3:
	case 1:
		return 0, unsupported("qcow version 1 (only qcow2 versions 2 and 3)")
	default:
		return 0, unsupported("qcow2 version %d", v)
	}
	if len(b) < v2HeaderLen {
		return 0, formatErr("header", "truncated: %d bytes, need %d", len(b), v2HeaderLen)
	}
	cb := binary.BigEndian.Uint32(b[20:])
	if cb < minClusterBits || cb > maxClusterBits {
		return 0, formatErr("cluster_bits", "%d outside %d..%d", cb, minClusterBits, maxClusterBits)
	}
	return 1 << cb, nil
}

// parseHeader parses and validates the header cluster. b holds the first
// cluster of the image (or the whole file when it is shorter than a cluster);
// fileSize is the image length, against which every offset is checked.
func parseHeader(b []byte, fileSize int64) (*header, error) {
	cs, err := peekHeader(b)
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > cs {
		b = b[:cs]
	}
	be := binary.BigEndian
	h := &header{
		version:          int(be.Uint32(b[4:])),
		backingOffset:    be.Uint64(b[8:]),
		backingSize:      be.Uint32(b[16:]),
		clusterBits:      be.Uint32(b[20:]),
		size:             be.Uint64(b[24:]),
		cryptMethod:      be.Uint32(b[32:]),
		l1Size:           be.Uint32(b[36:]),
		l1Offset:         be.Uint64(b[40:]),
		refTableOffset:   be.Uint64(b[48:]),
		refTableClusters: be.Uint32(b[56:]),
		nbSnapshots:      be.Uint32(b[60:]),
		snapshotsOffset:  be.Uint64(b[64:]),
		refcountOrder:    4,
		headerLength:     v2HeaderLen,
	}
	if h.version == 3 {
		if len(b) < v3HeaderLen {
			return nil, formatErr("header", "truncated: %d bytes, need %d for version 3", len(b), v3HeaderLen)
		}
		h.incompatible = be.Uint64(b[72:])
		h.compatible = be.Uint64(b[80:])
		h.autoclear = be.Uint64(b[88:])
		h.refcountOrder = be.Uint32(b[96:])
		h.headerLength = be.Uint32(b[100:])
		if h.headerLength < v3HeaderLen || h.headerLength%8 != 0 {
			return nil, formatErr("header_length", "%d: must be >= %d and a multiple of 8", h.headerLength, v3HeaderLen)
		}
		if int64(h.headerLength) > cs {
			return nil, formatErr("header_length", "%d exceeds the first cluster (%d bytes)", h.headerLength, cs)
		}
		if int64(h.headerLength) > int64(len(b)) {
			return nil, formatErr("header_length", "%d exceeds the file (%d bytes)", h.headerLength, len(b))
		}
		if h.headerLength > v3HeaderLen {
			h.compressionType = b[104]
		}
	}
	if err := h.validateFields(fileSize); err != nil {
		return nil, err
	}
	if err := h.parseExtensions(b); err != nil {
		return nil, err
	}
	if err := h.validateFeatures(); err != nil {
		return nil, err
	}
	if h.backingOffset != 0 {
		// validateFields has bounded the name inside the header cluster.
		end := h.backingOffset + uint64(h.backingSize)
		if end > uint64(len(b)) {
			return nil, formatErr("backing_file_offset", "name at %d+%d runs past the file", h.backingOffset, h.backingSize)
		}
		h.backingFile = string(b[h.backingOffset:end])
	}
	return h, nil
}

// tableRange checks a table of n bytes at off: cluster aligned, below 2^56,
// inside the file, without overflow.
func tableRange(field string, off, n uint64, cs, fileSize int64) error {
	if off%uint64(cs) != 0 {
		return formatErr(field, "offset %#x is not aligned to the cluster size %d", off, cs)
	}
	if off >= maxHostOffset {
		return formatErr(field, "offset %#x is beyond 2^56", off)
	}
	if n > maxHostOffset || off+n > uint64(fileSize) {
		return formatErr(field, "%d bytes at offset %#x run past the end of the file (%d bytes)", n, off, fileSize)
	}
	if off == 0 && n > 0 {
		return formatErr(field, "table overlaps the header at offset 0")
	}
	return nil
}

func (h *header) validateFields(fileSize int64) error {
	cs := h.clusterSize()
	if h.cryptMethod != 0 {
		return unsupported("encrypted image (crypt_method=%d)", h.cryptMethod)
	}
	if h.backingOffset != 0 {
		if h.backingSize == 0 || h.backingSize > maxBackingName {
			return formatErr("backing_file_size", "%d outside 1..%d", h.backingSize, maxBackingName)
		}
		if h.backingOffset >= uint64(cs) || h.backingOffset+uint64(h.backingSize) > uint64(cs) {
			return formatErr("backing_file_offset", "name at %d+%d is outside the header cluster (%d bytes)", h.backingOffset, h.backingSize, cs)
		}
		if h.backingOffset < uint64(h.headerLength) {
			return formatErr("backing_file_offset", "name at %d overlaps the %d-byte header", h.backingOffset, h.headerLength)
		}
	}
	if h.size > 1<<62 {
		return formatErr("size", "virtual size %d is absurd", h.size)
	}
	if uint64(h.l1Size)*8 > maxL1Bytes {
		return formatErr("l1_size", "%d entries (%d bytes) exceeds the %d-byte limit", h.l1Size, uint64(h.l1Size)*8, maxL1Bytes)
	}
	// The L1 table must cover the virtual size: each entry maps one L2 table.
	l2Entries := uint64(cs / 8)
	perL1 := l2Entries * uint64(cs)
	need := (h.size + perL1 - 1) / perL1
	if need > uint64(h.l1Size) {
		return formatErr("l1_size", "%d entries cannot map virtual size %d (need %d)", h.l1Size, h.size, need)
	}
	if h.l1Size > 0 {
		if err := tableRange("l1_table_offset", h.l1Offset, uint64(h.l1Size)*8, cs, fileSize); err != nil {
			return err
		}
	}
	if h.refTableClusters == 0 {
		return formatErr("refcount_table_clusters", "0: an image needs a refcount table")
	}
	rtBytes := uint64(h.refTableClusters) << h.clusterBits
	if rtBytes > maxRefTableBytes {
		return formatErr("refcount_table_clusters", "%d clusters (%d bytes) exceeds the %d-byte limit", h.refTableClusters, rtBytes, maxRefTableBytes)
	}
	if err := tableRange("refcount_table_offset", h.refTableOffset, rtBytes, cs, fileSize); err != nil {
		return err
	}
	if h.nbSnapshots > maxSnapshots {
		return formatErr("nb_snapshots", "%d exceeds %d", h.nbSnapshots, maxSnapshots)
	}
	if h.nbSnapshots > 0 {
		// Snapshots are not read; their table only has to lie inside the file.
		if err := tableRange("snapshots_offset", h.snapshotsOffset, 1, cs, fileSize); err != nil {
			return err
		}
	}
	if h.refcountOrder > 6 {
		return formatErr("refcount_order", "%d exceeds 6", h.refcountOrder)
	}
	return nil
}

func (h *header) validateFeatures() error {
	inc := h.incompatible
	if unknown := inc &^ incKnown; unknown != 0 {
		var names []string
		for bit := 0; bit < 64; bit++ {
			if unknown&(1<<bit) == 0 {
				continue
			}
			n := fmt.Sprintf("bit %d", bit)
			if name, ok := h.featureNames[featureKey{0, uint8(bit)}]; ok {
				n += fmt.Sprintf(" (%q)", name)
			}
			names = append(names, n)
		}
		return unsupported("unknown incompatible feature %s", strings.Join(names, ", "))
	}
	if inc&incDataFile != 0 {
		return unsupported("external data file (incompatible bit 2)")
	}
	if inc&incExtendedL2 != 0 {
		return unsupported("extended L2 entries / subclusters (incompatible bit 4)")
	}
	if inc&incCorrupt != 0 {
		return formatErr("incompatible_features", "corrupt bit set: QEMU found inconsistent metadata; repair with qemu-img check -r all")
	}
	if inc&incDirty != 0 {
		return unsupported("dirty bit set: refcounts may be stale; repair with qemu-img check -r all")
	}
	switch {
	case inc&incCompression != 0 && h.compressionType == compressionZlib:
		return formatErr("compression_type", "incompatible bit 3 is set but the type is zlib")
	case inc&incCompression == 0 && h.compressionType != compressionZlib:
		return formatErr("compression_type", "type %d without incompatible bit 3", h.compressionType)
	case h.compressionType > compressionZstd:
		return unsupported("compression type %d", h.compressionType)
	}
	return nil
}

// parseExtensions walks the header extensions that follow the header, up to
// the backing file name or the end of the header cluster, as QEMU does.
func (h *header) parseExtensions(b []byte) error {
	end := uint64(len(b))
	if h.backingOffset != 0 && h.backingOffset < end {
		end = h.backingOffset
	}
	be := binary.BigEndian
	for off := uint64(h.headerLength); off+8 <= end; {
		typ := be.Uint32(b[off:])
		n := uint64(be.Uint32(b[off+4:]))
		off += 8
		if typ == extEnd {
			return nil
		}
		if n > end-off {
			return formatErr("header extension", "type %#x: %d bytes at offset %d run past the header area (%d bytes)", typ, n, off, end)
		}
		data := b[off : off+n]
		switch typ {
		case extBackingFmt:
			h.backingFormat = string(data)
		case extFeatureNames:
			if n%48 != 0 {
				return formatErr("feature name table", "length %d is not a multiple of 48", n)
			}
			h.featureNames = make(map[featureKey]string, n/48)
			for e := uint64(0); e < n; e += 48 {
				name := data[e+2 : e+48]
				if i := strings.IndexByte(string(name), 0); i >= 0 {
					name = name[:i]
				}
				h.featureNames[featureKey{data[e], data[e+1]}] = string(name)
			}
		case extEncryption:
			return unsupported("encrypted image (full disk encryption header extension)")
		case extDataFile:
			return unsupported("external data file %q (header extension)", string(data))
		case extBitmaps:
			// Persistent dirty bitmaps do not change the guest view.
		default:
			h.unknownExtensions++
		}
		off += (n + 7) &^ 7
	}
	return nil
}

package qcow2

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"sync"
)

// Image is an opened qcow2 layer. All metadata is read and validated by Open;
// afterwards ReadAt only reads data clusters, so it is safe for concurrent use.
type Image struct {
	r    io.ReaderAt
	size int64 // file size
	h    *header

	cb       uint32 // cluster bits
	cs       int64  // cluster size
	l2Bits   uint32 // log2(entries per L2 table)
	l1       []uint64
	l2Index  []uint32 // per L1 entry: 0 = no table, else 1 + index into l2 tables
	l2Tables []uint64 // loaded L2 tables, concatenated

	extents   []Extent
	allocated int64

	cacheMu  sync.Mutex
	cacheIdx int64 // guest cluster held in cache, -1 if none
	cache    []byte

	// Decompressors not in use: whole-cluster reads inflate in parallel,
	// each with one of these (see inflate).
	decompMu sync.Mutex
	decomps  []*decompressor
}

// L1/L2 entry bits.
const (
	entryCopied     = 1 << 63
	entryCompressed = 1 << 62
	entryZero       = 1 << 0
	offsetMask      = 0x00fffffffffffe00 // bits 9..55
	l1Reserved      = 0x7f000000000001ff
	l2Reserved      = 0x3f000000000001fe // standard clusters
)

// Open validates an untrusted qcow2 image of size bytes read through r and
// loads its allocation tables. It never opens other files: the backing file
// name is only reported. Errors match ErrNotQcow2, ErrUnsupported or ErrFormat.
func Open(r io.ReaderAt, size int64) (*Image, error) {
	if size < 0 {
		return nil, fmt.Errorf("qcow2: negative image size %d", size)
	}
	first := make([]byte, min(size, v3HeaderLen+8))
	if err := readFull(r, first, 0); err != nil {
		return nil, err
	}
	cs, err := peekHeader(first)
	if err != nil {
		return nil, err
	}
	// The rest of the first cluster, after the bytes already read: each
	// byte is read once, so a caller checking what it reads (pull
	// -verify) checks the header that is parsed.
	buf := make([]byte, max(min(size, cs), int64(len(first))))
	n := copy(buf, first)
	if err := readFull(r, buf[n:], int64(n)); err != nil {
		return nil, err
	}
	h, err := parseHeader(buf, size)
	if err != nil {
		return nil, err
	}
	im := &Image{r: r, size: size, h: h, cb: h.clusterBits, cs: cs, l2Bits: h.clusterBits - 3, cacheIdx: -1}
	if err := im.loadTables(); err != nil {
		return nil, err
	}
	return im, nil
}

func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("qcow2: reading %d bytes at %d: %w", len(p), off, err)
}

func readTable(r io.ReaderAt, off int64, n uint64) ([]uint64, error) {
	buf := make([]byte, n*8)
	if err := readFull(r, buf, off); err != nil {
		return nil, err
	}
	t := make([]uint64, n)
	for i := range t {
		b := buf[i*8 : i*8+8]
		t[i] = uint64(b[0])<<56 | uint64(b[1])<<48 | uint64(b[2])<<40 | uint64(b[3])<<32 |
			uint64(b[4])<<24 | uint64(b[5])<<16 | uint64(b[6])<<8 | uint64(b[7])
	}
	return t, nil
}

// owners records every host cluster that must have exactly one owner
// (header, tables, standard data clusters) and the L2 entries of compressed
// clusters (whose runs may share host clusters among themselves, never with
// the former, and never start at the same byte). Both are flat slices of 8
// bytes per allocated cluster, so the check is bounded by the tables.
type owners struct {
	excl []uint64
	comp []uint64 // L2 entries of compressed clusters
}

// check sorts both lists and refuses a host cluster owned twice, a
// compressed run that starts where another does (qemu never shares
// compressed data; qemu-img check calls such an image corrupt), compressed
// data on a cluster owned otherwise, and compressed clusters that expand
// beyond the decompression budget (see MaxCompressionRatio).
func (o *owners) check(im *Image) error {
	slices.Sort(o.excl)
	for i := 1; i < len(o.excl); i++ {
		if o.excl[i] == o.excl[i-1] {
			return formatErr("cluster allocation", "host cluster %d is referenced twice", o.excl[i])
		}
	}
	offMask := uint64(1)<<(62-(im.cb-8)) - 1
	slices.SortFunc(o.comp, func(a, b uint64) int { return cmp.Compare(a&offMask, b&offMask) })
	var covered, coveredEnd uint64 // distinct host bytes the compressed runs span
	for i, e := range o.comp {
		off, n := im.compressedRange(e)
		end := min(off+n, uint64(im.size))
		if i > 0 && o.comp[i-1]&offMask == off {
			return formatErr("compressed cluster", "the compressed data at host offset %#x is referenced by more than one L2 entry (qemu never writes that; qemu-img check calls it corrupt)", off)
		}
		if end > coveredEnd {
			covered += end - max(off, coveredEnd)
			coveredEnd = end
		}
		first, last := off>>im.cb, (end-1)>>im.cb
		j := sort.Search(len(o.excl), func(j int) bool { return o.excl[j] >= first })
		if j < len(o.excl) && o.excl[j] <= last {
			return formatErr("compressed cluster", "host cluster %d holds compressed data and is also used as metadata or data", o.excl[j])
		}
	}
	out := uint64(len(o.comp)) << im.cb
	if budget := decompressBudget(covered); out > budget {
		return formatErr("compressed cluster", "%d compressed clusters inflate to %d bytes from %d bytes of compressed data, beyond the decompression budget of %d bytes (max(%d, %d × compressed bytes))",
			len(o.comp), out, covered, budget, MinDecompressBudget, MaxCompressionRatio)
	}
	return nil
}

// hostCluster validates a table entry's cluster offset: aligned, below 2^56
// and (when whole) inside the file.
func (im *Image) hostCluster(field string, off uint64, whole bool) error {
	if reason := im.clusterProblem(off, whole); reason != "" {
		return formatErr(field, "%s", reason)
	}
	return nil
}

// clusterProblem is hostCluster's check without the error (and so without
// an allocation per entry): "" when off is a valid cluster offset.
func (im *Image) clusterProblem(off uint64, whole bool) string {
	if off&uint64(im.cs-1) != 0 {
		return fmt.Sprintf("offset %#x is not aligned to the cluster size %d", off, im.cs)
	}
	if off >= maxHostOffset {
		return fmt.Sprintf("offset %#x is beyond 2^56", off)
	}
	end := off + 1
	if whole {
		end = off + uint64(im.cs)
	}
	if end > uint64(im.size) {
		return fmt.Sprintf("cluster at %#x runs past the end of the file (%d bytes)", off, im.size)
	}
	return ""
}

func (im *Image) loadTables() error {
	h := im.h
	var own owners
	own.excl = append(own.excl, 0) // the header cluster
	// L1 entries beyond the virtual size are ignored, as QEMU ignores them.
	perL1 := int64(1) << (im.l2Bits + im.cb)
	nL1 := uint64((int64(h.size) + perL1 - 1) / perL1)
	if h.l1Size > 0 {
		for c := h.l1Offset; c < h.l1Offset+uint64(h.l1Size)*8; c += uint64(im.cs) {
			own.excl = append(own.excl, c>>im.cb)
		}
	}
	if nL1 > 0 {
		l1, err := readTable(im.r, int64(h.l1Offset), nL1)
		if err != nil {
			return err
		}
		im.l1 = l1
	}
	// The refcount table is validated (it owns clusters) but never trusted:
	// reads follow L1/L2 alone.
	rtBytes := uint64(h.refTableClusters) << im.cb
	for c := h.refTableOffset; c < h.refTableOffset+rtBytes; c += uint64(im.cs) {
		own.excl = append(own.excl, c>>im.cb)
	}
	rt, err := readTable(im.r, int64(h.refTableOffset), rtBytes/8)
	if err != nil {
		return err
	}
	for i, e := range rt {
		if e == 0 {
			continue
		}
		if e&0x1ff != 0 {
			return formatErr("refcount table", "entry %d (%#x) has reserved bits set", i, e)
		}
		if err := im.hostCluster(fmt.Sprintf("refcount table entry %d", i), e, true); err != nil {
			return err
		}
		own.excl = append(own.excl, e>>im.cb)
	}
	rt = nil

	im.l2Index = make([]uint32, len(im.l1))
	entries := uint64(1) << im.l2Bits
	// The metadata budget is checked before any L2 table is read: the L1
	// table says how many there are.
	var tables uint64
	for i, e := range im.l1 {
		if e&l1Reserved != 0 {
			return formatErr("L1 table", "entry %d (%#x) has reserved bits set", i, e)
		}
		if e&offsetMask != 0 {
			tables++
		}
	}
	if need, budget := tables<<im.cb, MetadataBudget(int64(h.size)); need > uint64(budget) {
		return formatErr("L1 table", "%d L2 tables (%d bytes) exceed the metadata budget of %d bytes for virtual size %d (max(%d, virtual size / %d))",
			tables, need, budget, h.size, MinMetadataBudget, metadataBudgetDivisor)
	}
	im.l2Tables = make([]uint64, 0, tables*entries)
	buf := make([]byte, entries*8)
	for i, e := range im.l1 {
		off := e & offsetMask
		if off == 0 {
			continue
		}
		if err := im.hostCluster(fmt.Sprintf("L1 entry %d", i), off, true); err != nil {
			return err
		}
		own.excl = append(own.excl, off>>im.cb)
		if err := readFull(im.r, buf, int64(off)); err != nil {
			return err
		}
		base := uint64(len(im.l2Tables))
		for j := uint64(0); j < entries; j++ {
			e2 := binary.BigEndian.Uint64(buf[j*8:])
			if err := im.checkL2(uint64(i)<<im.l2Bits+j, e2); err != nil {
				return err
			}
			im.l2Tables = append(im.l2Tables, e2)
		}
		im.l2Index[i] = uint32((base >> im.l2Bits) + 1)
	}
	// Owners are gathered after the tables are checked, into slices sized
	// exactly (a growing slice would allocate several times its size).
	var nData, nComp int
	for _, e := range im.l2Tables {
		switch {
		case e&entryCompressed != 0:
			nComp++
		case e&offsetMask != 0:
			nData++
		}
	}
	own.excl = slices.Grow(own.excl, nData)
	own.comp = make([]uint64, 0, nComp)
	for _, e := range im.l2Tables {
		switch {
		case e&entryCompressed != 0:
			own.comp = append(own.comp, e)
		case e&offsetMask != 0:
			own.excl = append(own.excl, (e&offsetMask)>>im.cb)
		}
	}
	if err := own.check(im); err != nil {
		return err
	}
	im.buildExtents()
	return nil
}

// checkL2 validates one L2 entry of guest cluster gc (its owner is recorded
// later).
func (im *Image) checkL2(gc uint64, e uint64) error {
	if e&entryCompressed != 0 {
		off, n := im.compressedRange(e)
		if off == 0 || off >= maxHostOffset {
			return formatErr(l2Field(gc), "compressed data offset %#x is invalid", off)
		}
		if off >= uint64(im.size) {
			return formatErr(l2Field(gc), "compressed data at %#x starts past the end of the file (%d bytes)", off, im.size)
		}
		// QEMU rounds the run up to whole 512-byte sectors, so the last
		// compressed cluster may claim up to 511 bytes past EOF; no more.
		if off+n > uint64(im.size)+511 {
			return formatErr(l2Field(gc), "compressed run %#x+%d runs past the end of the file (%d bytes)", off, n, im.size)
		}
		return nil
	}
	if e&l2Reserved != 0 {
		return formatErr(l2Field(gc), "entry %#x has reserved bits set", e)
	}
	off := e & offsetMask
	if off == 0 {
		return nil
	}
	// A data cluster's tail may lie past EOF (QEMU reads it as zeros); its
	// start may not.
	if reason := im.clusterProblem(off, false); reason != "" {
		return formatErr(l2Field(gc), "%s", reason)
	}
	return nil
}

func l2Field(gc uint64) string { return fmt.Sprintf("L2 entry for guest cluster %d", gc) }

// maxIdleDecomps bounds the decompressors an Image keeps between reads.
const maxIdleDecomps = 8

// inflate decompresses guest cluster gc (compressed L2 entry e) into dst,
// one cluster long, with a decompressor no other read is using.
func (im *Image) inflate(dst []byte, gc int64, e uint64) error {
	im.decompMu.Lock()
	var dc *decompressor
	if k := len(im.decomps); k > 0 {
		dc, im.decomps = im.decomps[k-1], im.decomps[:k-1]
	} else {
		dc = &decompressor{}
	}
	im.decompMu.Unlock()
	defer func() {
		im.decompMu.Lock()
		if len(im.decomps) < maxIdleDecomps {
			im.decomps = append(im.decomps, dc)
		}
		im.decompMu.Unlock()
	}()
	off, n := im.compressedRange(e)
	n = min(n, uint64(im.size)-off)
	if uint64(cap(dc.src)) < n {
		dc.src = make([]byte, n)
	}
	src := dc.src[:n]
	if err := readFull(im.r, src, int64(off)); err != nil {
		return err
	}
	if err := dc.cluster(dst, src, im.h.compressionType); err != nil {
		return formatErr(fmt.Sprintf("compressed cluster for guest cluster %d", gc), "%v", err)
	}
	return nil
}

// compressedRange decodes a compressed L2 entry: host offset and the length
// of the sector-rounded run holding the compressed stream.
func (im *Image) compressedRange(e uint64) (off, n uint64) {
	x := 62 - (im.cb - 8)
	off = e & (1<<x - 1)
	sectors := (e >> x) & (1<<(im.cb-8) - 1)
	end := off&^511 + (sectors+1)*512
	return off, end - off
}

// entry returns the L2 entry for guest cluster gc (0 if unallocated).
func (im *Image) entry(gc int64) uint64 {
	i := gc >> im.l2Bits
	if i >= int64(len(im.l2Index)) || im.l2Index[i] == 0 {
		return 0
	}
	base := int64(im.l2Index[i]-1) << im.l2Bits
	return im.l2Tables[base+gc&(1<<im.l2Bits-1)]
}

func (im *Image) kindOf(e uint64) Kind {
	switch {
	case e&entryCompressed != 0:
		return Data
	case e&entryZero != 0:
		return Zero
	case e&offsetMask != 0:
		return Data
	}
	return Unallocated
}

func (im *Image) buildExtents() {
	vs := int64(im.h.size)
	var ext []Extent
	add := func(off, n int64, k Kind) {
		if n <= 0 {
			return
		}
		if k == Data {
			im.allocated += n
		}
		if l := len(ext); l > 0 && ext[l-1].Kind == k && ext[l-1].End() == off {
			ext[l-1].Length += n
			return
		}
		ext = append(ext, Extent{Offset: off, Length: n, Kind: k})
	}
	perL1 := int64(1) << (im.l2Bits + im.cb)
	for i := range im.l1 {
		start := int64(i) * perL1
		if im.l2Index[i] == 0 {
			add(start, min(perL1, vs-start), Unallocated)
			continue
		}
		for j := int64(0); j < 1<<im.l2Bits; j++ {
			off := start + j<<im.cb
			if off >= vs {
				break
			}
			add(off, min(im.cs, vs-off), im.kindOf(im.entry(off>>im.cb)))
		}
	}
	im.extents = ext
}

// VirtualSize is the guest disk size in bytes.
func (im *Image) VirtualSize() int64 { return int64(im.h.size) }

// ClusterSize is the cluster size in bytes.
func (im *Image) ClusterSize() int64 { return im.cs }

// Version is the qcow2 version, 2 or 3.
func (im *Image) Version() int { return im.h.version }

// BackingFile is the backing file name stored in the header. It is reported
// for the caller to resolve (or refuse); this package never opens it.
func (im *Image) BackingFile() string { return im.h.backingFile }

// BackingFormat is the backing format header extension ("" if absent).
func (im *Image) BackingFormat() string { return im.h.backingFormat }

// Extents lists this layer's guest ranges (like qemu-img map at depth 0):
// sorted, covering the virtual size, adjacent equal kinds merged.
// The returned slice is a copy.
func (im *Image) Extents() ([]Extent, error) {
	return append([]Extent(nil), im.extents...), nil
}

// AllocatedBytes is the number of guest bytes in Data extents.
func (im *Image) AllocatedBytes() int64 { return im.allocated }

// HostRange is a byte range of the image file.
type HostRange struct {
	Offset int64
	Length int64
}

// DataRanges lists the host byte ranges holding this layer's data clusters
// (compressed runs included, clamped to the file), sorted by host offset and
// merged where contiguous, so a remote reader can prefetch exactly them.
func (im *Image) DataRanges() []HostRange {
	var rs []HostRange
	for i := range im.l1 {
		if im.l2Index[i] == 0 {
			continue
		}
		base := int64(im.l2Index[i]-1) << im.l2Bits
		for _, e := range im.l2Tables[base : base+1<<im.l2Bits] {
			var off, n uint64
			switch {
			case e&entryCompressed != 0:
				off, n = im.compressedRange(e)
			case e&entryZero != 0 || e&offsetMask == 0:
				continue
			default:
				off, n = e&offsetMask, uint64(im.cs)
			}
			end := min(off+n, uint64(im.size))
			rs = append(rs, HostRange{Offset: int64(off), Length: int64(end - off)})
		}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].Offset < rs[j].Offset })
	out := rs[:0]
	for _, r := range rs {
		if l := len(out); l > 0 && out[l-1].Offset+out[l-1].Length >= r.Offset {
			// Compressed runs may share a sector; merge overlaps too.
			if e := r.Offset + r.Length; e > out[l-1].Offset+out[l-1].Length {
				out[l-1].Length = e - out[l-1].Offset
			}
			continue
		}
		out = append(out, r)
	}
	return out
}

// extentAt returns the extent containing guest offset off (off < VirtualSize).
func extentAt(ext []Extent, off int64) Extent {
	i := sort.Search(len(ext), func(i int) bool { return ext[i].End() > off })
	return ext[i]
}

// ReadAt reads the guest view of this layer alone: Unallocated and Zero
// ranges read as zeros. Reads past the virtual size return io.EOF.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("qcow2: negative offset %d", off)
	}
	vs := im.VirtualSize()
	if off >= vs {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > vs-off {
		p = p[:vs-off]
		eof = io.EOF
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		ex := extentAt(im.extents, pos)
		span := min(int64(len(p)-n), ex.End()-pos)
		if ex.Kind != Data {
			clear(p[n : n+int(span)])
			n += int(span)
			continue
		}
		// Data: one cluster, or a run of clusters contiguous on the host
		// (the common case for images qemu wrote), in one read.
		within := pos & (im.cs - 1)
		gc := pos >> im.cb
		run := min(span, im.cs-within)
		if e := im.entry(gc); e&entryCompressed == 0 {
			host := e & offsetMask
			for run < span {
				next := im.entry(gc + (within+run)>>im.cb)
				if next&entryCompressed != 0 || next&entryZero != 0 || next&offsetMask != host+uint64(within+run) {
					break
				}
				run = min(span, run+im.cs)
			}
		}
		if err := im.readCluster(p[n:n+int(run)], gc, within); err != nil {
			return n, err
		}
		n += int(run)
	}
	return n, eof
}

// readCluster fills p from guest cluster gc starting at byte within; for an
// uncompressed cluster p may extend over following host-contiguous clusters.
func (im *Image) readCluster(p []byte, gc, within int64) error {
	e := im.entry(gc)
	if e&entryCompressed != 0 {
		if within == 0 && int64(len(p)) == im.cs {
			// The whole cluster (a flatten's reads): straight into p.
			return im.inflate(p, gc, e)
		}
		im.cacheMu.Lock()
		defer im.cacheMu.Unlock()
		if im.cacheIdx != gc {
			if im.cache == nil {
				im.cache = make([]byte, im.cs)
			}
			im.cacheIdx = -1
			if err := im.inflate(im.cache, gc, e); err != nil {
				return err
			}
			im.cacheIdx = gc
		}
		copy(p, im.cache[within:])
		return nil
	}
	host := int64(e&offsetMask) + within
	// Bytes of the cluster past EOF read as zeros, as in QEMU.
	avail := max(0, min(int64(len(p)), im.size-host))
	if err := readFull(im.r, p[:avail], host); err != nil {
		return err
	}
	clear(p[avail:])
	return nil
}

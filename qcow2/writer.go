package qcow2

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"imagestore/internal/countio"
	"io"
)

// WriteOptions shape a canonical layer. The zero value gives 64 KiB clusters,
// no backing file and no compression.
type WriteOptions struct {
	ClusterBits int    // default 16 (64 KiB); 9..21
	BackingFile string // "" = standalone; sets backing_fmt=qcow2
	Compress    bool   // zstd-compressed clusters (incompatible bit 3)
	// AssumeNoZeroData skips the scan pass: data is read once, by a write
	// pass that fails with ErrZeroData if a Data cluster is all zeros (see
	// prescan.go). For callers whose source is still arriving, so that the
	// write overlaps the transfer. Not with Compress.
	AssumeNoZeroData bool
}

// ErrSourceChanged means the data read in Write's second pass differed from
// the first pass; the layout was already committed, so the output is unusable.
var ErrSourceChanged = errors.New("qcow2: source data changed while writing")

const (
	wrDefaultClusterBits = 16
	wrMinClusterBits     = 9
	wrMaxClusterBits     = 21
	wrRefcountOrder      = 4 // 16-bit refcounts
	wrMaxRefcount        = 1<<16 - 1
	wrHeaderLength       = 112 // v3 header with the compression_type byte, padded to 8
	wrMaxL1Bytes         = 32 << 20
	wrMaxBackingName     = 1023

	wrOflagCopied     = uint64(1) << 63
	wrOflagCompressed = uint64(1) << 62
	wrOflagZero       = uint64(1)

	wrExtBackingFormat    = 0xe2792aca
	wrIncompatCompression = uint64(1) << 3
	wrCompressionZstd     = 1

	// wrChunkBytes is the unit of reading, compressing and writing: large
	// enough for sequential I/O, small enough that memory stays flat.
	wrChunkBytes = 4 << 20
	wrBufBytes   = 1 << 20
)

// Cluster classes of the input, before zero detection.
const (
	wrClassZero uint8 = 1
	wrClassData uint8 = 2
)

// Final L2 entry kinds.
const (
	wrEntryZero uint8 = iota + 1
	wrEntryPlain
	wrEntryCompressed
)

// wrRun is a range of guest clusters [start, end) of one class; for data
// runs, dataIdx indexes the first cluster's slot in wrPlan.sizes.
type wrRun struct {
	start, end int64
	class      uint8
	dataIdx    int64
}

// wrPlan is the complete layout of the output, computed before any byte is
// written so that the image can be streamed front to back.
type wrPlan struct {
	zero     []byte // one cluster of zeros: what isZero compares with and pad writes
	cb       uint
	cs       int64
	vsize    int64
	delta    bool
	compress bool
	backing  string
	extents  []Extent
	runs     []wrRun
	// sizes holds, per data-class cluster in guest order: 0 = all zeros
	// (left out), cs = stored plain, otherwise the zstd frame length.
	sizes   []uint32
	nData   int64
	nPlain  int64 // data clusters stored plain (size == cs)
	assumed bool  // sizes come from assumePlain, not a scan
	// frames is set when the plan re-encodes an image to check it
	// (CheckNormalized): the frames that image stores, by data cluster.
	frames *wrFrames

	l1Size                 int64
	l1Clusters, rtClusters int64
	rbClusters, l2Clusters int64
	l1Off, rtOff, rbOff    int64
	l2Off, dataOff         int64
	hostClusters           int64
}

// wrAllocator places stored clusters, replaying the same decisions in every
// pass so all passes agree on offsets. The data area holds the plain
// clusters first, in guest order, then the compressed clusters packed byte
// by byte in guest order (crossing host cluster boundaries as QEMU's own
// allocator does). Keeping the two apart means an isolated compressible
// cluster between plain ones still saves its space.
type wrAllocator struct {
	cs        int64
	plainCur  int64 // next plain cluster, relative to the data area
	cur       int64 // next compressed byte; starts after the last plain cluster
	lastClus  int64 // host cluster (relative) touched last by a compressed cluster
	lastCount int64 // how many compressed clusters touch lastClus
}

func (p *wrPlan) newAllocator() *wrAllocator {
	return &wrAllocator{cs: p.cs, cur: p.nPlain * p.cs, lastClus: -1}
}

// place returns the relative offset for a stored cluster of n bytes.
func (a *wrAllocator) place(n uint32) int64 {
	if int64(n) == a.cs {
		off := a.plainCur
		a.plainCur += a.cs
		return off
	}
	if a.cur%a.cs != 0 && a.lastClus == a.cur/a.cs && a.lastCount >= wrMaxRefcount {
		a.cur = (a.cur + a.cs - 1) / a.cs * a.cs // a 16-bit refcount would overflow
	}
	off := a.cur
	first := off / a.cs
	last := (wrSectorEnd(off, n) - 1) / a.cs
	if first == a.lastClus && last == first {
		a.lastCount++
	} else {
		a.lastClus, a.lastCount = last, 1
	}
	a.cur += int64(n)
	return off
}

// wrSectorEnd is the end of the byte range QEMU attributes to a compressed
// cluster of n bytes at off: it always covers whole 512-byte sectors.
func wrSectorEnd(off int64, n uint32) int64 {
	return (off + int64(n) - 1) | 511 + 1
}

// Write streams a qcow2 v3 image: Data extents are read from data, Zero extents get
// the zero flag (only when BackingFile != ""; otherwise left unallocated), all-zero
// Data clusters in a base layer are left unallocated. Never seeks backwards.
//
// data is read twice (a scan pass decides the layout, a second pass writes);
// the call fails with ErrSourceChanged if the two disagree. With
// opts.AssumeNoZeroData it is read once (see ErrZeroData). Concurrent ReadAt
// calls are made on data, as io.ReaderAt allows.
func Write(ctx context.Context, w io.Writer, virtualSize int64, extents []Extent, data io.ReaderAt, opts WriteOptions) (int64, error) {
	p, err := wrNewPlan(virtualSize, extents, opts)
	if err != nil {
		return 0, err
	}
	return p.write(ctx, w, data, opts.AssumeNoZeroData)
}

// write lays the image out (from a scan of data, or assuming no zero
// data) and writes it to w.
func (p *wrPlan) write(ctx context.Context, w io.Writer, data io.ReaderAt, assumeNoZeroData bool) (int64, error) {
	var err error
	if assumeNoZeroData {
		err = p.assumePlain()
	} else {
		err = p.scan(ctx, data)
	}
	if err != nil {
		return 0, err
	}
	if err := p.layout(); err != nil {
		return 0, err
	}
	cw := &countio.Writer{W: w}
	// The buffer need not exceed the image: an empty one is a few
	// clusters, and faulting in 1 MiB for it is most of its cost.
	bw := bufio.NewWriterSize(cw, int(min(wrBufBytes, p.hostClusters*p.cs)))
	if err := p.writeMetadata(ctx, bw); err != nil {
		return cw.N + int64(bw.Buffered()), err
	}
	if err := p.writeData(ctx, bw, data); err != nil {
		return cw.N + int64(bw.Buffered()), err
	}
	err = bw.Flush()
	return cw.N, err
}

func wrNewPlan(vsize int64, extents []Extent, opts WriteOptions) (*wrPlan, error) {
	cb := opts.ClusterBits
	if cb == 0 {
		cb = wrDefaultClusterBits
	}
	if cb < wrMinClusterBits || cb > wrMaxClusterBits {
		return nil, fmt.Errorf("qcow2: write: cluster bits %d outside %d..%d", cb, wrMinClusterBits, wrMaxClusterBits)
	}
	if vsize < 0 || vsize%512 != 0 {
		return nil, fmt.Errorf("qcow2: write: virtual size %d is not a non-negative multiple of 512", vsize)
	}
	if len(opts.BackingFile) > wrMaxBackingName {
		return nil, fmt.Errorf("qcow2: write: backing file name is %d bytes, limit %d", len(opts.BackingFile), wrMaxBackingName)
	}
	p := &wrPlan{
		zero:     make([]byte, int64(1)<<cb),
		cb:       uint(cb),
		cs:       int64(1) << cb,
		vsize:    vsize,
		delta:    opts.BackingFile != "",
		compress: opts.Compress,
		backing:  opts.BackingFile,
		extents:  extents,
	}
	if wrHeaderLength+p.extBytes()+int64(len(p.backing)) > p.cs {
		return nil, fmt.Errorf("qcow2: write: header and backing file name do not fit in a %d-byte cluster", p.cs)
	}
	nClusters := (vsize + p.cs - 1) >> p.cb
	epl := p.cs / 8
	p.l1Size = (nClusters + epl - 1) / epl
	if p.l1Size*8 > wrMaxL1Bytes {
		return nil, fmt.Errorf("qcow2: write: virtual size %d needs an L1 table over %d bytes", vsize, wrMaxL1Bytes)
	}
	if err := p.buildRuns(); err != nil {
		return nil, err
	}
	return p, nil
}

// buildRuns validates the extents and turns them into cluster runs.
func (p *wrPlan) buildRuns() error {
	var prevEnd int64
	ivStart, ivEnd := int64(-1), int64(-1) // current union of non-Unallocated extents
	closeInterval := func() error {
		if ivStart < 0 || !p.delta {
			return nil
		}
		// In a layer with a parent, a cluster cannot be part ours and part
		// the parent's without reading the parent, so ranges must be aligned.
		if ivStart%p.cs != 0 || (ivEnd%p.cs != 0 && ivEnd != p.vsize) {
			return fmt.Errorf("qcow2: write: range [%d, %d) is not aligned to the %d-byte cluster size of a layer with a backing file", ivStart, ivEnd, p.cs)
		}
		return nil
	}
	for i, e := range p.extents {
		if e.Length <= 0 || e.Offset < prevEnd || e.End() > p.vsize || e.End() < e.Offset {
			return fmt.Errorf("qcow2: write: extent %d [%d, +%d) is empty, unsorted, overlapping or past the virtual size %d", i, e.Offset, e.Length, p.vsize)
		}
		prevEnd = e.End()
		var class uint8
		switch e.Kind {
		case Unallocated:
			continue
		case Zero:
			class = wrClassZero
		case Data:
			class = wrClassData
		default:
			return fmt.Errorf("qcow2: write: extent %d has unknown kind %v", i, e.Kind)
		}
		if e.Offset != ivEnd {
			if err := closeInterval(); err != nil {
				return err
			}
			ivStart = e.Offset
		}
		ivEnd = e.End()
		p.addRun(e.Offset>>p.cb, (e.End()-1)>>p.cb+1, class)
	}
	if err := closeInterval(); err != nil {
		return err
	}
	for i := range p.runs {
		r := &p.runs[i]
		if r.class == wrClassData {
			r.dataIdx = p.nData
			p.nData += r.end - r.start
		}
	}
	return nil
}

// addRun appends clusters [c0, c1) of class; a cluster shared with the
// previous extent takes the stronger class (data over zero).
func (p *wrPlan) addRun(c0, c1 int64, class uint8) {
	if n := len(p.runs); n > 0 && p.runs[n-1].end > c0 {
		last := &p.runs[n-1]
		if class > last.class {
			last.end--
			if last.end == last.start {
				p.runs = p.runs[:n-1]
			}
		} else {
			c0 = last.end
		}
	}
	if c0 >= c1 {
		return
	}
	if n := len(p.runs); n > 0 && p.runs[n-1].end == c0 && p.runs[n-1].class == class {
		p.runs[n-1].end = c1
		return
	}
	p.runs = append(p.runs, wrRun{start: c0, end: c1, class: class})
}

func (p *wrPlan) extBytes() int64 {
	n := int64(8) // end-of-extensions marker
	if p.backing != "" {
		n += 8 + 8 // "qcow2" padded to 8
	}
	return n
}

// visit calls fn for every non-empty L2 entry in guest order, replaying the
// allocator; rel is the stored cluster's offset relative to the data area.
func (p *wrPlan) visit(fn func(gc int64, kind uint8, rel int64, n uint32) error) error {
	a := p.newAllocator()
	for _, r := range p.runs {
		if r.class == wrClassZero {
			if !p.delta {
				continue
			}
			for gc := r.start; gc < r.end; gc++ {
				if err := fn(gc, wrEntryZero, 0, 0); err != nil {
					return err
				}
			}
			continue
		}
		for gc := r.start; gc < r.end; gc++ {
			n := p.sizes[r.dataIdx+gc-r.start]
			var err error
			switch {
			case n == 0:
				if p.delta {
					err = fn(gc, wrEntryZero, 0, 0)
				}
			case int64(n) == p.cs:
				err = fn(gc, wrEntryPlain, a.place(n), n)
			default:
				err = fn(gc, wrEntryCompressed, a.place(n), n)
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// layout places the metadata: header, L1, refcount table, refcount blocks,
// L2 tables, then the data area.
func (p *wrPlan) layout() error {
	epl := p.cs / 8
	lastL1 := int64(-1)
	var dataEnd int64
	_ = p.visit(func(gc int64, kind uint8, rel int64, n uint32) error {
		if li := gc / epl; li != lastL1 {
			p.l2Clusters++
			lastL1 = li
		}
		if kind != wrEntryZero {
			dataEnd = max(dataEnd, rel+int64(n))
		}
		return nil
	})
	dataClusters := (dataEnd + p.cs - 1) / p.cs
	p.l1Clusters = (p.l1Size*8 + p.cs - 1) / p.cs
	rpb := p.cs / 2 // 16-bit refcounts per block
	fixed := 1 + p.l1Clusters + p.l2Clusters + dataClusters
	for {
		total := fixed + p.rtClusters + p.rbClusters
		rb := (total + rpb - 1) / rpb
		rt := (rb*8 + p.cs - 1) / p.cs
		if rb == p.rbClusters && rt == p.rtClusters {
			p.hostClusters = total
			break
		}
		p.rbClusters, p.rtClusters = rb, rt
	}
	p.l1Off = p.cs
	p.rtOff = p.l1Off + p.l1Clusters*p.cs
	p.rbOff = p.rtOff + p.rtClusters*p.cs
	p.l2Off = p.rbOff + p.rbClusters*p.cs
	p.dataOff = p.l2Off + p.l2Clusters*p.cs
	x := 62 - (p.cb - 8)
	if p.hostClusters*p.cs >= int64(1)<<x {
		return fmt.Errorf("qcow2: write: image of %d bytes exceeds the host offset range", p.hostClusters*p.cs)
	}
	return nil
}

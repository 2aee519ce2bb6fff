package qcow2

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sort"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"
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
	if opts.AssumeNoZeroData {
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
	cw := &wrCountWriter{w: w}
	bw := bufio.NewWriterSize(cw, wrBufBytes)
	if err := p.writeMetadata(ctx, bw); err != nil {
		return cw.n + int64(bw.Buffered()), err
	}
	if err := p.writeData(ctx, bw, data); err != nil {
		return cw.n + int64(bw.Buffered()), err
	}
	err = bw.Flush()
	return cw.n, err
}

type wrCountWriter struct {
	w io.Writer
	n int64
}

func (c *wrCountWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
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

func (p *wrPlan) writeMetadata(ctx context.Context, w *bufio.Writer) error {
	if err := p.writeHeader(w); err != nil {
		return err
	}
	if err := p.writeL1(w); err != nil {
		return err
	}
	if err := p.writeRefcounts(ctx, w); err != nil {
		return err
	}
	return p.writeL2(ctx, w)
}

func (p *wrPlan) writeHeader(w *bufio.Writer) error {
	h := make([]byte, p.cs)
	be := binary.BigEndian
	copy(h[0:4], "QFI\xfb")
	be.PutUint32(h[4:], 3)
	be.PutUint32(h[20:], uint32(p.cb))
	be.PutUint64(h[24:], uint64(p.vsize))
	be.PutUint32(h[36:], uint32(p.l1Size))
	be.PutUint64(h[40:], uint64(p.l1Off))
	be.PutUint64(h[48:], uint64(p.rtOff))
	be.PutUint32(h[56:], uint32(p.rtClusters))
	if p.compress {
		be.PutUint64(h[72:], wrIncompatCompression)
		h[104] = wrCompressionZstd
	}
	be.PutUint32(h[96:], wrRefcountOrder)
	be.PutUint32(h[100:], wrHeaderLength)
	off := wrHeaderLength
	if p.backing != "" {
		be.PutUint32(h[off:], wrExtBackingFormat)
		be.PutUint32(h[off+4:], 5)
		copy(h[off+8:], "qcow2")
		off += 16
	}
	off += 8 // end marker: type 0, length 0
	if p.backing != "" {
		be.PutUint64(h[8:], uint64(off))
		be.PutUint32(h[16:], uint32(len(p.backing)))
		copy(h[off:], p.backing)
	}
	_, err := w.Write(h)
	return err
}

func (p *wrPlan) writeL1(w *bufio.Writer) error {
	epl := p.cs / 8
	l1 := make([]byte, p.l1Clusters*p.cs)
	lastL1 := int64(-1)
	next := p.l2Off
	_ = p.visit(func(gc int64, _ uint8, _ int64, _ uint32) error {
		if li := gc / epl; li != lastL1 {
			binary.BigEndian.PutUint64(l1[li*8:], uint64(next)|wrOflagCopied)
			next += p.cs
			lastL1 = li
		}
		return nil
	})
	_, err := w.Write(l1)
	return err
}

func (p *wrPlan) writeRefcounts(ctx context.Context, w *bufio.Writer) error {
	rt := make([]byte, p.rtClusters*p.cs)
	for i := int64(0); i < p.rbClusters; i++ {
		binary.BigEndian.PutUint64(rt[i*8:], uint64(p.rbOff+i*p.cs))
	}
	if _, err := w.Write(rt); err != nil {
		return err
	}
	rpb := p.cs / 2
	block := make([]byte, p.cs)
	cur := int64(0) // index of the refcount block being filled
	var werr error
	advance := func(to int64) {
		for cur < to && werr == nil {
			if _, werr = w.Write(block); werr == nil {
				werr = ctx.Err()
			}
			clear(block)
			cur++
		}
	}
	inc := func(hc int64) {
		advance(hc / rpb)
		i := (hc % rpb) * 2
		binary.BigEndian.PutUint16(block[i:], binary.BigEndian.Uint16(block[i:])+1)
	}
	metaClusters := p.dataOff / p.cs
	for hc := int64(0); hc < metaClusters; hc++ {
		inc(hc)
	}
	// Host offsets rise within each region, and blocks are written in
	// order, so count the plain region, then the compressed one.
	for _, region := range []uint8{wrEntryPlain, wrEntryCompressed} {
		_ = p.visit(func(_ int64, kind uint8, rel int64, n uint32) error {
			if kind != region {
				return werr
			}
			for hc := rel / p.cs; hc <= (wrSectorEnd(rel, n)-1)/p.cs; hc++ {
				inc(metaClusters + hc)
			}
			return werr
		})
	}
	advance(p.rbClusters)
	return werr
}

func (p *wrPlan) writeL2(ctx context.Context, w *bufio.Writer) error {
	epl := p.cs / 8
	table := make([]byte, p.cs)
	lastL1 := int64(-1)
	flush := func() error {
		if lastL1 < 0 {
			return nil
		}
		_, err := w.Write(table)
		clear(table)
		if err == nil {
			err = ctx.Err()
		}
		return err
	}
	x := 62 - (p.cb - 8)
	err := p.visit(func(gc int64, kind uint8, rel int64, n uint32) error {
		if li := gc / epl; li != lastL1 {
			if err := flush(); err != nil {
				return err
			}
			lastL1 = li
		}
		var e uint64
		host := uint64(p.dataOff + rel)
		switch kind {
		case wrEntryZero:
			e = wrOflagZero
		case wrEntryPlain:
			e = host | wrOflagCopied
		case wrEntryCompressed:
			extra := uint64(wrSectorEnd(int64(host), n)-1)>>9 - host>>9
			e = wrOflagCompressed | extra<<x | host
		}
		binary.BigEndian.PutUint64(table[(gc%epl)*8:], e)
		return nil
	})
	if err != nil {
		return err
	}
	return flush()
}

// wrChunk is one unit of the scan and write pipelines: n consecutive guest
// clusters of one data run.
type wrChunk struct {
	first   int64 // guest cluster
	n       int64
	dataIdx int64
	in      []byte
	out     []byte
	// spans[i] is cluster i's stored bytes within in or out (nil = left out).
	spans [][]byte
	done  chan struct{}
	err   error
}

// outCap leaves room for zstd's worst case on the chunk's last cluster.
func (p *wrPlan) outCap() int64 {
	return p.chunkClusters()*p.cs + p.cs/64 + 4096
}

func (p *wrPlan) chunkClusters() int64 {
	return max(1, wrChunkBytes/p.cs)
}

// eachChunk lists, in guest order, chunks of consecutive data clusters
// whose size (in p.sizes) passes keep; nil keeps all.
func (p *wrPlan) eachChunk(keep func(size uint32) bool, fn func(first, n, dataIdx int64) bool) {
	k := p.chunkClusters()
	for _, r := range p.runs {
		if r.class != wrClassData {
			continue
		}
		for c := r.start; c < r.end; {
			if keep != nil && !keep(p.sizes[r.dataIdx+c-r.start]) {
				c++
				continue
			}
			n := int64(1)
			for c+n < r.end && n < k && (keep == nil || keep(p.sizes[r.dataIdx+c+n-r.start])) {
				n++
			}
			if !fn(c, n, r.dataIdx+c-r.start) {
				return
			}
			c += n
		}
	}
}

func wrWorkers() int {
	return max(1, min(runtime.GOMAXPROCS(0), 8))
}

func (p *wrPlan) isZero(b []byte) bool {
	return bytes.Equal(b, p.zero[:len(b)])
}

func wrNewEncoder() (*zstd.Encoder, error) {
	return zstd.NewWriter(nil,
		zstd.WithEncoderConcurrency(1),
		zstd.WithEncoderLevel(zstd.SpeedDefault),
		zstd.WithEncoderCRC(false),
		zstd.WithLowerEncoderMem(true))
}

// fill reads guest bytes [off, off+len(buf)) of the layer into buf: Data
// extents from data, anything else as zeros.
func (p *wrPlan) fill(buf []byte, off int64, data io.ReaderAt) error {
	end := off + int64(len(buf))
	i := sort.Search(len(p.extents), func(i int) bool { return p.extents[i].End() > off })
	pos := off
	for ; i < len(p.extents) && p.extents[i].Offset < end; i++ {
		e := p.extents[i]
		if e.Kind != Data {
			continue
		}
		s, t := max(e.Offset, off), min(e.End(), end)
		clear(buf[pos-off : s-off])
		if err := wrReadFull(data, buf[s-off:t-off], s); err != nil {
			return err
		}
		pos = t
	}
	clear(buf[pos-off:])
	return nil
}

func wrReadFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("qcow2: write: reading source at %d: %w", off+int64(n), err)
}

// process reads a chunk and decides each cluster's stored form. In the scan
// pass (verify=false) it records sizes; in the write pass it checks that the
// source still agrees and fills spans.
func (p *wrPlan) process(c *wrChunk, data io.ReaderAt, enc *zstd.Encoder, verify bool) error {
	in := c.in[:c.n*p.cs]
	if err := p.fill(in, c.first*p.cs, data); err != nil {
		return err
	}
	c.out = c.out[:0]
	c.spans = c.spans[:0]
	for i := int64(0); i < c.n; i++ {
		clus := in[i*p.cs : (i+1)*p.cs]
		size := &p.sizes[c.dataIdx+i]
		var got uint32
		var span []byte
		switch {
		case p.isZero(clus):
		case !p.compress || (verify && int64(*size) == p.cs):
			got, span = uint32(p.cs), clus
		default:
			start := len(c.out)
			c.out = enc.EncodeAll(clus, c.out)
			// Compress only what saves at least 1/16 of a cluster: the rest
			// would cost decompression on every read for little gain.
			if n := int64(len(c.out) - start); n <= p.cs-p.cs/16 {
				got, span = uint32(n), c.out[start:]
			} else {
				c.out = c.out[:start]
				got, span = uint32(p.cs), clus
			}
		}
		if !verify {
			*size = got
		} else if *size != got {
			return p.mismatch(c.first+i, got)
		}
		c.spans = append(c.spans, span)
	}
	return nil
}

// scan is the first pass: zero detection and compressed sizes, in parallel.
func (p *wrPlan) scan(ctx context.Context, data io.ReaderAt) error {
	p.sizes = make([]uint32, p.nData)
	if p.nData == 0 {
		return nil
	}
	g, gctx := errgroup.WithContext(ctx)
	jobs := make(chan wrChunk)
	g.Go(func() error {
		defer close(jobs)
		var err error
		p.eachChunk(nil, func(first, n, idx int64) bool {
			select {
			case jobs <- wrChunk{first: first, n: n, dataIdx: idx}:
				return true
			case <-gctx.Done():
				err = gctx.Err()
				return false
			}
		})
		return err
	})
	for range wrWorkers() {
		g.Go(func() error {
			var enc *zstd.Encoder
			if p.compress {
				var err error
				if enc, err = wrNewEncoder(); err != nil {
					return err
				}
				defer enc.Close()
			}
			buf := make([]byte, p.chunkClusters()*p.cs)
			var out []byte
			if p.compress {
				out = make([]byte, 0, p.outCap())
			}
			for c := range jobs {
				if err := gctx.Err(); err != nil {
					return err
				}
				c.in, c.out = buf, out
				if err := p.process(&c, data, enc, false); err != nil {
					return err
				}
				out = c.out[:0] // keep a buffer that had to grow
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for _, n := range p.sizes {
		if int64(n) == p.cs {
			p.nPlain++
		}
	}
	return nil
}

// writeData is the second pass, in host order: the plain clusters, then
// the compressed ones (each read once more), then padding to a whole cluster.
func (p *wrPlan) writeData(ctx context.Context, w *bufio.Writer, data io.ReaderAt) error {
	pos := p.dataOff
	plain := func(n uint32) bool { return int64(n) == p.cs }
	compressed := func(n uint32) bool { return n != 0 && int64(n) < p.cs }
	for _, keep := range []func(uint32) bool{plain, compressed} {
		if err := p.writePhase(ctx, w, data, keep, &pos); err != nil {
			return err
		}
	}
	end := p.hostClusters * p.cs
	if pos > end {
		return fmt.Errorf("qcow2: write: internal error: data ran to %d past the planned end %d", pos, end)
	}
	return p.pad(w, &pos, end)
}

func (p *wrPlan) pad(w io.Writer, pos *int64, to int64) error {
	z := p.zero
	for *pos < to {
		n, err := w.Write(z[:min(int64(len(z)), to-*pos)])
		*pos += int64(n)
		if err != nil {
			return err
		}
	}
	return nil
}

// writePhase reads and compresses the chunks keep selects with parallel
// workers, and writes them strictly in guest order from one goroutine.
func (p *wrPlan) writePhase(ctx context.Context, w *bufio.Writer, data io.ReaderAt, keep func(uint32) bool, pos *int64) error {
	workers := wrWorkers()
	free := make(chan *wrChunk, workers+2)
	for range cap(free) {
		c := &wrChunk{in: make([]byte, p.chunkClusters()*p.cs)}
		if p.compress {
			c.out = make([]byte, 0, p.outCap())
		}
		free <- c
	}
	jobs := make(chan *wrChunk)
	order := make(chan *wrChunk, cap(free))
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(order)
		defer close(jobs)
		var err error
		p.eachChunk(keep, func(first, n, idx int64) bool {
			var c *wrChunk
			select {
			case c = <-free:
			case <-gctx.Done():
				err = gctx.Err()
				return false
			}
			c.first, c.n, c.dataIdx, c.err = first, n, idx, nil
			c.done = make(chan struct{})
			order <- c // never blocks: at most cap(free) chunks exist
			select {
			case jobs <- c:
				return true
			case <-gctx.Done():
				err = gctx.Err()
				return false
			}
		})
		return err
	})
	for range workers {
		g.Go(func() error {
			var enc *zstd.Encoder
			if p.compress {
				var err error
				if enc, err = wrNewEncoder(); err != nil {
					return err
				}
				defer enc.Close()
			}
			for c := range jobs {
				c.err = p.process(c, data, enc, true)
				close(c.done)
			}
			return nil
		})
	}
	g.Go(func() error {
		a := p.newAllocator()
		for c := range order {
			select {
			case <-c.done:
			case <-gctx.Done():
				return gctx.Err()
			}
			if c.err != nil {
				return c.err
			}
			// Spans adjacent both in memory and on the host go out as one
			// write, which bufio passes straight through when it is large.
			var run []byte
			var runOff int64
			flush := func() error {
				if err := p.pad(w, pos, runOff); err != nil {
					return err
				}
				n, err := w.Write(run)
				*pos += int64(n)
				return err
			}
			for _, span := range c.spans {
				off := p.dataOff + a.place(uint32(len(span)))
				if len(run) > 0 && off == runOff+int64(len(run)) && cap(run) > len(run) && &run[:len(run)+1][len(run)] == &span[0] {
					run = run[:len(run)+len(span)]
					continue
				}
				if len(run) > 0 {
					if err := flush(); err != nil {
						return err
					}
				}
				run, runOff = span, off
			}
			if len(run) > 0 {
				if err := flush(); err != nil {
					return err
				}
			}
			free <- c
		}
		return nil
	})
	return g.Wait()
}

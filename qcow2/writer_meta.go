package qcow2

import (
	"bufio"
	"context"
	"encoding/binary"
)

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

package qcow2

import (
	"errors"
	"fmt"
)

// ErrZeroData means a Write with WriteOptions.AssumeNoZeroData met a Data
// cluster that reads as all zeros. The output written so far is unusable;
// the caller writes again without the option (the source is unchanged, so
// the normal two-pass Write succeeds).
var ErrZeroData = errors.New("qcow2: all-zero data cluster in a layout that assumed none")

// assumePlain replaces the scan pass when opts.AssumeNoZeroData is set:
// every Data cluster is laid out stored plain, which is exactly the layout
// the scan would compute for a source without all-zero data clusters. The
// write pass still classifies each cluster as it reads it (process with
// verify) and fails with ErrZeroData on the first one the guess got wrong,
// so a successful Write is byte-identical to one without the option.
func (p *wrPlan) assumePlain() error {
	if p.compress {
		return fmt.Errorf("qcow2: write: AssumeNoZeroData cannot be combined with Compress (compressed sizes need the scan pass)")
	}
	p.assumed = true
	p.sizes = make([]uint32, p.nData)
	for i := range p.sizes {
		p.sizes[i] = uint32(p.cs)
	}
	p.nPlain = p.nData
	return nil
}

// mismatch is the error for a write-pass cluster whose stored form differs
// from the layout: a wrong guess under AssumeNoZeroData, else a source that
// changed between the passes.
func (p *wrPlan) mismatch(gc int64, got uint32) error {
	if p.assumed && got == 0 {
		return fmt.Errorf("%w: guest cluster %d", ErrZeroData, gc)
	}
	return fmt.Errorf("%w: guest cluster %d", ErrSourceChanged, gc)
}

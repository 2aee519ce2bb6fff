package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
	"sync"

	"github.com/opencontainers/go-digest"

	"imagestore/transfer/oci"
	"imagestore/transfer/parallel"
)

// layerHasher hashes a layer's blob, in order, from the ranges the pull
// reads through it anyway (the tables, then the read plan's pieces, which
// the prefetcher's workers fetch in roughly ascending order), so that
// -verify does not download what the flatten reads a second time. A range
// read ahead of the hashed prefix is kept (copied) until the prefix reaches
// it, up to maxAhead bytes; past that, the gap before it is read by the
// hasher itself. Once the read plan is known (setPlan), bytes before a kept
// range that no planned read covers (a base's clusters a delta overrides,
// tables our reader skips) are read for the hash at once instead of
// waiting. Finish reads what is left and checks the digest. Safe for
// concurrent ReadAt.
type layerHasher struct {
	r    io.ReaderAt // the blob, by ranges
	gaps io.ReaderAt // the same, for the hasher's own reads (rate-limited)
	d    digest.Digest
	size int64

	mu     sync.Mutex
	h      hash.Hash
	hashed int64
	ahead  map[int64][]byte // ranges past hashed, by offset
	nAhead int64
	plan   []parallel.Range // the reads to come, by offset (nil: not known yet)
	err    error            // a gap read that failed: Finish reports it
}

// maxAhead bounds the bytes a layerHasher keeps ahead of its prefix.
const maxAhead = 32 << 20

func newLayerHasher(r, gaps io.ReaderAt, d digest.Digest, size int64) *layerHasher {
	return &layerHasher{r: r, gaps: gaps, d: d, size: size, h: sha256.New(), ahead: map[int64][]byte{}}
}

func (l *layerHasher) ReadAt(p []byte, off int64) (int, error) {
	n, err := l.r.ReadAt(p, off)
	if n > 0 {
		l.observe(p[:n], off)
	}
	return n, err
}

// observe takes bytes b of the blob at off.
func (l *layerHasher) observe(b []byte, off int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	end := off + int64(len(b))
	if end <= l.hashed || l.err != nil {
		return
	}
	if off <= l.hashed {
		l.h.Write(b[l.hashed-off:])
		l.hashed = end
		l.drain()
		l.skipUnplanned()
		return
	}
	if have, ok := l.ahead[off]; ok && len(have) >= len(b) {
		return
	}
	if l.nAhead+int64(len(b)) > maxAhead {
		// Too far ahead: read the gap now and go on from b.
		if err := l.fill(off); err != nil {
			l.err = err
			return
		}
		if end > l.hashed {
			l.h.Write(b[l.hashed-off:])
			l.hashed = end
		}
		l.drain()
		return
	}
	if have, ok := l.ahead[off]; ok {
		l.nAhead -= int64(len(have))
	}
	l.ahead[off] = append([]byte(nil), b...)
	l.nAhead += int64(len(b))
	l.skipUnplanned()
}

// setPlan tells the hasher which ranges of the blob will be read through
// it (the flatten's read plan for this layer).
func (l *layerHasher) setPlan(plan []parallel.Range) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.plan = slices.Clone(plan)
	slices.SortFunc(l.plan, func(a, b parallel.Range) int { return cmp.Compare(a.Offset, b.Offset) })
	l.skipUnplanned()
}

// skipUnplanned reads for the hash, while ranges are kept ahead, the bytes
// from the prefix up to the next planned or kept byte: no read will bring
// them.
func (l *layerHasher) skipUnplanned() {
	for l.plan != nil && len(l.ahead) > 0 && l.err == nil {
		next := l.size
		for off := range l.ahead {
			next = min(next, off)
		}
		i, _ := slices.BinarySearchFunc(l.plan, l.hashed, func(r parallel.Range, off int64) int {
			return cmp.Compare(r.Offset+r.Length, off+1)
		})
		if i < len(l.plan) {
			next = min(next, max(l.plan[i].Offset, l.hashed))
		}
		if next <= l.hashed {
			return // a planned read will bring the prefix on
		}
		if err := l.fill(next); err != nil {
			l.err = err
		}
	}
}

// drain hashes the kept ranges the prefix has reached.
func (l *layerHasher) drain() {
	for progress := true; progress; {
		progress = false
		for off, b := range l.ahead {
			end := off + int64(len(b))
			if off > l.hashed {
				continue
			}
			if end > l.hashed {
				l.h.Write(b[l.hashed-off:])
				l.hashed = end
			}
			delete(l.ahead, off)
			l.nAhead -= int64(len(b))
			progress = true
		}
	}
}

// fill hashes the blob's bytes from the prefix up to to, reading them
// (kept ranges are used as the prefix reaches them).
func (l *layerHasher) fill(to int64) error {
	buf := make([]byte, 4<<20)
	for l.hashed < to {
		n := min(int64(len(buf)), to-l.hashed)
		for off := range l.ahead { // stop at the next kept range
			if off > l.hashed && off < l.hashed+n {
				n = off - l.hashed
			}
		}
		k, err := l.gaps.ReadAt(buf[:n], l.hashed)
		if int64(k) < n {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		l.h.Write(buf[:n])
		l.hashed += n
		l.drain()
	}
	return nil
}

// Finish reads what was not read, and checks the digest.
func (l *layerHasher) Finish(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	if l.err == nil {
		l.err = l.fill(l.size)
	}
	if l.err != nil {
		return fmt.Errorf("verify %s: %w", l.d, l.err)
	}
	if got := digest.NewDigest(digest.SHA256, l.h); got != l.d {
		return fmt.Errorf("verify %s: %w: got %s", l.d, oci.ErrDigestInvalid, got)
	}
	return nil
}

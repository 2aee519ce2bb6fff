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
// -verify does not download what the flatten reads a second time.
//
// The reader whose range starts at the hashed prefix hashes it itself,
// from its own buffer (no copy, no goroutine): sha256 runs on the readers,
// one at a time, in blob order. A reader whose range lies ahead waits
// while the bytes before it are being read by others (ranges in flight
// through this hasher, or kept), since they will bring the prefix to it;
// a chain of waits always points to lower offsets, so the lowest reader
// proceeds. Otherwise its range is kept (copied) until the prefix reaches
// it, up to maxAhead bytes; past that, the gap before it is read by the
// hasher itself. Once the read plan is known (setPlan), bytes at the
// prefix that no planned read covers (a base's clusters a delta
// overrides, tables our reader skips) are read for the hash at once.
// Finish reads what is left and checks the digest. Safe for concurrent
// ReadAt.
type layerHasher struct {
	r    io.ReaderAt // the blob, by ranges
	gaps io.ReaderAt // the same, for the hasher's own reads (rate-limited)
	d    digest.Digest
	size int64

	mu       sync.Mutex
	cond     *sync.Cond // broadcast on every change of the fields below
	h        hash.Hash  // written only by the holder of busy
	busy     bool       // a reader is hashing or filling at the prefix
	hashed   int64      // the blob's bytes [0, hashed) are hashed
	inflight map[*parallel.Range]struct{}
	ahead    map[int64][]byte // ranges past hashed, by offset
	nAhead   int64
	plan     []parallel.Range // the reads to come, by offset (nil: not known yet)
	fillBuf  []byte
	closed   bool
	err      error // a gap read that failed: Finish reports it
}

// hashPiece is the size of the hasher's own reads.
const hashPiece = 1 << 20

// maxAhead bounds the bytes a layerHasher keeps ahead of its prefix.
const maxAhead = 16 << 20

func newLayerHasher(r, gaps io.ReaderAt, d digest.Digest, size int64) *layerHasher {
	l := &layerHasher{r: r, gaps: gaps, d: d, size: size, h: sha256.New(),
		inflight: map[*parallel.Range]struct{}{}, ahead: map[int64][]byte{}}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// Close stops the hashing (after Finish, or instead of it): readers no
// longer wait or hash.
func (l *layerHasher) Close() {
	l.mu.Lock()
	l.closed = true
	l.cond.Broadcast()
	l.mu.Unlock()
}

func (l *layerHasher) ReadAt(p []byte, off int64) (int, error) {
	tok := &parallel.Range{Offset: off, Length: int64(len(p))}
	l.mu.Lock()
	l.inflight[tok] = struct{}{}
	l.mu.Unlock()
	n, err := l.r.ReadAt(p, off)
	l.observe(p[:n], off, tok)
	return n, err
}

// observe takes bytes b of the blob at off, read under tok (which it
// retires).
func (l *layerHasher) observe(b []byte, off int64, tok *parallel.Range) {
	l.mu.Lock()
	defer l.mu.Unlock()
	defer l.cond.Broadcast()
	defer delete(l.inflight, tok)
	tok.Length = int64(len(b)) // what this read brings
	end := off + int64(len(b))
	for !l.closed && l.err == nil && end > l.hashed {
		switch {
		case l.busy:
			l.cond.Wait()
		case off <= l.hashed:
			l.busy = true
			l.hashLocked(b[l.hashed-off:])
			l.advanceLocked()
			l.release()
			return
		case l.fillUnplannedLocked(off):
			// The prefix moved over bytes no read will bring.
		case l.coveredLocked(off, tok):
			l.cond.Wait()
		case l.nAhead+int64(len(b)) <= maxAhead:
			if have, ok := l.ahead[off]; ok {
				if len(have) >= len(b) {
					return
				}
				l.nAhead -= int64(len(have))
			}
			l.ahead[off] = append([]byte(nil), b...)
			l.nAhead += int64(len(b))
			return
		default:
			// Too far ahead: read the gap now and go on from b.
			l.busy = true
			l.fillLocked(off)
			l.release()
		}
	}
}

// release ends a turn at the prefix. It wakes every waiter: one may have
// waited for busy alone, while the holder goes on to wait for it (the
// holder's range lies ahead of the waiter's, which is in flight), so a
// missed wake-up here would leave both waiting.
func (l *layerHasher) release() {
	l.busy = false
	l.cond.Broadcast()
}

// hashLocked hashes b, the blob's bytes at the prefix, with l.mu released;
// the caller holds busy.
func (l *layerHasher) hashLocked(b []byte) {
	l.mu.Unlock()
	l.h.Write(b)
	l.mu.Lock()
	l.hashed += int64(len(b))
}

// advanceLocked hashes the kept ranges the prefix has reached, and the
// unplanned bytes after them; the caller holds busy.
func (l *layerHasher) advanceLocked() {
	for l.err == nil {
		moved := false
		for off, b := range l.ahead {
			if off > l.hashed {
				continue
			}
			delete(l.ahead, off)
			l.nAhead -= int64(len(b))
			if end := off + int64(len(b)); end > l.hashed {
				l.hashLocked(b[l.hashed-off:])
			}
			moved = true
			break // the map may have changed while unlocked
		}
		if !moved {
			return
		}
	}
}

// sourcedLocked reports whether the byte at the prefix is coming: kept, or
// inside a read in flight.
func (l *layerHasher) sourcedLocked() bool {
	for off := range l.ahead {
		if off <= l.hashed {
			return true
		}
	}
	for r := range l.inflight {
		if r.Offset <= l.hashed && l.hashed < r.Offset+r.Length {
			return true
		}
	}
	return false
}

// fillUnplannedLocked reads for the hash the bytes from the prefix up to
// the next byte that is planned, kept, in flight, or at stop, if no read
// will bring them; it reports whether it moved the prefix.
func (l *layerHasher) fillUnplannedLocked(stop int64) bool {
	if l.plan == nil || l.sourcedLocked() {
		return false
	}
	next := stop
	i, _ := slices.BinarySearchFunc(l.plan, l.hashed, func(r parallel.Range, off int64) int {
		return cmp.Compare(r.Offset+r.Length, off+1)
	})
	if i < len(l.plan) {
		next = min(next, l.plan[i].Offset)
	}
	for off := range l.ahead {
		next = min(next, off)
	}
	for r := range l.inflight {
		if r.Offset > l.hashed {
			next = min(next, r.Offset)
		}
	}
	if next <= l.hashed {
		return false // a planned read will bring the prefix on
	}
	l.busy = true
	l.fillLocked(next)
	l.release()
	return true
}

// coveredLocked reports whether every byte from the prefix to off is kept
// or inside a read in flight other than self.
func (l *layerHasher) coveredLocked(off int64, self *parallel.Range) bool {
	pos := l.hashed
	for pos < off {
		ext := pos
		for o, b := range l.ahead {
			if o <= pos {
				ext = max(ext, o+int64(len(b)))
			}
		}
		for r := range l.inflight {
			if r != self && r.Offset <= pos {
				ext = max(ext, r.Offset+r.Length)
			}
		}
		if ext <= pos {
			return false
		}
		pos = ext
	}
	return true
}

// setPlan tells the hasher which ranges of the blob will be read through
// it (the flatten's read plan for this layer).
func (l *layerHasher) setPlan(plan []parallel.Range) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.plan = slices.Clone(plan)
	slices.SortFunc(l.plan, func(a, b parallel.Range) int { return cmp.Compare(a.Offset, b.Offset) })
	l.cond.Broadcast()
}

// fillLocked hashes the blob's bytes from the prefix up to to, reading
// them (kept ranges are used as the prefix reaches them); the caller holds
// busy. l.mu is released during the reads; Close stops it between them.
func (l *layerHasher) fillLocked(to int64) {
	for l.err == nil && !l.closed && l.hashed < to {
		n := min(hashPiece, to-l.hashed)
		for off := range l.ahead { // stop at the next kept range
			if off > l.hashed && off < l.hashed+n {
				n = off - l.hashed
			}
		}
		if l.fillBuf == nil {
			l.fillBuf = make([]byte, hashPiece)
		}
		buf, at := l.fillBuf[:n], l.hashed
		l.mu.Unlock()
		k, err := l.gaps.ReadAt(buf, at)
		l.mu.Lock()
		if int64(k) < n {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			l.err = err
			return
		}
		l.hashLocked(buf)
		l.advanceLocked()
	}
}

// Finish reads what was not read, and checks the digest.
func (l *layerHasher) Finish(ctx context.Context) error {
	l.mu.Lock()
	for l.busy {
		l.cond.Wait()
	}
	if err := ctx.Err(); err != nil {
		l.mu.Unlock()
		return err
	}
	if l.err == nil && l.closed {
		l.err = errors.New("hasher closed")
	}
	if l.err == nil {
		l.busy = true
		l.fillLocked(l.size)
		l.release()
		if l.err == nil && l.hashed < l.size {
			l.err = errors.New("hasher closed") // by Close, during the fill
		}
	}
	err := l.err
	l.closed = true
	l.cond.Broadcast()
	l.mu.Unlock()
	if err != nil {
		return fmt.Errorf("verify %s: %w", l.d, err)
	}
	if got := digest.NewDigest(digest.SHA256, l.h); got != l.d {
		return fmt.Errorf("verify %s: %w: got %s", l.d, oci.ErrDigestInvalid, got)
	}
	return nil
}

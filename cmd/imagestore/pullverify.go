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
// concurrent ReadAt. The hashing itself runs on a goroutine of its own, fed
// in blob order. A read that extends the hashed prefix hands it its own
// buffer and returns once those bytes are hashed (no copy: the caller may
// reuse the buffer after that); only ranges kept ahead, and the hasher's
// own reads, are copies. Close ends the goroutine when Finish is not called.
type layerHasher struct {
	r    io.ReaderAt // the blob, by ranges
	gaps io.ReaderAt // the same, for the hasher's own reads (rate-limited)
	d    digest.Digest
	size int64

	mu     sync.Mutex
	h      hash.Hash        // written by the hashing goroutine only
	q      chan hashItem    // to the hashing goroutine, in blob order
	free   chan []byte      // buffers it is done with, for the copies kept ahead and the gap reads
	hdone  chan struct{}    // closed when it has hashed all q held
	closed bool             // q is closed
	hashed int64            // bytes sent to q
	ahead  map[int64][]byte // ranges past hashed, by offset
	nAhead int64
	plan   []parallel.Range // the reads to come, by offset (nil: not known yet)
	err    error            // a gap read that failed: Finish reports it
	copied int64            // bytes copied to be hashed later (tests)
}

// hashItem is the next bytes of the blob for the hashing goroutine: a
// buffer of the hasher's own, recycled once hashed, or a reader's buffer
// (done != nil), handed back by closing done.
type hashItem struct {
	b    []byte
	done chan struct{}
}

// hashPiece is the size of the hasher's own reads and the largest buffer
// it recycles (the pull's range reads are 1 MiB).
const hashPiece = 1 << 20

// maxAhead bounds the bytes a layerHasher keeps ahead of its prefix.
const maxAhead = 16 << 20

// freeBufs is how many hashed buffers a layerHasher keeps for reuse: as
// many as can be queued or kept ahead, so a steady pull copies into memory
// it already has. Fresh pages cost a fault each, which on a virtualized
// host is tens of times a copy of the page.
const freeBufs = 8 + maxAhead/hashPiece

// buffer returns a buffer of n bytes, one the hashing goroutine is done
// with when there is one.
func (l *layerHasher) buffer(n int) []byte {
	var buf []byte
	select {
	case buf = <-l.free:
	default:
	}
	if cap(buf) < n {
		return make([]byte, n)
	}
	return buf[:n]
}

func newLayerHasher(r, gaps io.ReaderAt, d digest.Digest, size int64) *layerHasher {
	l := &layerHasher{r: r, gaps: gaps, d: d, size: size, h: sha256.New(), ahead: map[int64][]byte{},
		q: make(chan hashItem, 8), free: make(chan []byte, freeBufs), hdone: make(chan struct{})}
	go func() {
		defer close(l.hdone)
		for it := range l.q {
			l.h.Write(it.b)
			if it.done != nil {
				close(it.done)
				continue
			}
			if cap(it.b) <= hashPiece {
				select {
				case l.free <- it.b[:cap(it.b)]:
				default:
				}
			}
		}
	}()
	return l
}

// emit hands the next bytes of the blob to the hashing goroutine; b must be
// a buffer of the hasher's own (from buffer), which nobody else holds.
func (l *layerHasher) emit(b []byte) {
	if l.closed || len(b) == 0 {
		return
	}
	l.q <- hashItem{b: b}
}

// emitBorrowed hands the goroutine the caller's bytes b: the caller must
// not touch them until the returned channel is closed (nil: nothing to
// wait for).
func (l *layerHasher) emitBorrowed(b []byte) chan struct{} {
	if l.closed || len(b) == 0 {
		return nil
	}
	done := make(chan struct{})
	l.q <- hashItem{b: b, done: done}
	return done
}

// Close ends the hashing goroutine (after Finish, or instead of it).
func (l *layerHasher) Close() {
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		close(l.q)
	}
	l.mu.Unlock()
	<-l.hdone
}

func (l *layerHasher) ReadAt(p []byte, off int64) (int, error) {
	n, err := l.r.ReadAt(p, off)
	if n > 0 {
		if done := l.observe(p[:n], off); done != nil {
			<-done // p is the caller's again once it is hashed
		}
	}
	return n, err
}

// observe takes bytes b of the blob at off. If it hands b itself to the
// hashing goroutine, it returns the channel closed once b is hashed.
func (l *layerHasher) observe(b []byte, off int64) chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	end := off + int64(len(b))
	if end <= l.hashed || l.err != nil {
		return nil
	}
	if off <= l.hashed {
		done := l.emitBorrowed(b[l.hashed-off:])
		l.hashed = end
		l.drain()
		l.skipUnplanned()
		return done
	}
	if have, ok := l.ahead[off]; ok && len(have) >= len(b) {
		return nil
	}
	if l.nAhead+int64(len(b)) > maxAhead {
		// Too far ahead: read the gap now and go on from b.
		if err := l.fill(off); err != nil {
			l.err = err
			return nil
		}
		var done chan struct{}
		if end > l.hashed {
			done = l.emitBorrowed(b[l.hashed-off:])
			l.hashed = end
		}
		l.drain()
		return done
	}
	if have, ok := l.ahead[off]; ok {
		l.nAhead -= int64(len(have))
	}
	keep := l.buffer(len(b))
	copy(keep, b)
	l.copied += int64(len(b))
	l.ahead[off] = keep
	l.nAhead += int64(len(b))
	l.skipUnplanned()
	return nil
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
				l.emit(b[l.hashed-off:])
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
	for l.hashed < to {
		n := min(hashPiece, to-l.hashed)
		for off := range l.ahead { // stop at the next kept range
			if off > l.hashed && off < l.hashed+n {
				n = off - l.hashed
			}
		}
		buf := l.buffer(int(n))
		k, err := l.gaps.ReadAt(buf, l.hashed)
		if int64(k) < n {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		l.emit(buf)
		l.hashed += n
		l.drain()
	}
	return nil
}

// Finish reads what was not read, and checks the digest.
func (l *layerHasher) Finish(ctx context.Context) error {
	l.mu.Lock()
	if err := ctx.Err(); err != nil {
		l.mu.Unlock()
		return err
	}
	if l.err == nil && l.closed {
		l.err = errors.New("hasher closed")
	}
	if l.err == nil {
		l.err = l.fill(l.size)
	}
	err := l.err
	l.mu.Unlock()
	l.Close()
	if err != nil {
		return fmt.Errorf("verify %s: %w", l.d, err)
	}
	if got := digest.NewDigest(digest.SHA256, l.h); got != l.d {
		return fmt.Errorf("verify %s: %w: got %s", l.d, oci.ErrDigestInvalid, got)
	}
	return nil
}

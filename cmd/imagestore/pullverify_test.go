package main

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/transfer/oci"
	"imagestore/transfer/parallel"
)

// countingAt counts the bytes read through it.
type countingAt struct {
	r  *bytes.Reader
	mu sync.Mutex
	n  int64
}

func (c *countingAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.mu.Lock()
	c.n += int64(n)
	c.mu.Unlock()
	return n, err
}

// TestLayerHasher: whatever order and gaps the reads come in (roughly
// ascending pieces from parallel workers, ranges never read, reads far out
// of order), Finish accepts exactly the blob whose digest it was given, and
// reads for itself only what the reads through it did not cover (unless
// it ran out of room ahead).
func TestLayerHasher(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	blob := make([]byte, 40<<20+123)
	for i := range blob {
		blob[i] = byte(rng.Uint32())
	}
	d := digest.FromBytes(blob)
	const piece = 1 << 20
	type plan struct {
		name    string
		skip    func(i int) bool // pieces never read
		shuffle int              // pieces reordered within windows of this many
		workers int
		extra   int64 // bound on the hasher's own reads beyond the skipped bytes
		plan    bool  // the hasher is told the reads to come
		copies  bool  // ranges arrive ahead of the prefix, so some are copied
	}
	for _, pl := range []plan{
		{"in order", func(int) bool { return false }, 1, 1, 0, false, false},
		// Concurrent readers: any interleaving is hashed right (how far
		// ahead they get depends on the scheduler, so no bound on reads).
		{"parallel workers", func(int) bool { return false }, 8, 4, int64(len(blob)), false, true},
		{"gaps", func(i int) bool { return i%7 == 3 }, 8, 1, 0, false, true},
		{"gaps, planned", func(i int) bool { return i%7 == 3 }, 8, 1, 0, true, true},
		{"reversed", func(int) bool { return false }, 1 << 20, 1, int64(len(blob)), false, true},
	} {
		t.Run(pl.name, func(t *testing.T) {
			for _, damage := range []bool{false, true} {
				b := blob
				if damage {
					b = bytes.Clone(blob)
					b[len(b)/2] ^= 1
				}
				src := &countingAt{r: bytes.NewReader(b)}
				h := newLayerHasher(src, src, d, int64(len(b)))
				var offs []int64
				var skipped int64
				for i := 0; int64(i)*piece < int64(len(b)); i++ {
					off := int64(i) * piece
					if pl.skip(i) {
						skipped += min(piece, int64(len(b))-off)
						continue
					}
					offs = append(offs, off)
				}
				if pl.plan {
					var rs []parallel.Range
					for _, off := range offs {
						rs = append(rs, parallel.Range{Offset: off, Length: min(piece, int64(len(b))-off)})
					}
					h.setPlan(rs)
				}
				if pl.name == "reversed" {
					for i, j := 0, len(offs)-1; i < j; i, j = i+1, j-1 {
						offs[i], offs[j] = offs[j], offs[i]
					}
				} else {
					for w := 0; w < len(offs); w += pl.shuffle {
						win := offs[w:min(w+pl.shuffle, len(offs))]
						rng.Shuffle(len(win), func(i, j int) { win[i], win[j] = win[j], win[i] })
					}
				}
				ch := make(chan int64)
				var peak int64 // the most bytes kept ahead
				var wg sync.WaitGroup
				for range pl.workers {
					wg.Go(func() {
						buf := make([]byte, piece)
						for off := range ch {
							n := min(piece, int64(len(b))-off)
							if _, err := h.ReadAt(buf[:n], off); err != nil {
								t.Error(err)
							}
							// The buffer is the reader's again: bytes the
							// hasher still needed would hash wrong now.
							for i := range buf {
								buf[i] = 0xff
							}
							h.mu.Lock()
							peak = max(peak, h.nAhead)
							h.mu.Unlock()
						}
					})
				}
				for _, off := range offs {
					ch <- off
				}
				close(ch)
				wg.Wait()
				// Without the plan the first gap makes everything after it
				// wait (up to maxAhead); with it, only pieces out of order
				// (within a window) do.
				if pl.plan && peak > int64(pl.shuffle)*piece {
					t.Errorf("%d bytes kept ahead with the plan known", peak)
				}
				// Bytes that extend the hashed prefix are hashed from the
				// reader's own buffer; only ranges kept ahead are copied.
				h.mu.Lock()
				copied := h.copied
				h.mu.Unlock()
				if !pl.copies && copied != 0 {
					t.Errorf("in-order reads copied %d bytes to hash them", copied)
				}
				if pl.name == "reversed" && copied == 0 {
					t.Error("reads in reverse copied nothing: nothing was kept ahead")
				}
				read := src.n
				err := h.Finish(context.Background())
				if damage != (err != nil) || (err != nil && !errors.Is(err, oci.ErrDigestInvalid)) {
					t.Fatalf("damaged %v: Finish = %v", damage, err)
				}
				if own := src.n - read; own > skipped+pl.extra {
					t.Fatalf("the hasher read %d bytes itself; the reads skipped %d", own, skipped)
				}
			}
		})
	}
}

// TestLayerHasherReusesBuffers: a long pull whose reads arrive in swapped
// pairs (a range kept ahead, then the prefix) copies into buffers the
// hasher already has, not into fresh memory per range: on a virtualized
// host every fresh page costs a fault.
func TestLayerHasherReusesBuffers(t *testing.T) {
	const piece = 1 << 20
	blob := make([]byte, 128*piece)
	for i := range blob {
		blob[i] = byte(i * 7)
	}
	d := digest.FromBytes(blob)
	src := bytes.NewReader(blob)
	h := newLayerHasher(src, src, d, int64(len(blob)))
	buf := make([]byte, piece)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := 0; i < 128; i += 2 {
		for _, j := range []int{i + 1, i} {
			if _, err := h.ReadAt(buf, int64(j)*piece); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := h.Finish(context.Background()); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	// The pool is 8 + 16 one-MiB buffers; without reuse every range read
	// ahead is a fresh MiB (64 MiB here).
	if got, limit := after.TotalAlloc-before.TotalAlloc, uint64(freeBufs+4)*piece; got > limit {
		t.Errorf("hashing 128 MiB allocated %d MiB, want ≤ %d MiB", got>>20, limit>>20)
	}
}

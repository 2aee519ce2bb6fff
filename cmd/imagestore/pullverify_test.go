package main

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

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
	}
	for _, pl := range []plan{
		{"in order", func(int) bool { return false }, 1, 1, 0, false},
		// Concurrent readers: any interleaving is hashed right (how far
		// ahead they get depends on the scheduler, so no bound on reads).
		{"parallel workers", func(int) bool { return false }, 8, 4, int64(len(blob)), false},
		{"gaps", func(i int) bool { return i%7 == 3 }, 8, 1, 0, false},
		{"gaps, planned", func(i int) bool { return i%7 == 3 }, 8, 1, 0, true},
		{"reversed", func(int) bool { return false }, 1 << 20, 1, int64(len(blob)), false},
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

// gatedAt serves a blob; a read at an offset with a gate waits until the
// gate is closed, one with a failure returns it, and every read is
// announced on entered.
type gatedAt struct {
	b       []byte
	gates   map[int64]chan struct{}
	fail    map[int64]bool
	entered chan int64

	mu sync.Mutex
	n  int64
}

var (
	errGated        = errors.New("gated read failed")
	errHasherClosed = errors.New("Finish after Close") // any error but a digest mismatch
)

func (g *gatedAt) ReadAt(p []byte, off int64) (int, error) {
	select {
	case g.entered <- off:
	default:
	}
	if ch, ok := g.gates[off]; ok {
		<-ch
	}
	if g.fail[off] {
		return 0, errGated
	}
	n, err := bytes.NewReader(g.b).ReadAt(p, off)
	g.mu.Lock()
	g.n += int64(n)
	g.mu.Unlock()
	return n, err
}

// TestLayerHasherWaits drives the hasher's readers one step at a time: a
// reader ahead of the prefix waits while the bytes before it are in flight
// (and only then), every wait ends when the reads it waits for end (also
// by failure) or at Close, and the digest covers every byte once, in
// order.
func TestLayerHasherWaits(t *testing.T) {
	const piece = 1 << 20
	const pieces = maxAhead/piece + 4
	rng := rand.New(rand.NewPCG(5, 6))
	blob := make([]byte, pieces*piece)
	for i := range blob {
		blob[i] = byte(rng.Uint32())
	}
	d := digest.FromBytes(blob)
	at := func(i int) int64 { return int64(i) * piece }

	// A step: start a read of piece P (named by its index), or release
	// the gate of a read (src or the hasher's own gap reads), or Close; then
	// check which started reads have returned.
	type step struct {
		read     int  // start a read of this piece (-1: none)
		open     int  // release the src gate of this piece (-1: none)
		openGap  int  // release the gap-read gate at this piece (-1: none)
		close    bool // Close the hasher
		gapWait  int  // wait until the hasher's gap read at this piece started (-1: none)
		blocked  []int
		returned []int // these reads return (within seconds)
	}
	none := step{read: -1, open: -1, openGap: -1, gapWait: -1}
	read := func(i int, returned ...int) step { s := none; s.read = i; s.returned = returned; return s }
	open := func(i int, returned ...int) step { s := none; s.open = i; s.returned = returned; return s }
	check := func(blocked, returned []int) step { s := none; s.blocked, s.returned = blocked, returned; return s }

	for _, tc := range []struct {
		name     string
		plan     []int // the planned pieces (nil: no plan)
		gated    []int // src reads of these pieces wait for open
		gapGated []int // the hasher's reads at these pieces wait for openGap
		fail     []int // src reads of these pieces fail
		gapFail  []int // the hasher's reads at these pieces fail
		steps    []step
		failed   []int // reads that return an error
		finish   error // Finish's error (errGated, oci.ErrDigestInvalid, errHasherClosed)
		maxGap   int64 // bytes the hasher may read itself
		maxKept  int64 // bytes it may keep ahead at any check
	}{{
		name:  "out of order: the reader ahead waits for the one in flight",
		gated: []int{0},
		steps: []step{
			read(0), read(1), read(2),
			check([]int{0, 1, 2}, nil),
			open(0, 0, 1, 2),
		},
		maxGap: int64(len(blob)) - 3*piece,
	}, {
		name: "a kept range is hashed when the prefix reaches it",
		steps: []step{
			read(1, 1), read(0, 0), read(2, 2),
		},
		maxGap:  int64(len(blob)) - 3*piece,
		maxKept: piece,
	}, {
		name: "unplanned gap: read by the hasher at once, nothing kept",
		plan: []int{0, 2, 3},
		steps: []step{
			read(0, 0), read(2, 2), read(3, 3),
		},
		maxGap: int64(len(blob)) - 3*piece,
	}, {
		name: "no plan, first piece never read: kept up to maxAhead, then the gap is read",
		steps: func() []step {
			var s []step
			for i := 1; i < pieces; i++ {
				s = append(s, read(i, i))
			}
			return s
		}(),
		maxGap:  piece,
		maxKept: maxAhead,
	}, {
		name:  "failed read: the reader waiting for it goes on, Finish reads the bytes",
		gated: []int{0}, fail: []int{0},
		steps: []step{
			read(0), read(1),
			check([]int{0, 1}, nil),
			open(0, 0, 1),
		},
		failed:  []int{0},
		maxGap:  int64(len(blob)) - piece,
		maxKept: piece,
	}, {
		name:    "failed gap read: Finish reports it, no reader hangs",
		plan:    []int{1, 2},
		gapFail: []int{0},
		steps: []step{
			read(2, 2), read(1, 1),
		},
		finish: errGated,
		maxGap: int64(len(blob)),
	}, {
		name:  "Close releases the waiters",
		gated: []int{0},
		steps: []step{
			read(0), read(1), read(2),
			check([]int{0, 1, 2}, nil),
			func() step { s := none; s.close = true; s.blocked = []int{0}; s.returned = []int{1, 2}; return s }(),
			open(0, 0),
		},
		finish: errHasherClosed,
	}, {
		// The reader that fills an unplanned gap then waits for a read
		// that started during the fill; that read waited for the fill:
		// the end of the fill must wake it.
		name:     "a reader that waited for the filler is woken when the fill ends",
		plan:     []int{1, 2},
		gapGated: []int{0},
		steps: []step{
			read(2),
			func() step { s := none; s.gapWait = 0; return s }(),
			read(1),
			check([]int{1, 2}, nil),
			func() step { s := none; s.openGap = 0; s.returned = []int{1, 2}; return s }(),
		},
		maxGap: int64(len(blob)) - 2*piece,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			gates := func(pcs []int) map[int64]chan struct{} {
				m := map[int64]chan struct{}{}
				for _, i := range pcs {
					m[at(i)] = make(chan struct{})
				}
				return m
			}
			fails := func(pcs []int) map[int64]bool {
				m := map[int64]bool{}
				for _, i := range pcs {
					m[at(i)] = true
				}
				return m
			}
			src := &gatedAt{b: blob, gates: gates(tc.gated), fail: fails(tc.fail), entered: make(chan int64, 64)}
			gaps := &gatedAt{b: blob, gates: gates(tc.gapGated), fail: fails(tc.gapFail), entered: make(chan int64, 64)}
			h := newLayerHasher(src, gaps, d, int64(len(blob)))
			defer h.Close()
			if tc.plan != nil {
				var rs []parallel.Range
				for _, i := range tc.plan {
					rs = append(rs, parallel.Range{Offset: at(i), Length: piece})
				}
				h.setPlan(rs)
			}
			done := map[int]chan error{}
			errs := map[int]error{}
			var wg sync.WaitGroup
			defer func() {
				// Let every read end, whatever the test's outcome.
				h.Close()
				for _, g := range []*gatedAt{src, gaps} {
					for _, ch := range g.gates {
						select {
						case <-ch:
						default:
							close(ch)
						}
					}
				}
				wg.Wait()
			}()
			var kept int64
			for si, s := range tc.steps {
				if s.read >= 0 {
					ch := make(chan error, 1)
					done[s.read] = ch
					wg.Go(func() {
						_, err := h.ReadAt(make([]byte, piece), at(s.read))
						ch <- err
					})
				}
				if s.open >= 0 {
					close(src.gates[at(s.open)])
				}
				if s.gapWait >= 0 {
					for off := range gaps.entered {
						if off == at(s.gapWait) {
							break
						}
					}
				}
				if s.openGap >= 0 {
					close(gaps.gates[at(s.openGap)])
				}
				if s.close {
					h.Close()
				}
				if len(s.blocked) > 0 || s.gapWait >= 0 || s.read >= 0 && len(s.returned) == 0 {
					time.Sleep(50 * time.Millisecond) // let them get to their wait
				}
				for _, i := range s.blocked {
					select {
					case err := <-done[i]:
						t.Fatalf("step %d: read of piece %d returned (%v); it should wait", si, i, err)
					default:
					}
				}
				for _, i := range s.returned {
					select {
					case err := <-done[i]:
						errs[i] = err
					case <-time.After(5 * time.Second):
						t.Fatalf("step %d: read of piece %d did not return", si, i)
					}
				}
				h.mu.Lock()
				kept = max(kept, h.nAhead)
				h.mu.Unlock()
			}
			for i, err := range errs {
				if want := slices.Contains(tc.failed, i); want != (err != nil) {
					t.Errorf("read of piece %d: %v", i, err)
				}
			}
			if kept > tc.maxKept {
				t.Errorf("%d bytes kept ahead, want at most %d", kept, tc.maxKept)
			}
			finished := make(chan error, 1)
			go func() { finished <- h.Finish(context.Background()) }()
			var err error
			select {
			case err = <-finished:
			case <-time.After(5 * time.Second):
				t.Fatal("Finish did not return")
			}
			switch {
			case tc.finish == errHasherClosed:
				if err == nil || errors.Is(err, oci.ErrDigestInvalid) {
					t.Errorf("Finish after Close = %v", err)
				}
			case tc.finish == nil && err != nil, tc.finish != nil && !errors.Is(err, tc.finish):
				t.Errorf("Finish = %v, want %v", err, tc.finish)
			}
			gaps.mu.Lock()
			defer gaps.mu.Unlock()
			if gaps.n > tc.maxGap {
				t.Errorf("the hasher read %d bytes itself, want at most %d", gaps.n, tc.maxGap)
			}
		})
	}
}

// Package staging serves a remote file's data ranges from a local copy that
// a parallel fetch fills while a consumer reads it: reads wait for the
// pieces they cover, consumed pieces are dropped (a hole punched in the
// file, or a memory buffer freed), and what a read needs after its piece
// was dropped comes from the remote again.
//
// The host pull uses it to normalize a qcow2 layer while its clusters are
// still arriving, reading the host once and keeping little on disk.
package staging

import (
	"context"
	"errors"
	"io"
	"os"
	"sort"
	"sync"

	"golang.org/x/sys/unix"

	"imagestore/transfer/parallel"
)

// File is the sparse local copy of the staged ranges.
type File interface {
	io.ReaderAt
	io.WriterAt
}

// ErrFetchEnded is what a read of a piece the fetch never delivered gets
// when the fetch ended without an error of its own (it cannot, but a
// reader must never block forever).
var ErrFetchEnded = errors.New("host fetch ended before the data arrived")

// TempFile creates a staging file in dir (on the filesystem the consumer
// writes to) and unlinks it at once, so a crash leaves nothing behind.
// pattern is os.CreateTemp's.
func TempFile(dir, pattern string) (*os.File, error) {
	f, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return nil, err
	}
	_ = os.Remove(f.Name())
	return f, nil
}

// PunchHole returns the punch function for PunchConsumed that drops a
// range of f (FALLOC_FL_PUNCH_HOLE, size kept): its page-cache pages are
// discarded, dirty or not, instead of being written back.
func PunchHole(f *os.File) func(off, n int64) error {
	return func(off, n int64) error {
		return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
}

// Reader serves reads inside the staged ranges from memory or the local
// file, waiting for the fetch to deliver the pieces they cover, and
// everything else (before Start, and outside the ranges) from the remote.
//
// Up to memMax delivered pieces stay in memory while consumed pieces are
// being dropped (a consumer that trails the fetch closely reads most pieces
// from memory, and they never touch the file); the rest are written to the
// file.
type Reader struct {
	remote io.ReaderAt
	bufs   *parallel.Buffers // piece buffers, shared with the fetch

	mu     sync.Mutex
	cond   sync.Cond
	local  File
	ranges []parallel.Range
	pieces []parallel.Range
	have   []bool
	ended  bool
	err    error // the fetch's, once ended
	// waiters counts the readers in cond.Wait (lets tests order reads).
	waiters int

	// Dropping (see PunchConsumed): per piece, the bytes read from local,
	// the local reads in progress, and whether its staged bytes are gone.
	drop        bool                     // drop consumed pieces
	punch       func(off, n int64) error // drops a piece from the file
	punchBroken bool                     // punch failed once: keep file pieces
	consumed    []int64
	inflight    []int32
	punched     []bool    // dropped (from memory or the file)
	mem         []*[]byte // pieces held in memory
	memLeft     int       // pieces that may still be held in memory
}

// New returns a Reader that reads everything from remote until Start.
func New(remote io.ReaderAt) *Reader { return &Reader{remote: remote} }

// Start switches reads inside ranges (sorted, not overlapping) to local,
// pending the arrival of their pieces: ranges cut into pieces of at most
// chunk bytes, up to memMax of them kept in memory.
func (s *Reader) Start(local File, ranges []parallel.Range, chunk int64, memMax int) {
	pieces := parallel.Split(ranges, chunk)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cond.L = &s.mu
	s.local, s.ranges, s.pieces, s.have = local, ranges, pieces, make([]bool, len(pieces))
	s.consumed, s.inflight, s.punched = make([]int64, len(pieces)), make([]int32, len(pieces)), make([]bool, len(pieces))
	s.mem, s.memLeft, s.bufs = make([]*[]byte, len(pieces)), memMax, parallel.NewBuffers(pieces)
}

// Fetch fills the staged pieces from src with workers streams, then ends
// the fetch (waking every waiting reader) and returns its error. Call it
// once, after Start, typically in its own goroutine.
func (s *Reader) Fetch(ctx context.Context, src io.ReaderAt, workers int) error {
	err := parallel.Fetch(ctx, src, s.pieces, workers, s.bufs, s.deliver)
	s.finish(err)
	return err
}

// deliver takes fetched piece i: into memory while dropping and within
// the window, else into the staging file.
func (s *Reader) deliver(i int, bp *[]byte) (bool, error) {
	s.mu.Lock()
	if s.drop && s.memLeft > 0 {
		s.mem[i] = bp
		s.memLeft--
		s.have[i] = true
		s.mu.Unlock()
		s.cond.Broadcast()
		return true, nil
	}
	s.mu.Unlock()
	p := s.pieces[i]
	if err := write(s.local, (*bp)[:p.Length], p.Offset); err != nil {
		return false, err
	}
	s.done(i)
	return false, nil
}

// PunchConsumed makes every piece whose bytes have all been read once from
// the staging file get dropped from it with punch, so its page-cache pages
// are discarded, dirty or not, instead of being written back to disk: a
// consumer that reads each data byte once has no use for the staged copy
// once it has been read. A read that still needs a dropped piece
// (overlapping compressed clusters, or a consumer that re-reads) goes to
// the remote, counted like any remote read; after a fallback, Refetch
// restores them. Pieces held in memory are dropped the same way, without a
// syscall. punch nil stops dropping (pieces already in memory stay there).
func (s *Reader) PunchConsumed(punch func(off, n int64) error) {
	s.mu.Lock()
	s.drop, s.punch, s.punchBroken = punch != nil, punch, false
	s.mu.Unlock()
}

// Refetch reads the pieces that were dropped from src again into the
// staging file, for a consumer that reads everything again (call
// PunchConsumed(nil) and let Fetch end first). Rare, and the remote bytes
// count.
func (s *Reader) Refetch(ctx context.Context, src io.ReaderAt, workers int) error {
	idx := s.punchedPieces()
	pieces := make([]parallel.Range, len(idx))
	for i, k := range idx {
		pieces[i] = s.pieces[k]
	}
	return parallel.Fetch(ctx, src, pieces, workers, parallel.NewBuffers(pieces), func(i int, bp *[]byte) (bool, error) {
		if err := write(s.local, (*bp)[:pieces[i].Length], pieces[i].Offset); err != nil {
			return false, err
		}
		s.unpunch(idx[i])
		return false, nil
	})
}

// punchedPieces lists the pieces whose staged bytes were dropped.
func (s *Reader) punchedPieces() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for k, p := range s.punched {
		if p {
			out = append(out, k)
		}
	}
	return out
}

// unpunch marks piece k staged again (the caller re-fetched it).
func (s *Reader) unpunch(k int) {
	s.mu.Lock()
	s.punched[k], s.consumed[k] = false, 0
	s.mu.Unlock()
}

func (s *Reader) done(i int) {
	s.mu.Lock()
	s.have[i] = true
	s.mu.Unlock()
	s.cond.Broadcast()
}

// finish records the end of the fetch and wakes every waiting reader.
func (s *Reader) finish(err error) {
	if err == nil {
		err = ErrFetchEnded
	}
	s.mu.Lock()
	s.ended = true
	s.err = err
	s.mu.Unlock()
	s.cond.Broadcast()
}

// writeMax bounds one write to the staging file: the kernel sizes
// page-cache folios by the write's length, and huge ones (multi-MiB
// writes) can cost far more to fill than the copy (see blobstore's
// writeSyscallMax).
const writeMax = 256 << 10

// write writes b at off in writes of at most writeMax.
func write(w io.WriterAt, b []byte, off int64) error {
	for len(b) > 0 {
		n := min(len(b), writeMax)
		if _, err := w.WriteAt(b[:n], off); err != nil {
			return err
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

func (s *Reader) ReadAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	local, ranges := s.local, s.ranges
	if local == nil {
		s.mu.Unlock()
		return s.remote.ReadAt(p, off)
	}
	end := off + int64(len(p))
	i := sort.Search(len(ranges), func(i int) bool { return ranges[i].Offset+ranges[i].Length > off })
	if i == len(ranges) || ranges[i].Offset > off || end > ranges[i].Offset+ranges[i].Length {
		s.mu.Unlock()
		return s.remote.ReadAt(p, off)
	}
	first, last, err := s.claim(off, end)
	if err != nil {
		s.mu.Unlock()
		return 0, err
	}
	if first < 0 {
		s.mu.Unlock()
		return s.remote.ReadAt(p, off)
	}
	var memBuf [4]*[]byte
	mem := memBuf[:0]
	for k := first; k < last; k++ {
		mem = append(mem, s.mem[k]) // stays valid while inflight
	}
	s.mu.Unlock()
	err = s.readPieces(local, p, off, first, last, mem)
	s.release(off, end, first, last)
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// claim waits, with s.mu held, for the pieces covering [off, end) and
// marks them in flight, returning their index range [first, last). first
// is -1 if one of them was dropped already (read from the remote then).
//
// The pieces are consecutive, as pieces are sorted and tile each range.
// After a wait the check starts over: while the lock was released another
// read may have dropped a piece already checked, and only a check done in
// one hold of the lock, ending with inflight raised, keeps the pieces
// from being dropped under us.
func (s *Reader) claim(off, end int64) (first, last int, err error) {
	first = sort.Search(len(s.pieces), func(k int) bool { return s.pieces[k].Offset+s.pieces[k].Length > off })
	last = first
	for last < len(s.pieces) && s.pieces[last].Offset < end {
		if !s.have[last] {
			if s.ended {
				return 0, 0, s.err
			}
			s.waiters++
			s.cond.Wait()
			s.waiters--
			last = first
			continue
		}
		if s.punched[last] {
			return -1, -1, nil
		}
		last++
	}
	for k := first; k < last; k++ {
		s.inflight[k]++
	}
	return first, last, nil
}

// readPieces copies [off, off+len(p)) from the claimed pieces first..last
// (mem[k-first] is piece k's buffer if it is held in memory).
func (s *Reader) readPieces(local File, p []byte, off int64, first, last int, mem []*[]byte) error {
	end := off + int64(len(p))
	for k := first; k < last; k++ {
		pc := s.pieces[k]
		a, b := max(off, pc.Offset), min(end, pc.Offset+pc.Length)
		if m := mem[k-first]; m != nil {
			copy(p[a-off:b-off], (*m)[a-pc.Offset:b-pc.Offset])
			continue
		}
		n, err := local.ReadAt(p[a-off:b-off], a)
		if n == int(b-a) {
			continue
		}
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

// release ends a read of [off, end) over the claimed pieces first..last,
// dropping the pieces it finished consuming.
func (s *Reader) release(off, end int64, first, last int) {
	s.mu.Lock()
	var drop []int
	for k := first; k < last; k++ {
		pc := s.pieces[k]
		s.inflight[k]--
		s.consumed[k] += min(end, pc.Offset+pc.Length) - max(off, pc.Offset)
		if !s.drop || s.punched[k] || s.inflight[k] > 0 || s.consumed[k] < pc.Length {
			continue
		}
		switch {
		case s.mem[k] != nil:
			s.punched[k] = true
			s.bufs.Put(s.mem[k])
			s.mem[k] = nil
			s.memLeft++
		case !s.punchBroken:
			s.punched[k] = true // from now on reads of k go to the remote
			drop = append(drop, k)
		}
	}
	punch := s.punch
	s.mu.Unlock()
	for _, k := range drop {
		if perr := punch(s.pieces[k].Offset, s.pieces[k].Length); perr != nil {
			// Not supported here (or failed): keep the bytes, stop trying.
			s.mu.Lock()
			s.punched[k], s.punchBroken = false, true
			s.mu.Unlock()
		}
	}
}

package staging

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imagestore/transfer/parallel"
)

// countingReaderAt counts the bytes read through it.
type countingReaderAt struct {
	r io.ReaderAt
	n atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// memStage is a staging file in memory whose punch zeroes, like a hole.
type memStage struct {
	mu sync.Mutex
	b  []byte
}

func (m *memStage) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.b[off:], p), nil
}

func (m *memStage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}

func (m *memStage) punch(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}

// A consumed piece is punched once every byte was read and no read is in
// flight; later reads of it go to the host (counted), never see the hole;
// Refetch restores it.
func TestReaderPunch(t *testing.T) {
	src := make([]byte, 1<<20)
	for i := range src {
		src[i] = byte(i*7 + 1)
	}
	tests := []struct {
		name      string
		memMax    []int // pieces kept in memory: each value is a run
		punchErr  error
		reads     [][2]int64 // off, len, in order
		wantPunch []int      // pieces punched after the reads
		reread    [2]int64   // then read this again
		wantHost  int64      // host bytes for the reread
	}{
		{"whole pieces", []int{0, 1, 3}, nil, [][2]int64{{0, 4096}, {4096, 4096}, {8192, 2048}}, []int{0, 1}, [2]int64{0, 8192}, 8192},
		{"straddling reads", []int{0, 1, 3}, nil, [][2]int64{{0, 3000}, {3000, 3000}, {6000, 2192}}, []int{0, 1}, [2]int64{4096, 100}, 100},
		{"partly read piece stays", []int{0, 1, 3}, nil, [][2]int64{{0, 4096}, {4096, 4000}}, []int{0}, [2]int64{4096, 4000}, 0},
		{"punch unsupported", []int{0}, errors.New("EOPNOTSUPP"), [][2]int64{{0, 4096}, {4096, 4096}}, nil, [2]int64{0, 8192}, 0},
		{"punch unsupported, pieces in memory", []int{3}, errors.New("EOPNOTSUPP"), [][2]int64{{0, 4096}, {4096, 4096}}, []int{0, 1}, [2]int64{0, 8192}, 8192},
	}
	for _, tc := range tests {
		for _, memMax := range tc.memMax {
			t.Run(fmt.Sprintf("%s/mem=%d", tc.name, memMax), func(t *testing.T) {
				punchCase(t, src, memMax, tc.punchErr, tc.reads, tc.wantPunch, tc.reread, tc.wantHost)
			})
		}
	}
}

func punchCase(t *testing.T, src []byte, memMax int, punchErr error, reads [][2]int64, wantPunch []int, reread [2]int64, wantHost int64) {
	t.Helper()
	tc := struct {
		punchErr  error
		reads     [][2]int64
		wantPunch []int
		reread    [2]int64
		wantHost  int64
	}{punchErr, reads, wantPunch, reread, wantHost}
	remote := &countingReaderAt{r: bytes.NewReader(src)}
	stage := &memStage{b: make([]byte, len(src))}
	ranges := []parallel.Range{{Offset: 0, Length: 12288}}
	pieces := parallel.Split(ranges, 4096)
	s := New(remote)
	s.Start(stage, ranges, 4096, memMax)
	s.PunchConsumed(func(off, n int64) error {
		if tc.punchErr != nil {
			return tc.punchErr
		}
		return stage.punch(off, n)
	})
	if err := s.Fetch(context.Background(), remote, 2); err != nil {
		t.Fatal(err)
	}
	// Pieces kept in memory never reach the file.
	var inFile int
	for _, p := range pieces {
		if !bytes.Equal(stage.b[p.Offset:p.Offset+p.Length], make([]byte, p.Length)) {
			inFile++
		}
	}
	if want := len(pieces) - min(memMax, len(pieces)); inFile != want {
		t.Fatalf("%d pieces in the file, want %d", inFile, want)
	}
	read := func(off, n int64) {
		t.Helper()
		p := make([]byte, n)
		if _, err := s.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, src[off:off+n]) {
			t.Fatalf("read [%d,+%d): wrong bytes", off, n)
		}
	}
	for _, r := range tc.reads {
		read(r[0], r[1])
	}
	if got := s.punchedPieces(); fmt.Sprint(got) != fmt.Sprint(tc.wantPunch) {
		t.Fatalf("punched %v, want %v", got, tc.wantPunch)
	}
	before := remote.n.Load()
	read(tc.reread[0], tc.reread[1])
	if got := remote.n.Load() - before; got != tc.wantHost {
		t.Fatalf("reread took %d host bytes, want %d", got, tc.wantHost)
	}
	// The fallback: stop punching, restore, read everything locally.
	s.PunchConsumed(nil)
	if err := s.Refetch(context.Background(), remote, 2); err != nil {
		t.Fatal(err)
	}
	if got := s.punchedPieces(); len(got) != 0 {
		t.Fatalf("still punched after refetch: %v", got)
	}
	before = remote.n.Load()
	read(0, 12288)
	read(0, 12288)
	if got := remote.n.Load() - before; got != 0 {
		t.Fatalf("reads after refetch took %d host bytes", got)
	}
}

// A reader waiting for a later piece must not read an earlier one that
// another read dropped meanwhile: A reads [4000,+200) while piece 1 is
// pending, B consumes piece 0 whole (so it is dropped), then piece 1
// arrives; A must still get the right bytes (from the host), not the hole.
func TestReaderDropWhileWaiting(t *testing.T) {
	src := make([]byte, 12288)
	for i := range src {
		src[i] = byte(i*7 + 1)
	}
	for _, memMax := range []int{0, 3} {
		t.Run(fmt.Sprintf("mem=%d", memMax), func(t *testing.T) {
			remote := &countingReaderAt{r: bytes.NewReader(src)}
			stage := &memStage{b: make([]byte, len(src))}
			ranges := []parallel.Range{{Offset: 0, Length: int64(len(src))}}
			pieces := parallel.Split(ranges, 4096)
			s := New(remote)
			s.Start(stage, ranges, 4096, memMax)
			s.PunchConsumed(stage.punch)
			deliver := func(i int) {
				t.Helper()
				bp := s.bufs.Get()
				copy(*bp, src[pieces[i].Offset:pieces[i].Offset+pieces[i].Length])
				kept, err := s.deliver(i, bp)
				if err != nil {
					t.Fatal(err)
				}
				if !kept {
					s.bufs.Put(bp)
				}
			}
			deliver(0)

			type result struct {
				p   []byte
				err error
			}
			done := make(chan result, 1)
			go func() {
				p := make([]byte, 200)
				_, err := s.ReadAt(p, 4000)
				done <- result{p, err}
			}()
			// Wait until A is blocked on piece 1 (it has checked piece 0).
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
				s.mu.Lock()
				w := s.waiters
				s.mu.Unlock()
				if w == 1 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("reader A never waited for piece 1")
				}
			}
			p := make([]byte, 4096)
			if _, err := s.ReadAt(p, 0); err != nil || !bytes.Equal(p, src[:4096]) {
				t.Fatalf("reader B: %v, right bytes %v", err, bytes.Equal(p, src[:4096]))
			}
			if got := s.punchedPieces(); fmt.Sprint(got) != "[0]" {
				t.Fatalf("punched %v after B, want [0]", got)
			}
			deliver(1)
			var r result
			select {
			case r = <-done:
			case <-time.After(30 * time.Second):
				s.finish(nil)
				t.Fatal("reader A still blocked after piece 1 arrived")
			}
			if r.err != nil {
				t.Fatal(r.err)
			}
			if !bytes.Equal(r.p, src[4000:4200]) {
				t.Fatal("reader A got wrong bytes (the dropped piece's hole)")
			}
			s.finish(nil)
		})
	}
}

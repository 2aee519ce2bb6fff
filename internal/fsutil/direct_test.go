package fsutil

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDirectWriter: on a local file system aligned pieces go around the
// page cache, the others through it, and the file holds every piece where
// it was written; a file whose name is gone gets no O_DIRECT descriptor.
func TestDirectWriter(t *testing.T) {
	const A = DirectAlign
	// buf's first byte is aligned: large allocations start on a page.
	buf := make([]byte, 64*A)
	for i := range buf {
		buf[i] = byte(i*31 + i/A)
	}
	type piece struct {
		off    int64
		lo, hi int // buf[lo:hi]
		direct bool
	}
	pieces := []piece{
		{0, 0, 16 * A, true},                    // aligned
		{16 * A, 16 * A, 17*A + 100, false},     // length not aligned
		{17*A + 100, 17*A + 100, 20 * A, false}, // offset not aligned
		{20 * A, 20*A + 1, 24*A + 1, false},     // buffer not aligned
		{24 * A, 24 * A, 64 * A, true},          // aligned again after the others
	}
	for _, tc := range []struct {
		name     string
		unlinked bool // the file's name is gone: no O_DIRECT descriptor
	}{{"direct", false}, {"name removed", true}} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "out")
			f, err := os.Create(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if tc.unlinked {
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
			}
			w := NewDirectWriter(f)
			if tc.unlinked {
				if w != nil {
					t.Fatal("opened an O_DIRECT descriptor of a removed name")
				}
				return
			}
			if w == nil {
				var st unix.Statfs_t
				_ = unix.Fstatfs(int(f.Fd()), &st)
				if directFS(int64(st.Type)) {
					t.Fatalf("no O_DIRECT on a file system (type %#x) that takes it", st.Type)
				}
				t.Skipf("the test's temp dir is on a file system (type %#x) DirectWriter leaves to the page cache", st.Type)
			}
			opened := true
			var want int64
			for _, p := range pieces {
				before := w.Direct()
				n, err := w.WriteAt(buf[p.lo:p.hi], p.off)
				if err != nil || n != p.hi-p.lo {
					t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", p.hi-p.lo, p.off, n, err)
				}
				wentDirect := w.Direct() > before
				if wentDirect && !p.direct {
					t.Errorf("the unaligned piece at %d went direct", p.off)
				}
				if opened && p.direct && !wentDirect {
					t.Errorf("the aligned piece at %d went through the page cache", p.off)
				}
				if wentDirect {
					want += int64(n)
				}
			}
			if got := w.Direct(); got != want {
				t.Errorf("Direct() = %d, want %d", got, want)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 64*A)
			if _, err := f.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			exp := bytes.Clone(buf)
			copy(exp[20*A:24*A], buf[20*A+1:24*A+1])
			if !bytes.Equal(got, exp) {
				t.Error("the file does not hold the pieces written")
			}
		})
	}
}

// TestDirectWriterNotOnTmpfs: memory-backed files stay with the page cache.
func TestDirectWriterNotOnTmpfs(t *testing.T) {
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		t.Skipf("no tmpfs at /dev/shm (%v)", err)
	}
	f, err := os.CreateTemp("/dev/shm", "directwriter-*")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if w := NewDirectWriter(f); w != nil {
		w.Close()
		t.Fatal("NewDirectWriter took a tmpfs file")
	}
}

// TestDirectWriterFlushes: every directFlushEvery bytes written directly
// start a background flush of the file (never two at once); a flush that
// fails fails the next WriteAt and Close, and says what it was flushing.
func TestDirectWriterFlushes(t *testing.T) {
	hb := NewHugeBuffer(4 << 20)
	defer hb.Free()
	piece := hb.Bytes()
	const pieces = 3 * directFlushEvery / (4 << 20) // 3 flush intervals
	for _, tc := range []struct {
		name    string
		fail    bool
		blocked bool // the first flush does not return until the end
	}{
		{"real fdatasync", false, false},
		{"a flush still running", false, true},
		{"a flush fails", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, w := newDirectTemp(t)
			var mu sync.Mutex
			calls := 0
			release := make(chan struct{})
			synced := make(chan struct{}, pieces)
			w.sync = func(fd int) error {
				mu.Lock()
				calls++
				first := calls == 1
				mu.Unlock()
				defer func() { synced <- struct{}{} }()
				if tc.blocked && first {
					<-release
				}
				if tc.fail {
					return unix.EIO
				}
				return unix.Fdatasync(fd)
			}
			var werr error
			for i := range pieces {
				if _, werr = w.WriteAt(piece, int64(i)*int64(len(piece))); werr != nil {
					break
				}
				if tc.fail && i == directFlushEvery/len(piece)-1 {
					<-synced // the first flush has failed: the next write must say so
				}
			}
			close(release)
			cerr := w.Close()
			mu.Lock()
			n := calls
			mu.Unlock()
			switch {
			case tc.fail:
				if !errors.Is(werr, unix.EIO) || !strings.Contains(werr.Error(), "flushing") {
					t.Fatalf("WriteAt after a failed flush: %v, want the flush's EIO", werr)
				}
				if !errors.Is(cerr, unix.EIO) {
					t.Fatalf("Close after a failed flush: %v", cerr)
				}
				if n != 1 {
					t.Fatalf("%d flushes, want 1 (the writes stop at its failure)", n)
				}
			case tc.blocked:
				if werr != nil || cerr != nil {
					t.Fatalf("WriteAt %v, Close %v", werr, cerr)
				}
				if n != 1 {
					t.Fatalf("%d flushes started while the first still ran, want 1", n)
				}
			default:
				if werr != nil || cerr != nil {
					t.Fatalf("WriteAt %v, Close %v", werr, cerr)
				}
				// At most one per interval, and the first interval's
				// always starts.
				if n < 1 || n > 3 {
					t.Fatalf("%d flushes for 3 intervals of directFlushEvery", n)
				}
			}
		})
	}
}

// newDirectTemp creates a file in the test's temp dir and its
// DirectWriter; the temp dir must take O_DIRECT writes. The file is
// closed when the test ends.
func newDirectTemp(t *testing.T) (*os.File, *DirectWriter) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	w := NewDirectWriter(f)
	if w == nil {
		t.Fatalf("the test's temp dir takes no O_DIRECT writes")
	}
	return f, w
}

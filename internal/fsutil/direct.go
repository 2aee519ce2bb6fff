package fsutil

import (
	"errors"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DirectWriter writes a file being filled with large pieces (a raw
// restore) through a second descriptor opened with O_DIRECT, so the bytes
// go from the caller's buffer to the disk without a copy into the page
// cache and without the kernel's write-back of those pages later: on a
// 2-core host that copy and write-back cost about as much CPU as the
// restore's own work on the bytes. Pieces that are not aligned (offset,
// length or buffer address not a multiple of DirectAlign) go through the
// file as usual; where the file system refuses O_DIRECT (at open or at
// the first write: EINVAL), every piece does. Durability is unchanged:
// O_DIRECT does not flush the device's cache, the caller's fsync still
// does. Close must be called before the file is closed.
type DirectWriter struct {
	f *os.File

	mu      sync.Mutex
	d       *os.File // nil: not open, or closed
	refused bool     // d's writes failed with EINVAL: use f only
	direct  int64    // bytes written through d
}

// DirectAlign is the alignment DirectWriter requires of a piece's offset,
// length and buffer: the page size, which every block size divides.
const DirectAlign = 4096

// NewDirectWriter wraps f, a regular file open for writing.
func NewDirectWriter(f *os.File) *DirectWriter {
	w := &DirectWriter{f: f}
	// A descriptor of its own: O_DIRECT set with fcntl on a dup would
	// also change f's (they share one open file description).
	if d, err := os.OpenFile(f.Name(), os.O_WRONLY|unix.O_DIRECT, 0); err == nil {
		if same(f, d) {
			w.d = d
		} else {
			_ = d.Close()
		}
	}
	return w
}

// same reports whether a and b are the same file (f's name could have been
// replaced since it was opened).
func same(a, b *os.File) bool {
	sa, err := a.Stat()
	if err != nil {
		return false
	}
	sb, err := b.Stat()
	return err == nil && os.SameFile(sa, sb)
}

// WriteAt writes p at off.
func (w *DirectWriter) WriteAt(p []byte, off int64) (int, error) {
	if d := w.directFor(p, off); d != nil {
		n, err := d.WriteAt(p, off)
		if err == nil || n > 0 || !errors.Is(err, unix.EINVAL) {
			w.mu.Lock()
			w.direct += int64(n)
			w.mu.Unlock()
			return n, err
		}
		// Refused (a file system without O_DIRECT, or stricter
		// alignment than DirectAlign): write through the page cache from
		// now on.
		w.mu.Lock()
		w.refused = true
		w.mu.Unlock()
	}
	return w.f.WriteAt(p, off)
}

func (w *DirectWriter) directFor(p []byte, off int64) *os.File {
	if len(p) == 0 || off%DirectAlign != 0 || len(p)%DirectAlign != 0 ||
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))%DirectAlign != 0 {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.refused {
		return nil
	}
	return w.d
}

// Truncate sets the file's size.
func (w *DirectWriter) Truncate(size int64) error { return w.f.Truncate(size) }

// Direct is the number of bytes written with O_DIRECT so far.
func (w *DirectWriter) Direct() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.direct
}

// Close closes the O_DIRECT descriptor; it does not close the file.
func (w *DirectWriter) Close() error {
	w.mu.Lock()
	d := w.d
	w.d = nil
	w.mu.Unlock()
	if d == nil {
		return nil
	}
	return d.Close()
}

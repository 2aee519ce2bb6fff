package fsutil

import (
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// WriteBehind is a file being filled front to back (a restore, a copy)
// whose dirty pages are handed to the disk as they are written, instead
// of all at the fsync that ends WriteFunc: each time Window more bytes lie
// behind the highest offset written, a goroutine of its own starts their
// write-back (sync_file_range SYNC_FILE_RANGE_WRITE, which does not wait
// for it). The disk then works while the file is still being filled, and
// the final fsync has little left to do; durability is still the fsync's
// alone. The writer never waits for the disk here (a congested device
// queue blocks the goroutine, which then starts a larger range next).
// Writes in any order are correct; only the highest offset drives it.
// Where the file system cannot (EINVAL, ENOSYS, ESPIPE), it stops trying.
// Close must be called before the file is closed.
type WriteBehind struct {
	f      *os.File
	window int64

	mu      sync.Mutex
	pos     int64 // bytes written by Write
	end     int64 // highest offset written + 1
	kicked  int64 // write-back started for [0, kicked)
	started int64 // bytes the goroutine has handed to sync_file_range
	wake    chan struct{}
	done    chan struct{}
	stopped bool
}

// WriteBehindWindow is the write-back step NewWriteBehind takes for a
// window of 0: large enough that the device gets big requests, small
// enough that the disk starts early.
const WriteBehindWindow = 32 << 20

// NewWriteBehind wraps f; window 0 means WriteBehindWindow.
func NewWriteBehind(f *os.File, window int64) *WriteBehind {
	if window <= 0 {
		window = WriteBehindWindow
	}
	w := &WriteBehind{f: f, window: window, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go w.run()
	return w
}

// WriteAt writes p at off in the file.
func (w *WriteBehind) WriteAt(p []byte, off int64) (int, error) {
	n, err := w.f.WriteAt(p, off)
	w.wrote(off + int64(n))
	return n, err
}

// Write writes p at the file's offset. The offset is counted from where
// it was when the first Write came (0 for a new file), so a caller that
// writes with Write must not move it otherwise.
func (w *WriteBehind) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.mu.Lock()
	w.pos += int64(n)
	end := w.pos
	w.mu.Unlock()
	w.wrote(end)
	return n, err
}

// Truncate sets the file's size.
func (w *WriteBehind) Truncate(size int64) error { return w.f.Truncate(size) }

func (w *WriteBehind) wrote(end int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.end = max(w.end, end)
	if !w.stopped && w.end-w.kicked >= w.window {
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
}

func (w *WriteBehind) run() {
	defer close(w.done)
	fd := int(w.f.Fd())
	for range w.wake {
		w.mu.Lock()
		lo, hi := w.kicked, w.end
		w.kicked = hi
		w.mu.Unlock()
		if hi <= lo {
			continue
		}
		if err := unix.SyncFileRange(fd, lo, hi-lo, unix.SYNC_FILE_RANGE_WRITE); err != nil {
			// Advisory only: the fsync reports what matters.
			w.mu.Lock()
			w.kicked = 1<<63 - 1
			w.mu.Unlock()
			continue
		}
		w.mu.Lock()
		w.started += hi - lo
		w.mu.Unlock()
	}
}

// Started is the number of bytes whose write-back was started so far.
func (w *WriteBehind) Started() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.started
}

// Close starts the write-back of what is left and ends the goroutine
// (without waiting for the disk); it does not close the file.
func (w *WriteBehind) Close() error {
	w.mu.Lock()
	if !w.stopped {
		w.stopped = true
		select {
		case w.wake <- struct{}{}:
		default:
		}
		close(w.wake)
	}
	w.mu.Unlock()
	<-w.done
	return nil
}

package blobstore

import (
	"imagestore/internal/fsutil"

	"context"
	"encoding"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

const (
	ingestData      = "data"
	ingestStateFile = "state"
)

// localIngest is one ingest of the local backend: ingest/<ref>/data with
// an exclusive flock (across processes too), checkpointed to
// ingest/<ref>/state.
type localIngest struct {
	l        *Local
	ref      string
	dir      string
	f        *os.File
	h        hash.Hash
	off      int64 // bytes written and hashed
	durable  int64 // offset of the last checkpoint
	done     bool
	hashDone chan struct{}

	// An asynchronous checkpoint in flight (nil if none) and the offset
	// it makes durable. Writes continue meanwhile: the fsync starts after
	// every byte up to pendOff was written, so it covers them.
	pending chan error
	pendOff int64

	// syncErr is the first failed fsync of the data file. It is sticky:
	// Linux reports a writeback error to one fsync only, and a later fsync
	// of the same file succeeds although the pages it failed to write are
	// now clean and lost. After it nothing past durable is trusted: no
	// checkpoint records a larger offset, no page is dropped from the
	// cache, and Commit fails; a new Ingest resumes from durable.
	syncErr error
}

// errSyncFailed marks the error of a failed data fsync.
var errSyncFailed = errors.New("fsync failed")

func (l *Local) ingestDir(ref string) string { return filepath.Join(l.root, dirIngest, ref) }

// OpenIngest implements Backend.
func (l *Local) OpenIngest(ctx context.Context, ref string) (Ingest, int64, error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, err
	}
	dir := l.ingestDir(ref)
	var f *os.File
	// Retry while a concurrent cleanup removes the directory under us.
	for attempt := 0; ; attempt++ {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, 0, mapSpace(err, "blobstore: create ingest")
		}
		var err error
		f, err = os.OpenFile(filepath.Join(dir, ingestData), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && attempt < 5 {
				continue
			}
			return nil, 0, mapSpace(err, "blobstore: open ingest")
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, 0, fmt.Errorf("%w: %s", ErrLocked, ref)
			}
			return nil, 0, fmt.Errorf("blobstore: lock ingest %s: %w", ref, err)
		}
		if sameFile(f, filepath.Join(dir, ingestData)) {
			break
		}
		f.Close() // removed between open and lock; start over
		if attempt >= 5 {
			return nil, 0, fmt.Errorf("blobstore: ingest %s keeps disappearing", ref)
		}
	}
	w := &localIngest{l: l, ref: ref, dir: dir, f: f, h: NewIngestHash()}
	dropped, err := w.restore()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return w, dropped, nil
}

func sameFile(f *os.File, path string) bool {
	a, err := f.Stat()
	if err != nil {
		return false
	}
	b, err := os.Stat(path)
	return err == nil && os.SameFile(a, b)
}

// restore truncates the data file to the checkpoint and restores the hash,
// or starts from zero if there is no usable checkpoint.
func (w *localIngest) restore() (dropped int64, err error) {
	fi, err := w.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("blobstore: stat ingest: %w", err)
	}
	size := fi.Size()
	off := int64(0)
	b, err := os.ReadFile(filepath.Join(w.dir, ingestStateFile))
	switch {
	case err == nil:
		st, h, perr := parseIngestState(b)
		if perr == nil && st.Offset <= size {
			off, w.h = st.Offset, h
		} else {
			w.l.log.Warn("ingest checkpoint unusable, restarting from zero", "ref", w.ref, "err", perr, "data_size", size)
		}
	case errors.Is(err, fs.ErrNotExist):
	default:
		return 0, fmt.Errorf("blobstore: read ingest state: %w", err)
	}
	if size != off {
		if err := w.f.Truncate(off); err != nil {
			return 0, fmt.Errorf("blobstore: truncate ingest: %w", err)
		}
	}
	if _, err := w.f.Seek(off, io.SeekStart); err != nil {
		return 0, fmt.Errorf("blobstore: seek ingest: %w", err)
	}
	w.off, w.durable = off, off
	return size - off, nil
}

// Write implements Ingest. ENOSPC is ErrNoSpace; after it the ingest stays
// consistent (Offset counts exactly the bytes on disk and in the hash).
func (w *localIngest) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("blobstore: write to finished ingest %s", w.ref)
	}
	if w.syncErr != nil {
		return 0, w.sync()
	}
	if len(p) == 0 {
		return 0, nil
	}
	n, err := w.writeHash(p)
	w.off += int64(n)
	if err != nil {
		return n, mapSpace(err, "blobstore: ingest "+w.ref)
	}
	if w.off-max(w.durable, w.pendOff) >= w.l.checkpointEvery {
		if err := w.startCheckpoint(); err != nil {
			return n, err
		}
	}
	return n, nil
}

// startCheckpoint checkpoints the current offset in the background, after
// waiting for the previous background checkpoint.
func (w *localIngest) startCheckpoint() error {
	if err := w.waitCheckpoint(); err != nil {
		return err
	}
	if w.syncErr != nil {
		return w.sync() // the sticky error: no checkpoint past it
	}
	b, err := marshalIngestState(w.off, w.h)
	if err != nil {
		return fmt.Errorf("blobstore: marshal hash state: %w", err)
	}
	ch := make(chan error, 1)
	f, statePath, ref, from, to, syncFile := w.f, filepath.Join(w.dir, ingestStateFile), w.ref, w.durable, w.off, w.l.syncFile
	go func() {
		if err := syncFile(f); err != nil {
			ch <- fmt.Errorf("%w: %w", errSyncFailed, mapSpace(err, "blobstore: sync ingest "+ref))
			return
		}
		dropCache(f, from, to)
		ch <- mapSpace(fsutil.WriteFile(statePath, b, 0o600), "blobstore: checkpoint ingest "+ref)
	}()
	w.pending, w.pendOff = ch, w.off
	return nil
}

// waitCheckpoint waits for the background checkpoint, if any.
func (w *localIngest) waitCheckpoint() error {
	if w.pending == nil {
		return nil
	}
	err := <-w.pending
	w.pending = nil
	switch {
	case err == nil:
		w.durable = w.pendOff
	case errors.Is(err, errSyncFailed) && w.syncErr == nil:
		w.syncErr = err
	}
	return err
}

// sync fsyncs the data file, or fails for good after any failed fsync.
func (w *localIngest) sync() error {
	if w.syncErr != nil {
		return fmt.Errorf("blobstore: ingest %s: data past offset %d is not trusted after a failed fsync: %w", w.ref, w.durable, w.syncErr)
	}
	if err := w.l.syncFile(w.f); err != nil {
		w.syncErr = fmt.Errorf("%w: %w", errSyncFailed, mapSpace(err, "blobstore: sync ingest "+w.ref))
		return w.syncErr
	}
	return nil
}

// writeHash writes p at w.off (f's position) and hashes what was
// written. Large writes hash in parallel with the write syscall; on a
// short write the hash is rewound.
func (w *localIngest) writeHash(p []byte) (int, error) {
	if len(p) < 256<<10 {
		n, err := w.f.Write(p)
		w.h.Write(p[:n])
		return n, err
	}
	snap, err := w.h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return 0, err
	}
	if w.hashDone == nil {
		w.hashDone = make(chan struct{}, 1)
	}
	go func() {
		w.h.Write(p)
		w.hashDone <- struct{}{}
	}()
	// Through the page cache, with the writeback started at once
	// (below), not with O_DIRECT from the caller's buffer: a direct write
	// holds the ingest until the disk has the piece, so the disk idles
	// while the next frame is handed over and hashed. Measured on a VM
	// whose disk takes ~700 MB/s: pushes of the 1.6 GB bench layer took
	// 2.26-2.39 s this way, 2.97-3.10 s direct (5 alternated pairs), for
	// 0.15-0.3 s more store CPU. The pages are dropped after each
	// checkpoint (dropCache), so the cache the ingest writes into is
	// reused, not grown.
	//
	// At most writeSyscallMax per write(2): the kernel sizes page-cache
	// folios by the write's length, and for multi-MiB writes it takes
	// huge folios, which (measured on a VM: 1 GiB in 4 MiB writes cost
	// 0.45-4.4 s of system CPU, in 1 MiB writes a steady 0.43 s; 4 GiB in
	// 1 MiB writes 2.9-4.6 s, in 256 KiB writes 1.9-2.0 s) can cost far
	// more to fill than the copy itself.
	var n int
	var werr error
	for n < len(p) && werr == nil {
		var k int
		k, werr = w.f.Write(p[n:min(len(p), n+writeSyscallMax)])
		n += k
	}
	<-w.hashDone
	if n < len(p) {
		if err := w.h.(encoding.BinaryUnmarshaler).UnmarshalBinary(snap); err != nil {
			return 0, err
		}
		w.h.Write(p[:n])
	}
	if werr == nil && n > 0 {
		// Start writeback now so the checkpoint's fsync has little left to
		// wait for and the disk works while we hash the next buffer.
		_ = unix.SyncFileRange(int(w.f.Fd()), w.off, int64(n), unix.SYNC_FILE_RANGE_WRITE)
	}
	return n, werr
}

// writeSyscallMax bounds one write(2) of ingest data (see writeHash).
const writeSyscallMax = 256 << 10

// dropCache drops the page-cache pages of f's bytes [from, to), which the
// caller has just fsynced (so they are clean and DONTNEED frees them).
//
// Why: an ingest is a backup stream, written once and read rarely, so
// keeping it cached only evicts pages that are worth keeping. It is also
// what keeps ingest fast on a VM: a page freed here is the next one the
// ingest's writes allocate, while a page never touched before (or handed
// back to the hypervisor by free-page reporting) costs a host fault to
// fill. Measured on the 2-core CI VM: 4 GiB written as three new files in
// a row cost 1.3, 9.0 and 15.6 s of system CPU; an ingest that drops its
// pages after each checkpoint reuses the same few dozen MiB throughout.
func dropCache(f *os.File, from, to int64) {
	// The kernel keeps partial pages at both ends; the page holding from
	// was made durable by the checkpoint before, so take it too.
	from &^= int64(os.Getpagesize() - 1)
	if to > from {
		_ = unix.Fadvise(int(f.Fd()), from, to-from, unix.FADV_DONTNEED)
	}
}

// checkpoint makes the data durable up to w.off and records that offset
// with the hash state: fsync data first, then replace the state atomically,
// so the state never claims bytes that are not on disk.
func (w *localIngest) checkpoint() error {
	if err := w.waitCheckpoint(); err != nil {
		return err
	}
	if err := w.sync(); err != nil {
		return err
	}
	b, err := marshalIngestState(w.off, w.h)
	if err != nil {
		return fmt.Errorf("blobstore: marshal hash state: %w", err)
	}
	if err := fsutil.WriteFile(filepath.Join(w.dir, ingestStateFile), b, 0o600); err != nil {
		return mapSpace(err, "blobstore: checkpoint ingest "+w.ref)
	}
	w.durable = w.off
	return nil
}

// Offset implements Ingest.
func (w *localIngest) Offset() int64 { return w.off }

// Digest implements Ingest.
func (w *localIngest) Digest() digest.Digest { return digest.NewDigest(digest.SHA256, w.h) }

// Err implements Ingest: the sticky fsync failure, if any.
func (w *localIngest) Err() error {
	_ = w.waitCheckpoint()
	if w.syncErr != nil {
		return w.sync()
	}
	return nil
}

// Close implements Ingest: checkpoint, then release the file and its lock.
func (w *localIngest) Close() error {
	if w.done {
		return nil
	}
	w.done = true
	err := w.checkpoint()
	if cerr := w.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("blobstore: close ingest: %w", cerr)
	}
	return err
}

// Cancel implements Ingest.
func (w *localIngest) Cancel() error {
	if w.done {
		return nil
	}
	w.done = true
	_ = w.waitCheckpoint() // its file is about to go anyway
	err := os.RemoveAll(w.dir)
	w.f.Close()
	if err != nil {
		return fmt.Errorf("blobstore: cancel ingest %s: %w", w.ref, err)
	}
	return nil
}

// Commit implements Ingest: fsync data, then under commitMu either find
// the blob present (touch it, drop the ingest) or chmod 0444 and rename
// data to blobs/sha256/<hh>/<hex>; then fsync the blob directories. A blob
// appears only by an atomic rename of a complete, fsynced file.
func (w *localIngest) Commit(ctx context.Context, d digest.Digest) (bool, error) {
	if w.done {
		return false, fmt.Errorf("blobstore: commit of finished ingest %s", w.ref)
	}
	// A background checkpoint that failed to write its state file does
	// not matter here (Commit fsyncs the data itself and the state file is
	// discarded); one whose fsync failed does, and w.sync reports it.
	_ = w.waitCheckpoint()
	if err := w.sync(); err != nil {
		_ = w.Close()
		return false, err
	}
	dropCache(w.f, w.durable, w.off)
	created, err := w.l.publish(d, w.f, filepath.Join(w.dir, ingestData))
	if err != nil && !created {
		_ = w.Close()
		return false, err
	}
	w.done = true
	// The blob is in place (durable unless err says its directory sync
	// failed); the ingest directory is garbage from here on, and
	// NewLocal/SweepIngests would clean it after a crash.
	os.RemoveAll(w.dir)
	w.f.Close()
	_ = fsutil.SyncDir(filepath.Join(w.l.root, dirIngest))
	return created, err
}

// publish renames the fsynced data file into place, or touches the blob
// if it is already there.
func (l *Local) publish(d digest.Digest, f *os.File, dataPath string) (bool, error) {
	path := l.blobPath(d)
	dir := filepath.Dir(path)
	l.commitMu.Lock()
	if _, err := os.Lstat(path); err == nil {
		// Already stored: refresh its time so the GC grace protects it
		// from a GC that has not yet seen the image about to reference it.
		touch(path)
		l.commitMu.Unlock()
		return false, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		l.commitMu.Unlock()
		return false, mapSpace(err, "blobstore: create blob dir")
	}
	_ = f.Chmod(0o444) // blobs are immutable
	if err := os.Rename(dataPath, path); err != nil {
		l.commitMu.Unlock()
		return false, mapSpace(err, "blobstore: commit blob")
	}
	// The mtime is the commit time the GC grace counts from after a restart.
	touch(path)
	l.commitMu.Unlock()
	if err := fsutil.SyncDir(dir); err != nil {
		return true, fmt.Errorf("blobstore: sync blob dir: %w", err)
	}
	if err := fsutil.SyncDir(filepath.Dir(dir)); err != nil {
		return true, fmt.Errorf("blobstore: sync blob dir: %w", err)
	}
	return true, nil
}

// IngestOffset implements Backend.
func (l *Local) IngestOffset(ctx context.Context, ref string) (int64, error) {
	dir := l.ingestDir(ref)
	fi, err := os.Stat(filepath.Join(dir, ingestData))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, fmt.Errorf("%w: ingest %s", ErrNotFound, ref)
		}
		return 0, fmt.Errorf("blobstore: %w", err)
	}
	b, err := os.ReadFile(filepath.Join(dir, ingestStateFile))
	if err != nil {
		return 0, nil
	}
	st, _, err := parseIngestState(b)
	if err != nil || st.Offset > fi.Size() {
		return 0, nil
	}
	return st.Offset, nil
}

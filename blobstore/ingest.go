package blobstore

import (
	"imagestore/internal/fsutil"

	"context"
	"crypto/sha256"
	"encoding"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

const (
	ingestData      = "data"
	ingestStateFile = "state"
	// copyBufSize is the one fixed buffer Put streams through.
	copyBufSize = 1 << 20
)

// Writer streams one ingest. It is not safe for concurrent use; one Writer
// per ref exists at a time (flock on the data file, across processes too).
type Writer struct {
	s        *Store
	ctx      context.Context
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
	// cache, and Commit fails; a new Writer resumes from durable.
	syncErr error

	// commitFailed: Commit failed and closed the ingest, resumable; a
	// Cancel after it still removes the ingest (see Cancel).
	commitFailed bool
	creation     Creation // set by a Commit that stored new bytes
}

// errSyncFailed marks the error of a failed data fsync.
var errSyncFailed = errors.New("fsync failed")

func (s *Store) ingestDir(ref string) string { return filepath.Join(s.root, dirIngest, ref) }

// Writer opens the ingest ref, resuming from its last durable checkpoint if
// an earlier Writer left one. A ref held by another Writer gives ErrLocked.
func (s *Store) Writer(ctx context.Context, ref string) (*Writer, error) {
	if err := ValidateName(ref); err != nil {
		return nil, fmt.Errorf("blobstore: ingest ref: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	dir := s.ingestDir(ref)
	var f *os.File
	// Retry while a concurrent cleanup removes the directory under us.
	for attempt := 0; ; attempt++ {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, mapSpace(err, "blobstore: create ingest")
		}
		var err error
		f, err = os.OpenFile(filepath.Join(dir, ingestData), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && attempt < 5 {
				continue
			}
			return nil, mapSpace(err, "blobstore: open ingest")
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("%w: %s", ErrLocked, ref)
			}
			return nil, fmt.Errorf("blobstore: lock ingest %s: %w", ref, err)
		}
		if sameFile(f, filepath.Join(dir, ingestData)) {
			break
		}
		f.Close() // removed between open and lock; start over
		if attempt >= 5 {
			return nil, fmt.Errorf("blobstore: ingest %s keeps disappearing", ref)
		}
	}
	w := &Writer{s: s, ctx: ctx, ref: ref, dir: dir, f: f, h: sha256.New()}
	if err := w.restore(); err != nil {
		f.Close()
		return nil, err
	}
	return w, nil
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
func (w *Writer) restore() error {
	fi, err := w.f.Stat()
	if err != nil {
		return fmt.Errorf("blobstore: stat ingest: %w", err)
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
			w.s.log.Warn("ingest checkpoint unusable, restarting from zero", "ref", w.ref, "err", perr, "data_size", size)
		}
	case errors.Is(err, fs.ErrNotExist):
	default:
		return fmt.Errorf("blobstore: read ingest state: %w", err)
	}
	if size != off {
		if err := w.f.Truncate(off); err != nil {
			return fmt.Errorf("blobstore: truncate ingest: %w", err)
		}
		w.s.release(size - off)
	}
	if _, err := w.f.Seek(off, io.SeekStart); err != nil {
		return fmt.Errorf("blobstore: seek ingest: %w", err)
	}
	w.off, w.durable = off, off
	return nil
}

// Write appends p, hashing it as it goes. It fails with ErrQuotaExceeded
// before writing anything if p does not fit the quota, and with ErrNoSpace
// if the filesystem fills; after either the Writer stays consistent (Offset
// counts exactly the bytes on disk and in the hash).
func (w *Writer) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("blobstore: write to finished ingest %s", w.ref)
	}
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	if w.syncErr != nil {
		return 0, w.sync()
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := w.s.reserve(int64(len(p))); err != nil {
		return 0, fmt.Errorf("blobstore: ingest %s: %w", w.ref, err)
	}
	n, err := w.writeHash(p)
	w.off += int64(n)
	if n < len(p) {
		w.s.release(int64(len(p) - n))
	}
	if err != nil {
		return n, mapSpace(err, "blobstore: ingest "+w.ref)
	}
	if w.off-max(w.durable, w.pendOff) >= w.s.checkpointEvery {
		if err := w.startCheckpoint(); err != nil {
			return n, err
		}
	}
	return n, nil
}

// startCheckpoint checkpoints the current offset in the background, after
// waiting for the previous background checkpoint.
func (w *Writer) startCheckpoint() error {
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
	f, statePath, ref, from, to, syncFile := w.f, filepath.Join(w.dir, ingestStateFile), w.ref, w.durable, w.off, w.s.syncFile
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
func (w *Writer) waitCheckpoint() error {
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
func (w *Writer) sync() error {
	if w.syncErr != nil {
		return fmt.Errorf("blobstore: ingest %s: data past offset %d is not trusted after a failed fsync: %w", w.ref, w.durable, w.syncErr)
	}
	if err := w.s.syncFile(w.f); err != nil {
		w.syncErr = fmt.Errorf("%w: %w", errSyncFailed, mapSpace(err, "blobstore: sync ingest "+w.ref))
		return w.syncErr
	}
	return nil
}

// writeHash writes p and hashes what was written. Large writes hash in
// parallel with the write syscall; on a short write the hash is rewound.
func (w *Writer) writeHash(p []byte) (int, error) {
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
func (w *Writer) checkpoint() error {
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

// Offset returns the bytes written so far (durable or not).
func (w *Writer) Offset() int64 { return w.off }

// Close checkpoints and releases the ingest; a later Writer with the same
// ref resumes from here.
func (w *Writer) Close() error {
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

// Cancel removes the ingest and everything it wrote.
func (w *Writer) Cancel() error {
	if w.done && w.commitFailed {
		// Commit closed the ingest to keep it resumable; the caller gives
		// it up instead: take it again (unless someone else has) and drop it.
		w.commitFailed = false
		w2, err := w.s.Writer(context.WithoutCancel(w.ctx), w.ref)
		if err != nil {
			return fmt.Errorf("blobstore: cancel ingest %s after a failed commit: %w", w.ref, err)
		}
		return w2.Cancel()
	}
	if w.done {
		return nil
	}
	w.done = true
	_ = w.waitCheckpoint() // its file is about to go anyway
	err := os.RemoveAll(w.dir)
	w.f.Close()
	w.s.release(w.off)
	if err != nil {
		return fmt.Errorf("blobstore: cancel ingest %s: %w", w.ref, err)
	}
	return nil
}

// Commit verifies the ingest against size (-1 = any) and expected ("" =
// accept the computed digest) and moves it into place as a blob. A size or
// digest mismatch removes the ingest. Committing content that is already
// stored succeeds and keeps one copy. Other failures close the Writer and
// leave the ingest resumable by a new Writer for the ref, or removed by a
// Cancel of this one.
func (w *Writer) Commit(ctx context.Context, size int64, expected digest.Digest) (digest.Digest, error) {
	if w.done {
		return "", fmt.Errorf("blobstore: commit of finished ingest %s", w.ref)
	}
	if expected != "" {
		if err := validateDigest(expected); err != nil {
			return "", err
		}
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	// A background checkpoint that failed to write its state file does
	// not matter here (Commit fsyncs the data itself and the state file is
	// discarded); one whose fsync failed does, and w.sync reports it.
	_ = w.waitCheckpoint()
	if w.syncErr != nil {
		err := w.sync()
		w.closeAfterFailedCommit()
		return "", err
	}
	if size >= 0 && size != w.off {
		w.Cancel()
		return "", fmt.Errorf("%w: ingest %s has %d bytes, expected %d", ErrSizeMismatch, w.ref, w.off, size)
	}
	d := digest.NewDigest(digest.SHA256, w.h)
	if expected != "" && d != expected {
		w.Cancel()
		return "", fmt.Errorf("%w: ingest %s is %s, expected %s", ErrDigestMismatch, w.ref, d, expected)
	}
	if err := w.sync(); err != nil {
		w.closeAfterFailedCommit()
		return "", err
	}
	dropCache(w.f, w.durable, w.off)
	creation, err := w.s.commitBlob(d, w.f, filepath.Join(w.dir, ingestData), w.off)
	if err != nil {
		w.closeAfterFailedCommit()
		return "", err
	}
	w.creation = creation
	w.done = true
	// The blob is durable; the ingest directory is garbage from here on,
	// and Open/GC would clean it after a crash.
	os.RemoveAll(w.dir)
	w.f.Close()
	_ = fsutil.SyncDir(filepath.Join(w.s.root, dirIngest))
	return d, nil
}

// Creation identifies the Writer's Commit if it stored new bytes; it is
// the zero Creation if the content was already stored (and may belong to
// others) or Commit did not succeed. It is what Discard takes.
func (w *Writer) Creation() Creation { return w.creation }

// Creation identifies one commit that stored a new blob, so that Discard
// can tell whether a later commit of the same bytes (by another writer,
// whose record may be on its way) happened since.
type Creation struct {
	Digest digest.Digest
	seq    uint64 // the store's commit number; 0 = nothing was created
}

// Created reports whether the commit stored new bytes.
func (c Creation) Created() bool { return c.seq != 0 }

// commitMark is the latest commit of a blob: when and which.
type commitMark struct {
	at  time.Time
	seq uint64
}

// closeAfterFailedCommit closes the ingest, keeping its last good
// checkpoint for a retry, and lets a Cancel still remove it.
func (w *Writer) closeAfterFailedCommit() {
	_ = w.Close()
	w.commitFailed = true
}

// commitBlob renames the fsynced data file into place (or drops it if the
// blob already exists) under s.mu, so GC's sweep cannot interleave. Either
// way the commit becomes d's latest (s.commits), which CommitGrace and
// Discard go by; it returns the zero Creation if the blob existed.
func (s *Store) commitBlob(d digest.Digest, f *os.File, dataPath string, size int64) (Creation, error) {
	path := s.blobPath(d)
	dir := filepath.Dir(path)
	now := time.Now()
	s.mu.Lock()
	s.seq++
	mark := commitMark{at: now, seq: s.seq}
	if _, err := os.Lstat(path); err == nil {
		// Already stored: refresh its time so CommitGrace protects it from
		// a GC that has not yet seen the image about to reference it, and
		// so the creator's Discard leaves it alone.
		_ = os.Chtimes(path, now, now)
		s.commits[d] = mark
		s.used -= size
		s.mu.Unlock()
		return Creation{}, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		s.mu.Unlock()
		return Creation{}, mapSpace(err, "blobstore: create blob dir")
	}
	_ = f.Chmod(0o444) // blobs are immutable
	if err := os.Rename(dataPath, path); err != nil {
		s.mu.Unlock()
		return Creation{}, mapSpace(err, "blobstore: commit blob")
	}
	// The mtime is the commit time CommitGrace counts from after a restart.
	_ = os.Chtimes(path, now, now)
	s.commits[d] = mark
	s.blobs++
	s.mu.Unlock()
	c := Creation{Digest: d, seq: mark.seq}
	if err := fsutil.SyncDir(dir); err != nil {
		return c, fmt.Errorf("blobstore: sync blob dir: %w", err)
	}
	if err := fsutil.SyncDir(filepath.Dir(dir)); err != nil {
		return c, fmt.Errorf("blobstore: sync blob dir: %w", err)
	}
	return c, nil
}

// IngestOffset returns the durable offset a new Writer for ref would resume
// from, or ErrNotFound if there is no such ingest.
func (s *Store) IngestOffset(ref string) (int64, error) {
	if err := ValidateName(ref); err != nil {
		return 0, fmt.Errorf("blobstore: ingest ref: %w", err)
	}
	dir := s.ingestDir(ref)
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

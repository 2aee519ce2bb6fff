package blobstore

import (
	"context"
	"fmt"
	"time"

	"github.com/opencontainers/go-digest"
)

// copyBufSize is the one fixed buffer Put and Verify stream through.
const copyBufSize = 1 << 20

// Writer streams one ingest: the backend's Ingest wrapped with the quota
// reservation and the commit bookkeeping. It is not safe for concurrent
// use; one Writer per ref exists at a time (the local backend enforces it
// with a flock, across processes too).
type Writer struct {
	s    *Store
	ctx  context.Context
	ref  string
	in   Ingest
	done bool

	// commitFailed: Commit failed and closed the ingest, resumable; a
	// Cancel after it still removes the ingest (see Cancel).
	commitFailed bool
	creation     Creation // set by a Commit that stored new bytes
}

// Writer opens the ingest ref, resuming from its last durable checkpoint if
// an earlier Writer left one. A ref held by another Writer gives ErrLocked.
func (s *Store) Writer(ctx context.Context, ref string) (*Writer, error) {
	if err := ValidateName(ref); err != nil {
		return nil, fmt.Errorf("blobstore: ingest ref: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	in, dropped, err := s.backend.OpenIngest(ctx, ref)
	if err != nil {
		return nil, err
	}
	s.release(dropped)
	return &Writer{s: s, ctx: ctx, ref: ref, in: in}, nil
}

// Write appends p, hashing it as it goes. It fails with ErrQuotaExceeded
// before writing anything if p does not fit the quota, and with ErrNoSpace
// if the medium fills; after either the Writer stays consistent (Offset
// counts exactly the bytes stored and hashed).
func (w *Writer) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("blobstore: write to finished ingest %s", w.ref)
	}
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := w.s.reserve(int64(len(p))); err != nil {
		return 0, fmt.Errorf("blobstore: ingest %s: %w", w.ref, err)
	}
	n, err := w.in.Write(p)
	if n < len(p) {
		w.s.release(int64(len(p) - n))
	}
	return n, err
}

// Offset returns the bytes written so far (durable or not).
func (w *Writer) Offset() int64 { return w.in.Offset() }

// Close checkpoints and releases the ingest; a later Writer with the same
// ref resumes from here.
func (w *Writer) Close() error {
	if w.done {
		return nil
	}
	w.done = true
	return w.in.Close()
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
	off := w.in.Offset()
	err := w.in.Cancel()
	w.s.release(off)
	return err
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
	if err := w.in.Err(); err != nil {
		_ = w.Close()
		w.commitFailed = true
		return "", err
	}
	off := w.in.Offset()
	if size >= 0 && size != off {
		w.Cancel()
		return "", fmt.Errorf("%w: ingest %s has %d bytes, expected %d", ErrSizeMismatch, w.ref, off, size)
	}
	d := w.in.Digest()
	if expected != "" && d != expected {
		w.Cancel()
		return "", fmt.Errorf("%w: ingest %s is %s, expected %s", ErrDigestMismatch, w.ref, d, expected)
	}
	// While the backend publishes d, GC must not free it: a blob found
	// present is only touched (its grace renewed) inside the backend.
	release := w.s.Hold(d)
	defer release()
	created, err := w.in.Commit(ctx, d)
	w.done = true
	if err != nil && !created {
		w.commitFailed = true
		return "", err
	}
	c := w.s.committed(d, off, created)
	if err != nil {
		return "", err
	}
	w.creation = c
	return d, nil
}

// committed records a commit of d (size bytes): it becomes d's latest
// (s.commits), which CommitGrace and Discard go by. It returns the zero
// Creation if the blob existed (the ingest's bytes are then released).
func (s *Store) committed(d digest.Digest, size int64, created bool) Creation {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	mark := commitMark{at: time.Now(), seq: s.seq}
	s.commits[d] = mark
	if !created {
		s.used -= size
		return Creation{}
	}
	s.blobs++
	return Creation{Digest: d, seq: mark.seq}
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

// IngestOffset returns the durable offset a new Writer for ref would resume
// from, or ErrNotFound if there is no such ingest.
func (s *Store) IngestOffset(ref string) (int64, error) {
	if err := ValidateName(ref); err != nil {
		return 0, fmt.Errorf("blobstore: ingest ref: %w", err)
	}
	return s.backend.IngestOffset(context.Background(), ref)
}

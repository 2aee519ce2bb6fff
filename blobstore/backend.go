package blobstore

import (
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Backend is where a Store keeps its bytes: committed blobs, resumable
// ingests and small records. It only stores; every rule (name and digest
// validation, quota, holds, the commit grace, image-record rules, GC and
// verify policy) is the Store's. Two implementations exist: the local
// filesystem (NewLocal, the default) and S3 (package blobstore/s3).
//
// Errors a caller branches on wrap the package's sentinels: ErrNotFound
// (no such blob, ingest or record), ErrExists (PutRecord of an existing
// key), ErrLocked (an ingest in use), ErrNoSpace (the medium is full) and
// ErrNoLocalPath (BlobPath of a backend without files).
//
// Digests, refs and record keys reach a Backend already validated by the
// Store (digests: lowercase sha256; refs: ValidateName; keys: see
// PutRecord). A Backend is safe for concurrent use. The Store serialises
// the operations on one digest that must not interleave (commit, delete,
// quarantine) within one process; across processes sharing a backend (two
// agents on one bucket) only the backend's own primitives hold.
//
// Running the local backend without paths: wrap it in a type that embeds
// the Backend and overrides BlobPath to return ErrNoLocalPath
// (blobstoretest.NoPaths does exactly that), so callers' no-path routes
// can be tested on local disk.
type Backend interface {
	// StatBlob describes committed blob d (ErrNotFound if absent).
	// ModTime is when d was committed or last re-committed (see Commit);
	// it is what the GC grace counts from after a restart.
	StatBlob(ctx context.Context, d digest.Digest) (BlobInfo, error)
	// OpenBlob opens committed blob d for ranged reads (ErrNotFound).
	OpenBlob(ctx context.Context, d digest.Digest) (Blob, error)
	// WalkBlobs calls fn for every committed blob in digest order,
	// skipping entries that are not well-formed blobs; an error from fn
	// stops the walk and is returned.
	WalkBlobs(ctx context.Context, fn func(BlobInfo) error) error
	// DeleteBlob removes committed blob d (ErrNotFound if absent). Once it
	// returns the removal is durable. ErrInUse: the backend saw a commit
	// of the same content in flight that relies on d, and kept it.
	DeleteBlob(ctx context.Context, d digest.Digest) error
	// QuarantineBlob moves blob d out of the blobs (it stops being served
	// and walked) to a place an operator can inspect, returned as a path
	// or key. ErrNotFound if absent.
	QuarantineBlob(ctx context.Context, d digest.Digest) (string, error)
	// BlobPath returns the path of committed blob d on a local filesystem,
	// for tools that read it in place; ErrNoLocalPath if the backend has
	// no files, ErrNotFound if d is absent.
	BlobPath(d digest.Digest) (string, error)

	// OpenIngest opens ingest ref, creating it or resuming it at its last
	// durable checkpoint with the hash restored (never re-reading data).
	// Bytes the ref held beyond that checkpoint are discarded; dropped is
	// how many (IngestBytes had counted them). An ingest open elsewhere
	// gives ErrLocked where the backend can tell (the local one can,
	// across processes; S3 cannot).
	OpenIngest(ctx context.Context, ref string) (w Ingest, dropped int64, err error)
	// IngestOffset is the durable offset a new OpenIngest of ref would
	// resume from (ErrNotFound if no such ingest).
	IngestOffset(ctx context.Context, ref string) (int64, error)
	// SweepIngests removes the ingests idle since before idleSince that
	// no open Ingest holds, reporting how many and the bytes they held.
	SweepIngests(ctx context.Context, idleSince time.Time) (removed int, freed int64, err error)
	// IngestBytes is the bytes all ingests hold (for the quota at Open).
	IngestBytes(ctx context.Context) (int64, error)

	// PutRecord stores a small record under key if the key is free
	// (ErrExists otherwise), atomically: a reader sees all of it or
	// nothing, and it is durable once PutRecord returns. Keys are one or
	// more components separated by "/", each passing ValidateName.
	PutRecord(ctx context.Context, key string, b []byte) error
	// GetRecord reads a record (ErrNotFound if absent).
	GetRecord(ctx context.Context, key string) ([]byte, error)
	// ListRecords lists the records whose key starts with prefix, which
	// is one or more whole components each followed by "/" ("images/",
	// "images/vol1/"), in key order.
	ListRecords(ctx context.Context, prefix string) ([]RecordInfo, error)
	// DeleteRecord removes a record durably; an absent key is no error.
	DeleteRecord(ctx context.Context, key string) error
	// ReadSettings returns the store's settings object (ErrNotFound if
	// never written); WriteSettings replaces it atomically and durably.
	ReadSettings(ctx context.Context) ([]byte, error)
	WriteSettings(ctx context.Context, b []byte) error

	// Capacity reports the medium's size and free space, or Known = false
	// when it has none to report (an object store).
	Capacity(ctx context.Context) (BackendCapacity, error)
	// Close releases the backend; the Store's Close calls it.
	Close() error
}

// Ingest is one open ingest of a Backend. It is used by one goroutine.
//
// The backend owns the hashing (so a local write can overlap its hash with
// the write syscall, and an S3 part can be hashed as it is spooled) and the
// checkpoints: a checkpoint records the durable offset with the sha256
// state of exactly those bytes (MarshalHashState) and is written only after
// the bytes it covers are durable, so a resumed ingest never trusts a byte
// that was lost.
type Ingest interface {
	// Write appends p and hashes exactly the bytes it stored: n < len(p)
	// only with an error, and after any error Offset still counts exactly
	// the bytes stored and hashed.
	Write(p []byte) (n int, err error)
	// Offset is the bytes written and hashed so far, durable or not.
	Offset() int64
	// Digest is the sha256 of the Offset bytes.
	Digest() digest.Digest
	// Err reports a sticky failure (after waiting for background work):
	// once it is non-nil the ingest can only be closed, staying resumable
	// from its last durable checkpoint, or cancelled. The local backend's
	// is a failed fsync, after which no byte past the last checkpoint is
	// trusted. The Store checks it before size and digest at Commit.
	Err() error
	// Close checkpoints and releases the ingest; a later OpenIngest of the
	// ref resumes from that checkpoint.
	Close() error
	// Cancel removes the ingest and everything it stored.
	Cancel() error
	// Commit makes the ingest's bytes durable and then visible as blob d
	// in one atomic step: no reader ever sees a partial blob. The Store
	// has checked size and digest (Offset, Digest) against the caller's
	// expectations before, and holds d against GC during the call. If d
	// is already stored, Commit keeps one copy, drops the ingest, renews
	// d's ModTime (the GC grace counts from it) and reports created =
	// false. Within one backend, of concurrent Commits of the same d at
	// most one reports created. On an error with created = false the
	// ingest is closed and stays resumable from its last durable
	// checkpoint; created = true with an error means the blob is visible
	// but its durability could not be confirmed (the ingest is gone).
	Commit(ctx context.Context, d digest.Digest) (created bool, err error)
}

// RecordInfo names one record and when it was written.
type RecordInfo struct {
	Key     string
	ModTime time.Time
}

// BackendCapacity is a Backend's view of its medium.
type BackendCapacity struct {
	Total, Free int64
	Known       bool // false: the medium has no size to report (S3)
}

// ErrNoLocalPath is returned by BlobPath when the backend keeps blobs
// somewhere without a local file path (an object store): the caller reads
// the blob through OpenBlob instead.
var ErrNoLocalPath = errors.New("blob has no local path")

// ValidateRecordKey checks a record key: one or more components separated
// by "/", each passing ValidateName. Backends may call it to refuse a key
// that could escape their namespace.
func ValidateRecordKey(key string) error {
	for c := range strings.SplitSeq(key, "/") {
		if err := ValidateName(c); err != nil {
			return fmt.Errorf("record key %q: %w", key, err)
		}
	}
	return nil
}

// validateRecordPrefix checks a ListRecords prefix (whole components, each
// followed by "/").
func validateRecordPrefix(prefix string) error {
	p, ok := strings.CutSuffix(prefix, "/")
	if !ok {
		return fmt.Errorf("%w: record prefix %q does not end with /", ErrInvalidName, prefix)
	}
	return ValidateRecordKey(p)
}

// NewIngestHash returns the hash an ingest feeds: sha256.
func NewIngestHash() hash.Hash { return sha256.New() }

// MarshalHashState is the ingest hash's state for a checkpoint.
func MarshalHashState(h hash.Hash) ([]byte, error) {
	m, ok := h.(encoding.BinaryMarshaler)
	if !ok {
		return nil, fmt.Errorf("blobstore: hash %T cannot be marshalled", h)
	}
	return m.MarshalBinary()
}

// sha256 MarshalBinary layout (stable since Go 1.11): "sha\x03", 8 state
// words, one 64-byte block, then the message length as a big-endian uint64.
const (
	sha256MarshalLen = 4 + 8*4 + 64 + 8
	sha256Magic      = "sha\x03"
)

// UnmarshalHashState restores an ingest hash from MarshalHashState's bytes,
// which come from storage and may be torn or tampered with: it checks
// their shape and that the hash has consumed exactly offset bytes.
func UnmarshalHashState(b []byte, offset int64) (hash.Hash, error) {
	if offset < 0 {
		return nil, fmt.Errorf("hash state: negative offset %d", offset)
	}
	if len(b) != sha256MarshalLen || string(b[:4]) != sha256Magic {
		return nil, fmt.Errorf("hash state: malformed sha256 state (%d bytes)", len(b))
	}
	if n := binary.BigEndian.Uint64(b[sha256MarshalLen-8:]); n != uint64(offset) {
		return nil, fmt.Errorf("hash state: hash covers %d bytes, offset says %d", n, offset)
	}
	h := sha256.New()
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(b); err != nil {
		return nil, fmt.Errorf("hash state: sha256: %w", err)
	}
	return h, nil
}

package blobstore

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Every error returned by the store wraps one of these (or
// ErrInvalidName from ref.go) with the detail, so callers branch with errors.Is.
var (
	ErrNotFound       = errors.New("not found")
	ErrExists         = errors.New("already exists")
	ErrDigestMismatch = errors.New("digest mismatch")
	ErrSizeMismatch   = errors.New("size mismatch")
	ErrQuotaExceeded  = errors.New("quota exceeded")
	ErrNoSpace        = errors.New("no space left on the store's filesystem")
	ErrParentNotFound = errors.New("parent image not found")
	ErrLoop           = errors.New("image chain loop")
	ErrLocked         = errors.New("ingest is in use by another writer")
	ErrCorrupt        = errors.New("blob is corrupt")
	ErrChainTooDeep   = errors.New("image chain too deep")
	// ErrInUse: a backend refused to delete a blob that a commit in flight
	// relies on (on S3, possibly another agent's); GC leaves it for later.
	ErrInUse = errors.New("blob is in use by a commit in flight")
)

// mapSpace turns ENOSPC/EDQUOT from the filesystem into ErrNoSpace, keeping
// the original error in the chain for the detail.
func mapSpace(err error, what string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %s: %w", ErrNoSpace, what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

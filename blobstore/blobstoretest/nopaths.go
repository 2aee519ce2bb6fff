// Package blobstoretest is for tests only: the conformance suite every
// blobstore.Backend must pass (Run), and NoPaths, which runs a backend
// with files as if it had none.
package blobstoretest

import (
	"fmt"

	"imagestore/blobstore"

	"github.com/opencontainers/go-digest"
)

// NoPaths wraps b so that BlobPath answers blobstore.ErrNoLocalPath, as a
// backend without files (S3) does; everything else is b's. It lets the
// callers' no-path routes (read through OpenBlob) run on local disk.
func NoPaths(b blobstore.Backend) blobstore.Backend { return noPaths{b} }

type noPaths struct{ blobstore.Backend }

func (noPaths) BlobPath(d digest.Digest) (string, error) {
	return "", fmt.Errorf("%w: blob %s (test backend without paths)", blobstore.ErrNoLocalPath, d)
}

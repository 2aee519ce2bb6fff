package blobstore

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Blob is an open committed blob.
type Blob interface {
	ReadAt(p []byte, off int64) (int, error)
	Close() error
	Size() int64
}

// RangeReader is an optional interface of a Blob whose backend serves a
// long sequential read better as one stream than as ReadAt calls (S3: one
// GET instead of a request per ReadAt). ReadRange returns the n bytes at
// off (clamped to the blob's size); a body that ends early is an error.
// Callers check for it with a type assertion and fall back to ReadAt. A
// body that holds the bytes in memory may implement io.WriterTo, writing
// them from its own buffers (the registry then copies nothing itself).
type RangeReader interface {
	ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error)
}

// BlobInfo describes a committed blob.
type BlobInfo struct {
	Digest  digest.Digest
	Size    int64
	ModTime time.Time
}

// validateDigest accepts only well-formed sha256 digests, so a digest can
// never smuggle a path.
func validateDigest(d digest.Digest) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("%w: digest %q: %v", ErrInvalidName, string(d), err)
	}
	if d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("%w: digest %q: only sha256 is supported", ErrInvalidName, string(d))
	}
	return nil
}

// BlobPath returns the absolute path of a committed blob, for tools such as
// qemu-img that read it in place. Treat the file as read-only. A backend
// without files (S3) gives ErrNoLocalPath: read the blob with OpenBlob.
func (s *Store) BlobPath(d digest.Digest) (string, error) {
	if err := validateDigest(d); err != nil {
		return "", err
	}
	return s.backend.BlobPath(d)
}

// BackingName is the qcow2 backing file name a layer uses for its parent
// blob: relative to the layer's own directory, so chains open in place.
func BackingName(parent digest.Digest) string {
	h := parent.Encoded()
	if len(h) < 2 {
		return "../" + h
	}
	return "../" + h[:2] + "/" + h
}

// DigestFromBackingName parses a name made by BackingName.
func DigestFromBackingName(name string) (digest.Digest, error) {
	rest, ok := strings.CutPrefix(name, "../")
	if !ok {
		return "", fmt.Errorf("%w: backing name %q does not start with ../", ErrInvalidName, name)
	}
	hh, h, ok := strings.Cut(rest, "/")
	if !ok || len(h) < 2 || hh != h[:2] {
		return "", fmt.Errorf("%w: backing name %q is not ../<hh>/<hex>", ErrInvalidName, name)
	}
	d := digest.NewDigestFromEncoded(digest.SHA256, h)
	if err := validateDigest(d); err != nil {
		return "", err
	}
	return d, nil
}

// OpenBlob opens a committed blob for random reads.
func (s *Store) OpenBlob(ctx context.Context, d digest.Digest) (Blob, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := validateDigest(d); err != nil {
		return nil, err
	}
	return s.backend.OpenBlob(ctx, d)
}

// Stat describes a committed blob.
func (s *Store) Stat(ctx context.Context, d digest.Digest) (BlobInfo, error) {
	if err := ctx.Err(); err != nil {
		return BlobInfo{}, err
	}
	if err := validateDigest(d); err != nil {
		return BlobInfo{}, err
	}
	return s.backend.StatBlob(ctx, d)
}

// Exists reports whether a blob is committed; a malformed digest is not.
func (s *Store) Exists(d digest.Digest) bool {
	if validateDigest(d) != nil {
		return false
	}
	_, err := s.backend.StatBlob(context.Background(), d)
	return err == nil
}

// Hold protects blobs from GC until release is called (e.g. while an image
// record referencing them is being prepared, or while they are exported).
func (s *Store) Hold(ds ...digest.Digest) (release func()) {
	s.mu.Lock()
	for _, d := range ds {
		s.holds[d]++
	}
	s.mu.Unlock()
	released := false
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if released {
			return
		}
		released = true
		for _, d := range ds {
			if s.holds[d]--; s.holds[d] <= 0 {
				delete(s.holds, d)
			}
		}
	}
}

// WalkBlobs calls fn for every committed blob, in digest order. Entries
// that are not well-formed blob names are skipped.
func (s *Store) WalkBlobs(ctx context.Context, fn func(BlobInfo) error) error {
	return s.backend.WalkBlobs(ctx, fn)
}

package blobstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
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

func (s *Store) blobPath(d digest.Digest) string {
	h := d.Encoded()
	return filepath.Join(s.root, dirBlobs, "sha256", h[:2], h)
}

// BlobPath returns the absolute path of a committed blob, for tools such as
// qemu-img that read it in place. Treat the file as read-only.
func (s *Store) BlobPath(d digest.Digest) (string, error) {
	if err := validateDigest(d); err != nil {
		return "", err
	}
	p := s.blobPath(d)
	if _, err := os.Lstat(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("%w: blob %s", ErrNotFound, d)
		}
		return "", fmt.Errorf("blobstore: %w", err)
	}
	return p, nil
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

type blobFile struct {
	*os.File
	size int64
}

func (b blobFile) Size() int64 { return b.size }

// OpenBlob opens a committed blob for random reads.
func (s *Store) OpenBlob(ctx context.Context, d digest.Digest) (Blob, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := validateDigest(d); err != nil {
		return nil, err
	}
	f, err := os.Open(s.blobPath(d))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: blob %s", ErrNotFound, d)
		}
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	return blobFile{File: f, size: fi.Size()}, nil
}

// Stat describes a committed blob.
func (s *Store) Stat(ctx context.Context, d digest.Digest) (BlobInfo, error) {
	if err := ctx.Err(); err != nil {
		return BlobInfo{}, err
	}
	if err := validateDigest(d); err != nil {
		return BlobInfo{}, err
	}
	fi, err := os.Lstat(s.blobPath(d))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return BlobInfo{}, fmt.Errorf("%w: blob %s", ErrNotFound, d)
		}
		return BlobInfo{}, fmt.Errorf("blobstore: %w", err)
	}
	return BlobInfo{Digest: d, Size: fi.Size(), ModTime: fi.ModTime()}, nil
}

// Exists reports whether a blob is committed; a malformed digest is not.
func (s *Store) Exists(d digest.Digest) bool {
	if validateDigest(d) != nil {
		return false
	}
	_, err := os.Lstat(s.blobPath(d))
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
	base := filepath.Join(s.root, dirBlobs, "sha256")
	dirs, err := os.ReadDir(base)
	if err != nil {
		return fmt.Errorf("blobstore: list blobs: %w", err)
	}
	for _, dd := range dirs {
		if !dd.IsDir() || len(dd.Name()) != 2 {
			continue
		}
		ents, err := os.ReadDir(filepath.Join(base, dd.Name()))
		if err != nil {
			return fmt.Errorf("blobstore: list blobs: %w", err)
		}
		for _, e := range ents {
			if err := ctx.Err(); err != nil {
				return err
			}
			d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
			if validateDigest(d) != nil || e.Name()[:2] != dd.Name() || !e.Type().IsRegular() {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					continue // swept meanwhile
				}
				return fmt.Errorf("blobstore: %w", err)
			}
			if err := fn(BlobInfo{Digest: d, Size: fi.Size(), ModTime: fi.ModTime()}); err != nil {
				return err
			}
		}
	}
	return nil
}

package blobstore

import (
	"imagestore/internal/fsutil"

	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
)

// GCResult reports what a GC freed.
type GCResult struct {
	BlobsFreed     int
	BytesFreed     int64
	IngestsRemoved int
	ImagesRemoved  int
}

// GC is a mark-and-sweep collection.
//
// keep nil keeps every recorded image. Otherwise keep lists the live images
// (imagesToKeep); records neither listed, nor an ancestor of a listed image,
// nor written less than CommitGrace ago (with their ancestors) are deleted.
// Then every blob not referenced by a kept record is freed, except blobs
// that are held (Hold) or were committed less than CommitGrace ago, which
// covers ingests and commits in flight. Expired ingests are removed too.
func (s *Store) GC(ctx context.Context, keep []Ref) (GCResult, error) {
	var res GCResult
	for _, r := range keep {
		if err := r.Validate(); err != nil {
			return res, fmt.Errorf("blobstore: gc keep: %w", err)
		}
	}
	// Holding imgMu for mark and sweep means no record can start pointing
	// at a blob between the mark and its unlink.
	s.imgMu.Lock()
	defer s.imgMu.Unlock()

	n, freed, err := s.cleanIngests(ctx, false)
	res.IngestsRemoved = n
	s.release(freed)
	if err != nil {
		return res, err
	}

	all, err := s.listImages(ctx, "")
	if err != nil {
		return res, err
	}
	now := time.Now()
	live, err := s.mark(ctx, all, keep, now, &res)
	if err != nil {
		return res, err
	}
	if err := s.sweepUnmarked(ctx, live, now, &res); err != nil {
		return res, err
	}
	s.mu.Lock()
	for d, t := range s.commits {
		if now.Sub(t) >= s.opts.CommitGrace {
			delete(s.commits, d)
		}
	}
	s.mu.Unlock()
	if res.BlobsFreed > 0 || res.IngestsRemoved > 0 || res.ImagesRemoved > 0 {
		s.log.Info("gc done", "blobs_freed", res.BlobsFreed, "bytes_freed", res.BytesFreed,
			"ingests_removed", res.IngestsRemoved, "images_removed", res.ImagesRemoved)
	}
	return res, nil
}

// mark returns the blobs of the records GC keeps, deleting the records it
// does not keep (with a keep list; see GC).
func (s *Store) mark(ctx context.Context, all []Image, keep []Ref, now time.Time, res *GCResult) (map[digest.Digest]bool, error) {
	live := map[digest.Digest]bool{}
	if keep == nil {
		for _, img := range all {
			live[img.Blob] = true
		}
	} else {
		kept := map[Ref]bool{}
		roots := append([]Ref(nil), keep...)
		for _, img := range all {
			if fi, err := os.Stat(s.imagePath(img.Ref)); err == nil && now.Sub(fi.ModTime()) < s.opts.CommitGrace {
				roots = append(roots, img.Ref)
			}
		}
		// A keep list can name tens of thousands of images: chains are
		// walked over the records already listed (each record visited
		// once), and unknown entries are counted and logged once, with a
		// few examples.
		byRef := make(map[Ref]Image, len(all))
		for _, img := range all {
			byRef[img.Ref] = img
		}
		var unknown []string
		nUnknown := 0
		for _, r := range roots {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if _, ok := byRef[r]; !ok {
				if nUnknown++; len(unknown) < 10 {
					unknown = append(unknown, r.String())
				}
				continue
			}
			for depth := 0; !kept[r] && depth <= MaxChainDepth; depth++ {
				img, ok := byRef[r]
				if !ok {
					break // a missing parent: keep what is there
				}
				kept[r] = true
				if img.Parent == "" {
					break
				}
				p, err := ParseRef(img.Parent)
				if err != nil {
					break
				}
				r = p
			}
		}
		if nUnknown > 0 {
			s.log.Warn("gc: images to keep are not recorded", "count", nUnknown, "examples", unknown)
		}
		for _, img := range all {
			if kept[img.Ref] {
				live[img.Blob] = true
				continue
			}
			if err := s.removeRecord(img.Ref); err != nil {
				return nil, err
			}
			res.ImagesRemoved++
		}
	}
	return live, nil
}

// sweepUnmarked frees every blob not in live that sweep may free, then
// makes the unlinks durable.
func (s *Store) sweepUnmarked(ctx context.Context, live map[digest.Digest]bool, now time.Time, res *GCResult) error {
	var candidates []BlobInfo
	if err := s.WalkBlobs(ctx, func(bi BlobInfo) error {
		if !live[bi.Digest] {
			candidates = append(candidates, bi)
		}
		return nil
	}); err != nil {
		return err
	}
	dirs := map[string]bool{}
	for _, bi := range candidates {
		if err := ctx.Err(); err != nil {
			return err
		}
		ok, err := s.sweep(bi.Digest, now)
		if err != nil {
			return err
		}
		if ok {
			res.BlobsFreed++
			res.BytesFreed += bi.Size
			dirs[filepath.Dir(s.blobPath(bi.Digest))] = true
		}
	}
	for d := range dirs {
		if err := fsutil.SyncDir(d); err != nil {
			return fmt.Errorf("blobstore: gc: %w", err)
		}
	}
	return nil
}

// sweep unlinks one unmarked blob unless it is held or recently committed.
// It runs under s.mu, the same lock commitBlob renames under.
func (s *Store) sweep(d digest.Digest, now time.Time) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holds[d] > 0 {
		return false, nil
	}
	if t, ok := s.commits[d]; ok && now.Sub(t) < s.opts.CommitGrace {
		return false, nil
	}
	p := s.blobPath(d)
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("blobstore: gc: %w", err)
	}
	if now.Sub(fi.ModTime()) < s.opts.CommitGrace {
		return false, nil
	}
	if err := os.Remove(p); err != nil {
		return false, fmt.Errorf("blobstore: gc: %w", err)
	}
	s.used -= fi.Size()
	s.blobs--
	delete(s.commits, d)
	return true, nil
}

// Discard removes blob d right away if nothing uses it: no hold and no
// image record names it. It is for a blob a refused operation created
// (Writer.Created), so a refusal leaves nothing behind for GC; it reports
// whether the blob was removed.
func (s *Store) Discard(ctx context.Context, d digest.Digest) (bool, error) {
	if err := validateDigest(d); err != nil {
		return false, err
	}
	imgs, err := s.listImages(ctx, "")
	if err != nil {
		return false, err
	}
	for _, img := range imgs {
		if img.Blob == d {
			return false, nil
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holds[d] > 0 {
		return false, nil
	}
	p := s.blobPath(d)
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("blobstore: discard: %w", err)
	}
	if err := os.Remove(p); err != nil {
		return false, fmt.Errorf("blobstore: discard: %w", err)
	}
	s.used -= fi.Size()
	s.blobs--
	delete(s.commits, d)
	_ = fsutil.SyncDir(filepath.Dir(p))
	return true, nil
}

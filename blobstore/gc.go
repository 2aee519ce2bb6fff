package blobstore

import (
	"context"
	"errors"
	"fmt"
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

	n, freed, err := s.backend.SweepIngests(ctx, time.Now().Add(-s.opts.IngestExpiry))
	res.IngestsRemoved = n
	s.release(freed)
	if err != nil {
		return res, err
	}

	all, err := s.listImageRecords(ctx, "")
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
	for d, m := range s.commits {
		if now.Sub(m.at) >= s.opts.CommitGrace {
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
func (s *Store) mark(ctx context.Context, all []imageRecord, keep []Ref, now time.Time, res *GCResult) (map[digest.Digest]bool, error) {
	live := map[digest.Digest]bool{}
	if keep == nil {
		for _, img := range all {
			live[img.Blob] = true
		}
	} else {
		kept := map[Ref]bool{}
		roots := append([]Ref(nil), keep...)
		for _, img := range all {
			if now.Sub(img.modTime) < s.opts.CommitGrace {
				roots = append(roots, img.Ref)
			}
		}
		// A keep list can name tens of thousands of images: chains are
		// walked over the records already listed (each record visited
		// once), and unknown entries are counted and logged once, with a
		// few examples.
		byRef := make(map[Ref]Image, len(all))
		for _, img := range all {
			byRef[img.Ref] = img.Image
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
			if err := s.removeRecord(ctx, img.Ref); err != nil {
				return nil, err
			}
			res.ImagesRemoved++
		}
	}
	return live, nil
}

// sweepUnmarked frees every blob not in live that sweep may free.
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
	for _, bi := range candidates {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, ok, err := s.freeBlob(ctx, bi.Digest, now, Creation{})
		if err != nil {
			return err
		}
		if ok {
			res.BlobsFreed++
			res.BytesFreed += n
		}
	}
	return nil
}

// freeBlob deletes blob d under s.mu unless something may still use it: a
// hold (a Writer holds d while its backend commits it), or a commit less
// than CommitGrace ago (its latest in s.commits, else the blob's ModTime,
// which survives a restart). own exempts one commit from the grace: the
// one Discard's caller made, as long as it is still d's latest. The caller
// holds imgMu and has checked that no record names d. It reports the
// bytes freed and whether d was removed.
func (s *Store) freeBlob(ctx context.Context, d digest.Digest, now time.Time, own Creation) (int64, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holds[d] > 0 {
		return 0, false, nil
	}
	m, ok := s.commits[d]
	mine := ok && own.seq != 0 && own.Digest == d && m.seq == own.seq
	if ok && !mine && now.Sub(m.at) < s.opts.CommitGrace {
		return 0, false, nil
	}
	bi, err := s.backend.StatBlob(ctx, d)
	if errors.Is(err, ErrNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("blobstore: free blob: %w", err)
	}
	if !mine && now.Sub(bi.ModTime) < s.opts.CommitGrace {
		return 0, false, nil
	}
	if err := s.backend.DeleteBlob(ctx, d); err != nil {
		if errors.Is(err, ErrNotFound) || errors.Is(err, ErrInUse) {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("blobstore: free blob: %w", err)
	}
	s.used -= bi.Size
	s.blobs--
	delete(s.commits, d)
	return bi.Size, true, nil
}

// Discard removes the blob a commit created (Writer.Creation) right away
// if nothing uses it: no hold, no image record, and no commit of the same
// bytes since (another writer's, whose record may be on its way). It is
// for a blob a refused operation created, so a refusal leaves nothing
// behind for GC; it reports whether the blob was removed. The zero
// Creation (the bytes were already stored) discards nothing.
func (s *Store) Discard(ctx context.Context, c Creation) (bool, error) {
	if !c.Created() {
		return false, nil
	}
	if err := validateDigest(c.Digest); err != nil {
		return false, err
	}
	// Like GC: no record can start naming the blob between the listing
	// and the unlink (PutImage takes imgMu too, before s.mu).
	s.imgMu.RLock()
	defer s.imgMu.RUnlock()
	imgs, err := s.listImages(ctx, "")
	if err != nil {
		return false, err
	}
	for _, img := range imgs {
		if img.Blob == c.Digest {
			return false, nil
		}
	}
	if s.discardListed != nil {
		s.discardListed()
	}
	_, ok, err := s.freeBlob(ctx, c.Digest, time.Now(), c)
	if err != nil || !ok {
		return false, err
	}
	return true, nil
}

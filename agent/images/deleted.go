package images

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"imagestore/blobstore"
	"imagestore/internal/fsutil"
)

// An image the management node deletes while incremental children still
// need it cannot go (records are immutable and a child's chain reads it).
// Delete marks it instead: an empty file <root>/deleted/<name>/<id>. A
// marked image is gone for lookups and listings; its record and blob stay
// until no live descendant needs them, and every Delete and GC reclaims
// the marked images that have become childless.

// DeleteResult says what Delete did.
type DeleteResult struct {
	// Deleted: the record is gone now (with any marked ancestors it freed).
	Deleted bool
	// Deferred: the image has children; it is marked deleted and
	// reclaimed once no live descendant needs it.
	Deferred bool
	// Reclaimed lists marked ancestors removed because this delete (or
	// GC) left them without children.
	Reclaimed []blobstore.Ref
}

func (s *Service) markPath(r blobstore.Ref) string { return filepath.Join(s.deletedDir, r.Name, r.ID) }

// marked reports whether r was deleted while it had children.
func (s *Service) marked(r blobstore.Ref) bool {
	_, err := os.Lstat(s.markPath(r))
	return err == nil
}

func (s *Service) mark(r blobstore.Ref) error {
	p := s.markPath(r)
	if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
		return err
	}
	return fsutil.WriteFile(p, nil, 0o600)
}

func (s *Service) unmark(r blobstore.Ref) {
	if err := os.Remove(s.markPath(r)); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Warn("removing deleted mark", "image", r.String(), "err", err)
	}
	_ = os.Remove(filepath.Dir(s.markPath(r))) // only when empty
}

// markedRefs lists the marked images.
func (s *Service) markedRefs() ([]blobstore.Ref, error) {
	names, err := os.ReadDir(s.deletedDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []blobstore.Ref
	for _, n := range names {
		ids, err := os.ReadDir(filepath.Join(s.deletedDir, n.Name()))
		if err != nil {
			continue
		}
		for _, id := range ids {
			r := blobstore.Ref{Name: n.Name(), ID: id.Name()}
			if r.Validate() == nil {
				out = append(out, r)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, nil
}

// reclaimUp removes ref and then its ancestors while each is marked and
// has no children left (the walk a delete of a leaf makes).
func (s *Service) reclaimUp(ctx context.Context, ref blobstore.Ref) ([]blobstore.Ref, error) {
	var out []blobstore.Ref
	for ref.Name != "" && s.marked(ref) {
		img, err := s.store.GetImage(ctx, ref)
		if errors.Is(err, blobstore.ErrNotFound) {
			s.unmark(ref) // GC removed it
			return out, nil
		}
		if err != nil {
			return out, err
		}
		err = s.store.DeleteImage(ctx, ref)
		switch {
		case errors.Is(err, blobstore.ErrExists):
			return out, nil // still needed
		case errors.Is(err, blobstore.ErrNotFound):
			s.unmark(ref)
			return out, nil
		case err != nil:
			return out, fmt.Errorf("reclaiming deleted image %s: %w", ref, err)
		}
		s.unmark(ref)
		s.log.Info("deleted image reclaimed: no child needs it any more", "image", ref.String())
		out = append(out, ref)
		ref = blobstore.Ref{}
		if img.Parent != "" {
			if ref, err = blobstore.ParseRef(img.Parent); err != nil {
				return out, nil
			}
		}
	}
	return out, nil
}

// reclaim removes every marked image nobody needs any more (after GC
// removed records): one listing finds the childless marks, and each
// reclaims its marked ancestors.
func (s *Service) reclaim(ctx context.Context) ([]blobstore.Ref, error) {
	refs, err := s.markedRefs()
	if err != nil || len(refs) == 0 {
		return nil, err
	}
	all, err := s.store.ListImages(ctx, "")
	if err != nil {
		return nil, err
	}
	recorded, parents := map[blobstore.Ref]bool{}, map[string]bool{}
	for _, img := range all {
		recorded[img.Ref] = true
		if img.Parent != "" {
			parents[img.Parent] = true
		}
	}
	var out []blobstore.Ref
	for _, r := range refs {
		switch {
		case !recorded[r]:
			s.unmark(r)
		case !parents[r.String()]:
			got, err := s.reclaimUp(ctx, r)
			out = append(out, got...)
			if err != nil {
				return out, err
			}
		}
	}
	return out, nil
}

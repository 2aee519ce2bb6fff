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

// reclaim removes marked images nobody needs any more, repeating while a
// removal frees another (a chain of marked ancestors goes in one call).
func (s *Service) reclaim(ctx context.Context) ([]blobstore.Ref, error) {
	var out []blobstore.Ref
	for {
		refs, err := s.markedRefs()
		if err != nil {
			return out, err
		}
		progress := false
		for _, r := range refs {
			err := s.store.DeleteImage(ctx, r)
			switch {
			case err == nil:
				out = append(out, r)
				s.unmark(r)
				progress = true
				s.log.Info("deleted image reclaimed: no child needs it any more", "image", r.String())
			case errors.Is(err, blobstore.ErrNotFound):
				s.unmark(r) // GC removed it
			case errors.Is(err, blobstore.ErrExists):
				// Still has children.
			default:
				return out, fmt.Errorf("reclaiming deleted image %s: %w", r, err)
			}
		}
		if !progress {
			return out, nil
		}
	}
}

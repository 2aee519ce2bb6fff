package blobstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Image is the record of one stored image: a blob plus its place in a chain.
type Image struct {
	Ref                       // name, id
	Blob        digest.Digest `json:"blobsum"`
	Parent      string        `json:"parent,omitempty"` // "name:id" of the parent image, "" for a base
	Created     time.Time     `json:"created"`
	Author      string        `json:"author,omitempty"`
	Arch        string        `json:"arch,omitempty"`
	Desc        string        `json:"desc,omitempty"`
	Size        int64         `json:"size"`        // blob bytes
	VirtualSize int64         `json:"virtualsize"` // guest bytes
	Format      string        `json:"format"`      // "qcow2", "raw", or an opaque format such as "gzip"
}

// MaxChainDepth caps how many images a chain may hold, top included.
const MaxChainDepth = 1000

// maxRecordSize bounds an image record file; real ones are a few hundred bytes.
const maxRecordSize = 64 << 10

// maxTextLen bounds free-text fields.
const maxTextLen = 4096

// validateImage checks every field that does not need the store.
func validateImage(img Image) error {
	if err := img.Ref.Validate(); err != nil {
		return err
	}
	if err := validateDigest(img.Blob); err != nil {
		return fmt.Errorf("image %s: blobsum: %w", img.Ref, err)
	}
	if img.Parent != "" {
		p, err := ParseRef(img.Parent)
		if err != nil {
			return fmt.Errorf("image %s: parent: %w", img.Ref, err)
		}
		if p == img.Ref {
			return fmt.Errorf("%w: image %s is its own parent", ErrLoop, img.Ref)
		}
	}
	if img.Size < 0 || img.VirtualSize < 0 {
		return fmt.Errorf("%w: image %s: negative size", ErrInvalidName, img.Ref)
	}
	if img.Format != "" {
		if err := ValidateName(img.Format); err != nil {
			return fmt.Errorf("image %s: format: %w", img.Ref, err)
		}
	}
	for _, f := range []struct{ name, v string }{{"author", img.Author}, {"arch", img.Arch}, {"desc", img.Desc}} {
		if len(f.v) > maxTextLen {
			return fmt.Errorf("%w: image %s: %s is %d bytes, at most %d", ErrInvalidName, img.Ref, f.name, len(f.v), maxTextLen)
		}
	}
	return nil
}

// parseImageRecord decodes an image record read from disk (untrusted: it
// may be torn or edited) and validates it.
func parseImageRecord(b []byte) (Image, error) {
	if len(b) > maxRecordSize {
		return Image{}, fmt.Errorf("image record: %d bytes, at most %d", len(b), maxRecordSize)
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return Image{}, fmt.Errorf("image record: %w", err)
	}
	if err := validateImage(img); err != nil {
		return Image{}, fmt.Errorf("image record: %w", err)
	}
	return img, nil
}

// imageKey is the record key of image r: images/<name>/<id>.
func imageKey(r Ref) string { return dirImages + "/" + r.Name + "/" + r.ID }

// readImage loads one record; the caller has validated r.
func (s *Store) readImage(ctx context.Context, r Ref) (Image, error) {
	b, err := s.backend.GetRecord(ctx, imageKey(r))
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return Image{}, fmt.Errorf("%w: image %s", ErrNotFound, r)
		}
		return Image{}, fmt.Errorf("blobstore: %w", err)
	}
	img, err := parseImageRecord(b)
	if err != nil {
		return Image{}, fmt.Errorf("blobstore: record %s: %w", imageKey(r), err)
	}
	if img.Ref != r {
		return Image{}, fmt.Errorf("blobstore: record %s names %s", imageKey(r), img.Ref)
	}
	return img, nil
}

// PutImage records an image. It validates the names, that the blob exists
// (and matches Size, if given), that the parent exists, and that the chain
// has no loop and stays within MaxChainDepth. Records are immutable: putting
// an existing ref again succeeds only with identical content (a retry).
func (s *Store) PutImage(ctx context.Context, img Image) error {
	if err := validateImage(img); err != nil {
		return fmt.Errorf("blobstore: put image: %w", err)
	}
	createdGiven := !img.Created.IsZero()
	if !createdGiven {
		img.Created = time.Now().UTC()
	}
	s.imgMu.Lock()
	defer s.imgMu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	bi, err := s.Stat(ctx, img.Blob)
	if err != nil {
		return fmt.Errorf("blobstore: put image %s: %w", img.Ref, err)
	}
	if img.Size == 0 {
		img.Size = bi.Size
	} else if img.Size != bi.Size {
		return fmt.Errorf("blobstore: put image %s: %w: record says %d bytes, blob %s has %d", img.Ref, ErrSizeMismatch, img.Size, img.Blob, bi.Size)
	}
	if img.Parent != "" {
		p, _ := ParseRef(img.Parent)
		chain, err := s.chain(ctx, p)
		switch {
		case errors.Is(err, ErrNotFound) && len(chain) == 0:
			return fmt.Errorf("blobstore: put image %s: %w: %s", img.Ref, ErrParentNotFound, p)
		case err != nil:
			return fmt.Errorf("blobstore: put image %s: parent chain: %w", img.Ref, err)
		}
		for _, c := range chain {
			if c.Ref == img.Ref {
				return fmt.Errorf("blobstore: put image %s: %w: %s is an ancestor of its parent %s", img.Ref, ErrLoop, img.Ref, p)
			}
		}
		if len(chain)+1 > MaxChainDepth {
			return fmt.Errorf("blobstore: put image %s: %w: would be %d deep, at most %d", img.Ref, ErrChainTooDeep, len(chain)+1, MaxChainDepth)
		}
	}
	// An existing record (a retry, or one a store sharing the backend
	// wrote meanwhile: PutRecord is create-only) must be identical.
	same := func() error {
		old, err := s.readImage(ctx, img.Ref)
		if err != nil {
			return fmt.Errorf("blobstore: put image %s: %w", img.Ref, err)
		}
		if !createdGiven {
			img.Created = old.Created
		}
		if imagesEqual(old, img) {
			return nil
		}
		return fmt.Errorf("blobstore: put image: %w: %s with different content", ErrExists, img.Ref)
	}
	if _, err := s.readImage(ctx, img.Ref); err == nil {
		return same()
	}
	b, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return fmt.Errorf("blobstore: put image: %w", err)
	}
	if err := s.backend.PutRecord(ctx, imageKey(img.Ref), b); err != nil {
		if errors.Is(err, ErrExists) {
			return same()
		}
		return fmt.Errorf("blobstore: put image %s: %w", img.Ref, err)
	}
	return nil
}

func imagesEqual(a, b Image) bool {
	ac, bc := a.Created, b.Created
	a.Created, b.Created = time.Time{}, time.Time{}
	return a == b && ac.Equal(bc)
}

// GetImage returns one record.
func (s *Store) GetImage(ctx context.Context, r Ref) (Image, error) {
	if err := r.Validate(); err != nil {
		return Image{}, fmt.Errorf("blobstore: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return Image{}, err
	}
	s.imgMu.RLock()
	defer s.imgMu.RUnlock()
	return s.readImage(ctx, r)
}

// ListImages returns the records under name ("" = all), sorted by Created
// then ID.
func (s *Store) ListImages(ctx context.Context, name string) ([]Image, error) {
	if name != "" {
		if err := ValidateName(name); err != nil {
			return nil, fmt.Errorf("blobstore: image name: %w", err)
		}
	}
	s.imgMu.RLock()
	defer s.imgMu.RUnlock()
	return s.listImages(ctx, name)
}

func (s *Store) listImages(ctx context.Context, name string) ([]Image, error) {
	recs, err := s.listImageRecords(ctx, name)
	if err != nil {
		return nil, err
	}
	out := make([]Image, len(recs))
	for i, r := range recs {
		out[i] = r.Image
	}
	return out, nil
}

// imageRecord is an image with the time its record was written.
type imageRecord struct {
	Image
	modTime time.Time
}

// listImageRecords reads the records under name ("" = all), sorted by
// Created then ID then name.
func (s *Store) listImageRecords(ctx context.Context, name string) ([]imageRecord, error) {
	prefix := dirImages + "/"
	if name != "" {
		prefix += name + "/"
	}
	infos, err := s.backend.ListRecords(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("blobstore: list images: %w", err)
	}
	var out []imageRecord
	for _, ri := range infos {
		r, ok := imageRefOfKey(ri.Key)
		if !ok {
			continue
		}
		img, err := s.readImage(ctx, r)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				continue
			}
			return nil, err
		}
		out = append(out, imageRecord{Image: img, modTime: ri.ModTime})
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if !a.Created.Equal(b.Created) {
			return a.Created.Before(b.Created)
		}
		if a.ID != b.ID {
			return a.ID < b.ID
		}
		return a.Name < b.Name
	})
	return out, nil
}

// imageRefOfKey parses images/<name>/<id>.
func imageRefOfKey(key string) (Ref, bool) {
	rest, ok := strings.CutPrefix(key, dirImages+"/")
	if !ok {
		return Ref{}, false
	}
	name, id, ok := strings.Cut(rest, "/")
	if !ok {
		return Ref{}, false
	}
	r := Ref{Name: name, ID: id}
	return r, r.Validate() == nil
}

// Chain returns r and its ancestors, top first.
func (s *Store) Chain(ctx context.Context, r Ref) ([]Image, error) {
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	s.imgMu.RLock()
	defer s.imgMu.RUnlock()
	c, err := s.chain(ctx, r)
	if err != nil {
		return nil, fmt.Errorf("blobstore: chain of %s: %w", r, err)
	}
	return c, nil
}

// chain walks parents from r. On a missing ancestor it returns the part
// walked so far with ErrNotFound (r itself missing) or ErrParentNotFound.
func (s *Store) chain(ctx context.Context, r Ref) ([]Image, error) {
	var out []Image
	seen := map[Ref]bool{}
	cur := r
	for {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		if seen[cur] {
			return out, fmt.Errorf("%w: %s appears twice", ErrLoop, cur)
		}
		if len(out) >= MaxChainDepth {
			return out, fmt.Errorf("%w: more than %d images", ErrChainTooDeep, MaxChainDepth)
		}
		seen[cur] = true
		img, err := s.readImage(ctx, cur)
		if err != nil {
			if errors.Is(err, ErrNotFound) && len(out) > 0 {
				return out, fmt.Errorf("%w: %s (parent of %s)", ErrParentNotFound, cur, out[len(out)-1].Ref)
			}
			return out, err
		}
		out = append(out, img)
		if img.Parent == "" {
			return out, nil
		}
		if cur, err = ParseRef(img.Parent); err != nil {
			return out, err
		}
	}
}

// Children returns the images whose parent is r.
func (s *Store) Children(ctx context.Context, r Ref) ([]Ref, error) {
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	s.imgMu.RLock()
	defer s.imgMu.RUnlock()
	return s.children(ctx, r)
}

func (s *Store) children(ctx context.Context, r Ref) ([]Ref, error) {
	all, err := s.listImages(ctx, "")
	if err != nil {
		return nil, err
	}
	var out []Ref
	for _, img := range all {
		if img.Parent == r.String() {
			out = append(out, img.Ref)
		}
	}
	return out, nil
}

// DeleteImage removes a record. An image that other images use as parent
// is refused (ErrExists, "has children"): delete the children first. The
// blob is freed by the next GC.
func (s *Store) DeleteImage(ctx context.Context, r Ref) error {
	if err := r.Validate(); err != nil {
		return fmt.Errorf("blobstore: %w", err)
	}
	s.imgMu.Lock()
	defer s.imgMu.Unlock()
	if _, err := s.readImage(ctx, r); err != nil && errors.Is(err, ErrNotFound) {
		return fmt.Errorf("blobstore: delete image: %w", err)
	}
	kids, err := s.children(ctx, r)
	if err != nil {
		return err
	}
	if len(kids) > 0 {
		names := make([]string, len(kids))
		for i, k := range kids {
			names[i] = k.String()
		}
		return fmt.Errorf("blobstore: delete image %s: %w: has children %s", r, ErrExists, strings.Join(names, ", "))
	}
	return s.removeRecord(ctx, r)
}

func (s *Store) removeRecord(ctx context.Context, r Ref) error {
	if err := s.backend.DeleteRecord(ctx, imageKey(r)); err != nil {
		return fmt.Errorf("blobstore: delete image %s: %w", r, err)
	}
	return nil
}

func (s *Store) countImages(ctx context.Context) (int, error) {
	s.imgMu.RLock()
	defer s.imgMu.RUnlock()
	infos, err := s.backend.ListRecords(ctx, dirImages+"/")
	if err != nil {
		return 0, fmt.Errorf("blobstore: list images: %w", err)
	}
	n := 0
	for _, ri := range infos {
		if _, ok := imageRefOfKey(ri.Key); ok {
			n++
		}
	}
	return n, nil
}

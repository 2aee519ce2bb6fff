// Package images serves the store's image records to the protocol: look
// one up by install path, list, walk a chain, hash a blob, delete, collect
// garbage, and allocate install paths. It reads and deletes; imports are
// agent/ingest's.
package images

import (
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/ctxio"
)

// Options configure the service.
type Options struct {
	Store *blobstore.Store
	// GCFreed counts the bytes garbage collection frees; nil: not counted.
	GCFreed prometheus.Counter
	// DeletedDir holds the marks of images deleted while they had
	// children (deleted.go); default <store root>/deleted.
	DeletedDir string
	Logger     *slog.Logger
}

// Service answers image reads of one store.
type Service struct {
	store      *blobstore.Store
	gcFreed    prometheus.Counter
	deletedDir string
	log        *slog.Logger
}

// New returns the service over opts.Store.
func New(opts Options) (*Service, error) {
	if opts.Store == nil {
		return nil, errors.New("images: no store")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir := opts.DeletedDir
	if dir == "" {
		dir = filepath.Join(opts.Store.Root(), "deleted")
	}
	return &Service{store: opts.Store, gcFreed: opts.GCFreed, deletedDir: dir, log: log}, nil
}

// DatabaseBackupName is the image name database backups are stored under.
const DatabaseBackupName = "zsbak"

// NewID returns a fresh random image id (32 hex digits).
func NewID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// ParsePath accepts zstore://name/id or name:id; errors name field.
func ParsePath(field, s string) (blobstore.Ref, error) {
	if s == "" {
		return blobstore.Ref{}, fmt.Errorf("missing field %s", field)
	}
	var ref blobstore.Ref
	var err error
	if strings.HasPrefix(s, blobstore.InstallPathScheme) {
		ref, err = blobstore.ParseInstallPath(s)
	} else {
		ref, err = blobstore.ParseRef(s)
	}
	if err != nil {
		return ref, fmt.Errorf("%s: %w", field, err)
	}
	return ref, nil
}

// NewRef picks a new image's name and id: the allocated installPath if
// given, else name (or the parent's name) with a new id.
func NewRef(installPath, name string, parent *blobstore.Image) (blobstore.Ref, error) {
	if installPath != "" {
		return ParsePath("installPath", installPath)
	}
	if name == "" && parent != nil {
		name = parent.Name
	}
	ref := blobstore.Ref{Name: name, ID: NewID()}
	if err := ref.Validate(); err != nil {
		return ref, fmt.Errorf("name: %w", err)
	}
	return ref, nil
}

// Skipped is a keep-list entry GC could not use, and why.
type Skipped struct {
	Index  int
	Entry  string
	Reason string
}

func (k Skipped) String() string {
	return fmt.Sprintf("imagesToKeep[%d] %q: %s", k.Index, k.Entry, k.Reason)
}

// ParseKeep parses gc's imagesToKeep list. The management node lists
// every install path it knows for this store, including ones that are not
// images here (a pending upload's http URL): entries that are not
// zstore://name/id (or name:id), or do not parse, are skipped and
// returned, never fatal. No usable entry gives nil: keep everything.
func ParseKeep(paths []string) (keep []blobstore.Ref, skipped []Skipped) {
	for i, p := range paths {
		if j := strings.Index(p, "://"); j > 0 && !strings.HasPrefix(p, blobstore.InstallPathScheme) {
			skipped = append(skipped, Skipped{Index: i, Entry: p, Reason: "not a zstore:// install path"})
			continue
		}
		field := fmt.Sprintf("imagesToKeep[%d]", i)
		ref, err := ParsePath(field, p)
		if err != nil {
			skipped = append(skipped, Skipped{Index: i, Entry: p, Reason: strings.TrimPrefix(err.Error(), field+": ")})
			continue
		}
		keep = append(keep, ref)
	}
	return keep, skipped
}

// Lookup parses an install path and loads the image, with errors that
// name the field and whether the path was malformed or unknown.
func (s *Service) Lookup(ctx context.Context, field, path string) (blobstore.Image, error) {
	ref, err := ParsePath(field, path)
	if err != nil {
		return blobstore.Image{}, err
	}
	img, err := s.store.GetImage(ctx, ref)
	if err == nil && s.marked(ref) {
		return blobstore.Image{}, fmt.Errorf("%s %s was deleted (its data stays only while incremental children need it)", field, path)
	}
	if errors.Is(err, blobstore.ErrNotFound) {
		if field == "parent" {
			return img, fmt.Errorf("parent %s not found in the store", path)
		}
		return img, fmt.Errorf("unknown install path %s (field %s): no such image", path, field)
	}
	if err != nil {
		return img, fmt.Errorf("%s %s: %w", field, path, err)
	}
	return img, nil
}

// Info returns the image at installPath.
func (s *Service) Info(ctx context.Context, installPath string) (blobstore.Info, error) {
	img, err := s.Lookup(ctx, "installPath", installPath)
	if err != nil {
		return blobstore.Info{}, err
	}
	return img.Info(), nil
}

// Chain returns the chain of the image at installPath, top first.
func (s *Service) Chain(ctx context.Context, installPath string) ([]blobstore.Info, error) {
	img, err := s.Lookup(ctx, "installPath", installPath)
	if err != nil {
		return nil, err
	}
	chain, err := s.store.Chain(ctx, img.Ref)
	if err != nil {
		return nil, err
	}
	out := make([]blobstore.Info, len(chain))
	for i, c := range chain {
		out[i] = c.Info()
	}
	return out, nil
}

// List returns the images of a name ("" = every image), oldest first.
func (s *Service) List(ctx context.Context, name string) ([]blobstore.Info, error) {
	if name != "" {
		if err := (blobstore.Ref{Name: name, ID: "x"}).Validate(); err != nil {
			return nil, fmt.Errorf("name: %w", err)
		}
	}
	imgs, err := s.store.ListImages(ctx, name)
	if err != nil {
		return nil, err
	}
	out := make([]blobstore.Info, 0, len(imgs))
	for _, img := range imgs {
		if !s.marked(img.Ref) {
			out = append(out, img.Info())
		}
	}
	return out, nil
}

// Delete removes an image record (its blob is freed by the next GC).
// Deleting an absent image succeeds with Deleted false, so a retried
// delete is harmless. An image with children is marked deleted (Deferred)
// and reclaimed once no live descendant needs it; deleting the last child
// of marked ancestors reclaims them too.
func (s *Service) Delete(ctx context.Context, ref blobstore.Ref) (DeleteResult, error) {
	var res DeleteResult
	img, err := s.store.GetImage(ctx, ref)
	if err == nil {
		err = s.store.DeleteImage(ctx, ref)
	}
	switch {
	case errors.Is(err, blobstore.ErrNotFound):
		s.unmark(ref)
		return res, nil
	case errors.Is(err, blobstore.ErrExists):
		if err := s.mark(ref); err != nil {
			return res, fmt.Errorf("marking %s deleted: %w", ref, err)
		}
		s.log.Info("image has children: marked deleted, reclaimed when none needs it", "image", ref.String())
		res.Deferred = true
		return res, nil
	case err != nil:
		return res, err
	}
	s.unmark(ref)
	s.log.Info("image deleted", "image", ref.String())
	res.Deleted = true
	if img.Parent != "" {
		if parent, perr := blobstore.ParseRef(img.Parent); perr == nil {
			res.Reclaimed, err = s.reclaimUp(ctx, parent)
		}
	}
	return res, err
}

// GC deletes image records not in keep (nor their ancestors) and frees
// unreferenced blobs; an empty keep keeps every image (see blobstore.GC).
// Marked deleted images that no kept image needs any more go too.
func (s *Service) GC(ctx context.Context, keep []blobstore.Ref) (blobstore.GCResult, error) {
	res, err := s.store.GC(ctx, keep)
	if err != nil {
		return res, err
	}
	if refs, err := s.reclaim(ctx); err != nil {
		return res, err
	} else if len(refs) > 0 {
		// Collecting records left marked ancestors childless: collect
		// their blobs now too.
		more, err := s.store.GC(ctx, keep)
		if err != nil {
			return res, err
		}
		res.BlobsFreed += more.BlobsFreed
		res.BytesFreed += more.BytesFreed
		res.IngestsRemoved += more.IngestsRemoved
		res.ImagesRemoved += len(refs) + more.ImagesRemoved
	}
	if s.gcFreed != nil {
		s.gcFreed.Add(float64(res.BytesFreed))
	}
	s.log.Info("gc done", "freedBytes", res.BytesFreed, "blobs", res.BlobsFreed, "images", res.ImagesRemoved)
	return res, nil
}

// CheckHashAlgorithm accepts the algorithms Hash supports: sha256, md5.
func CheckHashAlgorithm(alg string) error {
	_, err := newHash(alg)
	return err
}

func newHash(alg string) (hash.Hash, error) {
	switch alg {
	case "sha256":
		return sha256.New(), nil
	case "md5":
		return md5.New(), nil
	}
	return nil, fmt.Errorf("alogrithm %q not supported (sha256 or md5)", alg)
}

// HashRequest asks for the hash of an image's blob.
type HashRequest struct {
	InstallPath string
	Algorithm   string // "sha256" or "md5"
}

// Hash hashes the image's blob (the stored layer bytes) by streaming it
// and returns the hex digest.
func (s *Service) Hash(ctx context.Context, req HashRequest, p jobs.Progress) (string, error) {
	h, err := newHash(req.Algorithm)
	if err != nil {
		return "", err
	}
	img, err := s.Lookup(ctx, "installPath", req.InstallPath)
	if err != nil {
		return "", err
	}
	p.SetImage("", img.InstallPath(), img.Format)
	b, err := s.store.OpenBlob(ctx, img.Blob)
	if err != nil {
		return "", err
	}
	defer b.Close()
	p.SetTotal(b.Size())
	if _, err := io.Copy(h, jobs.Reader(p, ctxio.Reader(ctx, io.NewSectionReader(b, 0, b.Size())))); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// AllocInstallPath returns zstore://<parent's name>/<new id> for a parent
// (an install path or name:id), or zstore://<name or a new name>/<new id>
// without one. Ids are random, so an allocation needs no record; an
// import refuses an existing one.
func (s *Service) AllocInstallPath(ctx context.Context, parent, name string) (string, error) {
	if parent != "" {
		p, err := s.Lookup(ctx, "parent", parent)
		if err != nil {
			return "", err
		}
		name = p.Name
	}
	if name == "" {
		name = NewID()
	}
	ref := blobstore.Ref{Name: name, ID: NewID()}
	if err := ref.Validate(); err != nil {
		return "", fmt.Errorf("name: %w", err)
	}
	return ref.InstallPath(), nil
}

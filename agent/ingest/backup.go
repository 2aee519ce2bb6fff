package ingest

import (
	"context"
	"fmt"
	"io"
	"time"

	"imagestore/agent/images"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/qcow2"
)

// BackupRequest is import-backup: store a file a KVM host wrote into an
// upload dir (or an allowed import root) as an image.
type BackupRequest struct {
	Task        string // the job's id; names the ingest, so a retried job resumes it
	ImgURL      string // the file: an absolute path or file://path
	Name        string // the image's name ("" = the parent's)
	Desc        string
	Parent      string // install path or name:id of the parent ("" = a base)
	InstallPath string // an allocated install path to record under ("" = name and a new id)
	ImageUUID   string // reported in progress lookups
	// ProcessToRelease names the NBD target group that wrote the file:
	// its servers are stopped before the file is read.
	ProcessToRelease string
}

// ImportBackup stores req's file on top of its parent: a qcow2 is
// normalised into a canonical layer backed by the parent's blob, anything
// else is stored as-is.
func (s *Service) ImportBackup(ctx context.Context, req BackupRequest, p jobs.Progress) (blobstore.Image, error) {
	if req.ProcessToRelease != "" && s.opts.ReleaseProcess != nil {
		if err := s.opts.ReleaseProcess(req.ProcessToRelease); err != nil {
			return blobstore.Image{}, err
		}
	}
	parent, ref, err := s.parentAndRef(ctx, req.Parent, req.InstallPath, req.Name)
	if err != nil {
		return blobstore.Image{}, err
	}
	p.SetImage(firstNonEmpty(req.ImageUUID, ref.Name), ref.InstallPath(), "")
	path, err := s.opts.Uploads.Confine(req.ImgURL)
	if err != nil {
		return blobstore.Image{}, err
	}
	return s.importFile(ctx, p, path, ref, parent, req.Desc, "agent-"+req.Task)
}

// parentAndRef resolves a request's optional parent ("name:id" or an
// install path; nil when empty) and picks the new image's ref on top of it.
func (s *Service) parentAndRef(ctx context.Context, parent, installPath, name string) (*blobstore.Image, blobstore.Ref, error) {
	var p *blobstore.Image
	if parent != "" {
		img, err := s.opts.Images.Lookup(ctx, "parent", parent)
		if err != nil {
			return nil, blobstore.Ref{}, err
		}
		p = &img
	}
	ref, err := images.NewRef(installPath, name, p)
	return p, ref, err
}

// importFile stores the file at path (confined) as image ref on top of
// parent; a qcow2 is normalised through ingest ref ingestRef.
func (s *Service) importFile(ctx context.Context, p jobs.Progress, path string, ref blobstore.Ref, parent *blobstore.Image, desc, ingestRef string) (blobstore.Image, error) {
	f, err := s.opts.Uploads.Open(path)
	if err != nil {
		return blobstore.Image{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return blobstore.Image{}, err
	}
	if boot := s.bootTime(); !boot.IsZero() && fi.ModTime().Before(boot) {
		// Backup targets are written without flushes (host-side files
		// and the store's NBD targets alike): bytes written before this
		// machine last started may have been lost with its page cache,
		// and a torn file would be stored as a valid backup.
		return blobstore.Image{}, fmt.Errorf("%w: %s was last written at %s, before this machine started (%s); its bytes may not have reached the disk, take the backup again",
			ErrWrittenBeforeBoot, path, fi.ModTime().UTC().Format(time.RFC3339), boot.UTC().Format(time.RFC3339))
	}
	size := fi.Size()
	p.SetTotal(size)
	format := sniff(f)
	p.SetImage("", "", format)
	spec := layer.Spec{Record: layer.Record{Ref: ref, Parent: parent, Format: format, Desc: desc}}
	if format != "qcow2" {
		spec.Reader, spec.Size = jobs.Reader(p, f), size
		return s.commit(ctx, spec, size, func(err error) error { return fmt.Errorf("storing %s: %w", path, err) })
	}
	im, err := qcow2.Open(jobs.ReaderAt(p, f), size)
	if err != nil {
		return blobstore.Image{}, fmt.Errorf("imgurl is not a usable qcow2: %w", err)
	}
	if err := layer.CheckParent(im, parent); err != nil {
		return blobstore.Image{}, err
	}
	spec.Ingest = ingestRef
	spec.Content = normalizeContent(layer.Normalize(im, parent, qcow2.WriteOptions{}))
	return s.commit(ctx, spec, size, func(err error) error { return err })
}

// normalizeContent names the step that failed in a Normalize's errors.
func normalizeContent(c layer.Content) layer.Content {
	return func(ctx context.Context, w io.Writer) (int64, error) {
		n, err := c(ctx, w)
		if err != nil {
			return n, fmt.Errorf("normalizing qcow2: %w", err)
		}
		return n, nil
	}
}

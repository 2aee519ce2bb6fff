package ingest

import (
	"context"
	"fmt"
	"io"

	"imagestore/agent/images"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/qcow2"
)

// TemplateRequest is template/create: flatten a backup's chain into a new
// standalone base image.
type TemplateRequest struct {
	Task        string // the job's id; names the ingest ("template-<task>")
	InstallPath string // the backup (top of its chain)
	Name        string // the template's image name
	ID          string // the template's id ("" = a new one)
	Format      string // "qcow2" (default) or "raw"
	Compress    bool   // zstd-compressed clusters (qcow2 only)
	Arch, Desc  string // the record's ("" = the backup's)
}

// CreateTemplate flattens a backup's chain (opened by layer.OpenChain:
// held, checked, verified) into a new standalone base layer recorded
// under req.Name. The layer is canonical and
// deterministic: the same backup gives the same digest, so a second
// template of it shares the blob.
func (s *Service) CreateTemplate(ctx context.Context, req TemplateRequest, p jobs.Progress) (blobstore.Image, error) {
	img, err := s.opts.Images.Lookup(ctx, "installPath", req.InstallPath)
	if err != nil {
		return blobstore.Image{}, err
	}
	if img.Format != "qcow2" {
		return blobstore.Image{}, fmt.Errorf("image %s has format %s; templates are made from qcow2 backups", img.Ref, img.Format)
	}
	format := firstNonEmpty(req.Format, "qcow2")
	ref := blobstore.Ref{Name: req.Name, ID: firstNonEmpty(req.ID, images.NewID())}
	p.SetImage(req.Name, ref.InstallPath(), format)
	c, closeChain, err := s.opts.Layers.OpenChain(ctx, img.Ref)
	if err != nil {
		return blobstore.Image{}, err
	}
	defer closeChain()
	// Progress counts output bytes: about the chain's stored bytes for a
	// qcow2, the virtual size for raw.
	if format == "raw" {
		p.SetTotal(c.VirtualSize())
	} else {
		p.SetTotal(c.Stored)
	}
	return s.opts.Layers.Commit(ctx, layer.Spec{
		Record: layer.Record{Ref: ref, Format: format, Arch: firstNonEmpty(req.Arch, img.Arch), Author: img.Author, Desc: firstNonEmpty(req.Desc, img.Desc)},
		Ingest: "template-" + req.Task, Progress: p,
		Content: func(ctx context.Context, w io.Writer) (int64, error) {
			n, err := layer.Flatten(c, format, qcow2.WriteOptions{Compress: req.Compress})(ctx, w)
			if err != nil {
				return n, fmt.Errorf("flattening %s: %w", img.Ref, err)
			}
			return n, nil
		},
	})
}

package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/qcow2"
)

type templateReq struct {
	InstallPath string `json:"installPath"` // the backup (top of its chain)
	ImageUUID   string `json:"imageUuid"`   // the template's name
	Compress    bool   `json:"compress"`
	Format      string `json:"format"` // "qcow2" (default) or "raw"
}

func (q *templateReq) validate() error {
	if q.InstallPath == "" {
		return missing("installPath")
	}
	if q.ImageUUID == "" {
		return missing("imageUuid")
	}
	if err := (blobstore.Ref{Name: q.ImageUUID, ID: "x"}).Validate(); err != nil {
		return fmt.Errorf("imageUuid: %w", err)
	}
	switch q.Format {
	case "", "qcow2":
	case "raw":
		if q.Compress {
			return errors.New("compress needs format qcow2")
		}
	default:
		return fmt.Errorf("format %q not supported (qcow2 or raw)", q.Format)
	}
	return nil
}

// createTemplate flattens a backup's chain into a new standalone base
// layer recorded under the name imageUuid (a new id). The layer is
// canonical and deterministic: the same backup gives the same digest, so a
// second template of it shares the blob.
func (a *Agent) createTemplate(w http.ResponseWriter, r *http.Request) {
	var req templateReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "template", Backup: true, Err: err}, func(ctx context.Context, job *Job) (any, error) {
		img, err := a.lookupImage(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		if img.Format != "qcow2" {
			return nil, fmt.Errorf("image %s has format %s; templates are made from qcow2 backups", img.Ref, img.Format)
		}
		format := firstNonEmpty(req.Format, "qcow2")
		ref := blobstore.Ref{Name: req.ImageUUID, ID: randomHex(16)}
		job.SetImage(req.ImageUUID, ref.InstallPath(), format)
		l, err := a.flattenToBlob(ctx, job, img, format, qcow2.WriteOptions{Compress: req.Compress}, "template-"+job.ID())
		if err != nil {
			return nil, err
		}
		release := a.store.Hold(l.Digest)
		defer release()
		rec, err := a.recordImage(ctx, NewImage{
			Ref: ref, Blob: l.Digest, Size: l.Size, VirtualSize: l.VirtualSize, Format: format,
			Arch: img.Arch, Author: img.Author, Desc: img.Desc,
		})
		if err != nil {
			return nil, err
		}
		return importReplyFor(rec, a.capacity()), nil
	})
}

// flattenToBlob writes the guest view of top's chain as one standalone
// image into a blob ingest and commits it.
func (a *Agent) flattenToBlob(ctx context.Context, job *Job, top blobstore.Image, format string, opts qcow2.WriteOptions, ingestRef string) (layer, error) {
	chain, err := a.store.Chain(ctx, top.Ref)
	if err != nil {
		return layer{}, err
	}
	blobs := make([]digest.Digest, len(chain))
	for i, c := range chain {
		blobs[i] = c.Blob
	}
	release := a.store.Hold(blobs...)
	defer release()
	var layers []*qcow2.Image
	var stored int64
	for _, c := range chain {
		if c.Format != "qcow2" {
			return layer{}, fmt.Errorf("image %s in the chain has format %s, cannot flatten", c.Ref, c.Format)
		}
		b, err := a.store.OpenBlob(ctx, c.Blob)
		if err != nil {
			return layer{}, err
		}
		defer b.Close()
		im, err := qcow2.Open(b, b.Size())
		if err != nil {
			return layer{}, fmt.Errorf("layer %s: %w", c.Ref, err)
		}
		layers = append(layers, im)
		stored += b.Size()
	}
	qc, err := qcow2.NewChain(layers...)
	if err != nil {
		return layer{}, err
	}
	// Progress counts output bytes: about the chain's stored bytes for a
	// qcow2, the virtual size for raw.
	if format == "raw" {
		job.SetTotal(qc.VirtualSize())
	} else {
		job.SetTotal(stored)
	}
	bw, err := a.store.Writer(ctx, ingestRef)
	if err != nil {
		return layer{}, err
	}
	buf := bufio.NewWriterSize(io.MultiWriter(bw, jobs.Writer(job)), 1<<20)
	n, err := qcow2.Flatten(ctx, buf, qc, format, opts)
	if err == nil {
		err = buf.Flush()
	}
	var d digest.Digest
	if err == nil {
		d, err = bw.Commit(ctx, n, "")
	}
	if err != nil {
		_ = bw.Cancel()
		return layer{}, fmt.Errorf("flattening %s: %w", top.Ref, err)
	}
	return layer{Digest: d, Size: n, VirtualSize: qc.VirtualSize()}, nil
}

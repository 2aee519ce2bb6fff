package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
)

// This file holds the last agent-side adapter over imagestore/layer, for
// the host pulls that have not moved to layer.Store.Commit yet; it goes
// once they have.

// NewImage describes a committed blob to record as an image.
type NewImage struct {
	Ref         blobstore.Ref
	Blob        digest.Digest
	Parent      *blobstore.Image // nil for a base
	Size        int64
	VirtualSize int64
	Format      string
	Author      string
	Arch        string
	Desc        string
}

// recordImage turns a committed, held blob into an image record (for
// host pulls, until they commit through layer.Store.Commit).
func (a *Agent) recordImage(ctx context.Context, n NewImage) (blobstore.Image, error) {
	img := blobstore.Image{
		Ref: n.Ref, Blob: n.Blob, Created: time.Now().UTC(),
		Author: n.Author, Arch: n.Arch, Desc: n.Desc,
		Size: n.Size, VirtualSize: n.VirtualSize, Format: n.Format,
	}
	if n.Parent != nil {
		img.Parent = n.Parent.Ref.String()
	}
	if err := a.store.PutImage(ctx, img); err != nil {
		return img, fmt.Errorf("recording image %s: %w", n.Ref, err)
	}
	a.log.Info("image recorded", "image", n.Ref.String(), "blob", n.Blob, "parent", img.Parent, "format", n.Format, "size", n.Size)
	return img, nil
}

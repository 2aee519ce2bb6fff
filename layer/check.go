package layer

import (
	"context"
	"fmt"

	"imagestore/blobstore"
	"imagestore/qcow2"
)

// Check checks every qcow2 layer of chain (base first, as in a replication
// config; the records need not be stored yet) with our hardened reader: the
// blob must parse, name its parent's blob by blobstore.BackingName with
// backing format qcow2 (a base names no backing file) and have its parent's
// virtual size, and the record's virtual size (when set). qemu follows a
// backing name blindly (/etc/passwd, json:{...}), so whatever qemu opens in
// place must pass this first. Layers of other formats are not checked, but
// a qcow2 layer on top of one fails. Errors wrap ErrInvalid and name the
// layer.
func Check(ctx context.Context, blobs *blobstore.Store, chain []blobstore.Image) error {
	var parentSize int64
	for i, img := range chain {
		if err := ctx.Err(); err != nil {
			return err
		}
		if img.Format != "qcow2" {
			parentSize = -1 // a non-qcow2 parent cannot back a qcow2 layer
			continue
		}
		var parent *blobstore.Image
		if i > 0 {
			parent = &chain[i-1]
		}
		size, err := checkLayer(ctx, blobs, img, parent, parentSize)
		if err != nil {
			return fmt.Errorf("%w: layer %s (%s): %w", ErrInvalid, img.Blob, img.Ref, err)
		}
		parentSize = size
	}
	return nil
}

// checkLayer checks one qcow2 layer against its parent (nil for a base)
// whose parsed virtual size is parentSize (<0: the parent is no qcow2),
// and returns the layer's virtual size.
func checkLayer(ctx context.Context, blobs *blobstore.Store, img blobstore.Image, parent *blobstore.Image, parentSize int64) (int64, error) {
	b, err := blobs.OpenBlob(ctx, img.Blob)
	if err != nil {
		return 0, err
	}
	defer b.Close()
	im, err := qcow2.Open(b, b.Size())
	if err != nil {
		return 0, err
	}
	wantFile, wantFmt := "", ""
	if parent != nil {
		if parent.Format != "qcow2" || parentSize < 0 {
			return 0, fmt.Errorf("parent %s has format %q", parent.Ref, parent.Format)
		}
		wantFile, wantFmt = blobstore.BackingName(parent.Blob), "qcow2"
		if im.VirtualSize() != parentSize {
			return 0, fmt.Errorf("virtual size %d, parent's is %d", im.VirtualSize(), parentSize)
		}
	}
	if im.BackingFile() != wantFile || im.BackingFormat() != wantFmt {
		return 0, fmt.Errorf("backing file %q (format %q), want %q (format %q)",
			im.BackingFile(), im.BackingFormat(), wantFile, wantFmt)
	}
	if img.VirtualSize != 0 && img.VirtualSize != im.VirtualSize() {
		return 0, fmt.Errorf("virtual size %d, record says %d", im.VirtualSize(), img.VirtualSize)
	}
	return im.VirtualSize(), nil
}

// virtualSize parses a stored qcow2 blob's header for its virtual size.
func virtualSize(ctx context.Context, blobs *blobstore.Store, img blobstore.Image) (int64, error) {
	b, err := blobs.OpenBlob(ctx, img.Blob)
	if err != nil {
		return 0, err
	}
	defer b.Close()
	im, err := qcow2.Open(b, b.Size())
	if err != nil {
		return 0, fmt.Errorf("layer %s: %w", img.Ref, err)
	}
	return im.VirtualSize(), nil
}

package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/qcow2"
)

// layer is a committed canonical qcow2 layer.
type layer struct {
	Digest      digest.Digest
	Size        int64
	VirtualSize int64
}

// normalizeLayer parses an untrusted qcow2 (never following its backing
// name) and re-encodes it as a canonical layer whose backing file is the
// parent's blob, committing it under ingest ref.
func normalizeLayer(ctx context.Context, store *blobstore.Store, r io.ReaderAt, size int64, parent *blobstore.Image, ref string) (layer, error) {
	im, err := qcow2.Open(r, size)
	if err != nil {
		return layer{}, fmt.Errorf("imgurl is not a usable qcow2: %w", err)
	}
	var opts qcow2.WriteOptions
	if parent != nil {
		if parent.Format != "qcow2" {
			return layer{}, fmt.Errorf("parent %s has format %s; a qcow2 delta needs a qcow2 parent", parent.Ref, parent.Format)
		}
		opts.BackingFile = blobstore.BackingName(parent.Blob)
	} else if im.BackingFile() != "" {
		return layer{}, fmt.Errorf("the qcow2 is a delta (backing file %q) but no parent was given", im.BackingFile())
	}
	w, err := store.Writer(ctx, ref)
	if err != nil {
		return layer{}, err
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	n, err := qcow2.Normalize(ctx, bw, im, opts)
	if err == nil {
		err = bw.Flush()
	}
	var d digest.Digest
	if err == nil {
		d, err = w.Commit(ctx, n, "")
	}
	if err != nil {
		_ = w.Cancel()
		return layer{}, fmt.Errorf("normalizing qcow2: %w", err)
	}
	return layer{Digest: d, Size: n, VirtualSize: im.VirtualSize()}, nil
}

// flattenChain writes the guest view of the chain ending at top (a qcow2
// image) as one standalone image of format "qcow2" or "raw" to w.
func flattenChain(ctx context.Context, store *blobstore.Store, top blobstore.Image, format string, w io.Writer) (int64, error) {
	chain, err := store.Chain(ctx, top.Ref)
	if err != nil {
		return 0, err
	}
	var layers []*qcow2.Image
	for _, img := range chain {
		if img.Format != "qcow2" {
			return 0, fmt.Errorf("image %s in the chain has format %s, cannot flatten", img.Ref, img.Format)
		}
		b, err := store.OpenBlob(ctx, img.Blob)
		if err != nil {
			return 0, err
		}
		defer b.Close()
		im, err := qcow2.Open(b, b.Size())
		if err != nil {
			return 0, fmt.Errorf("layer %s: %w", img.Ref, err)
		}
		layers = append(layers, im)
	}
	if len(layers) == 0 {
		return 0, errors.New("empty chain")
	}
	c, err := qcow2.NewChain(layers...)
	if err != nil {
		return 0, err
	}
	return qcow2.Flatten(ctx, w, c, format, qcow2.WriteOptions{})
}

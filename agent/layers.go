package agent

import (
	"bufio"
	"context"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	storelayer "imagestore/layer"
	"imagestore/qcow2"
)

// This file holds the last agent-side adapters over imagestore/layer, for
// the import and export code that has not moved to layer.Store.Commit and
// layer.Store.OpenChain yet; it goes once they have.

// layer is a committed canonical qcow2 layer.
type layer = storelayer.Layer

// normalizeLayer parses an untrusted qcow2 (never following its backing
// name) and re-encodes it (layer.Normalize) as a canonical layer whose
// backing file is the parent's blob, committing it under ingest ref.
func normalizeLayer(ctx context.Context, store *blobstore.Store, r io.ReaderAt, size int64, parent *blobstore.Image, ref string) (layer, error) {
	im, err := qcow2.Open(r, size)
	if err != nil {
		return layer{}, fmt.Errorf("imgurl is not a usable qcow2: %w", err)
	}
	if err := storelayer.CheckParent(im, parent); err != nil {
		return layer{}, err
	}
	w, err := store.Writer(ctx, ref)
	if err != nil {
		return layer{}, err
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	vsize, err := storelayer.Normalize(im, parent, qcow2.WriteOptions{})(ctx, bw)
	if err == nil {
		err = bw.Flush()
	}
	var d digest.Digest
	if err == nil {
		d, err = w.Commit(ctx, w.Offset(), "")
	}
	if err != nil {
		_ = w.Cancel()
		return layer{}, fmt.Errorf("normalizing qcow2: %w", err)
	}
	return layer{Digest: d, Size: w.Offset(), VirtualSize: vsize}, nil
}

// flattenChain writes the guest view of the chain ending at top (a qcow2
// image) as one standalone image of format "qcow2" or "raw" to w, through
// layer.Store.OpenChain (held, checked, verified).
func flattenChain(ctx context.Context, store *blobstore.Store, top blobstore.Image, format string, w io.Writer) (int64, error) {
	ls, err := storelayer.New(storelayer.Options{Blobs: store})
	if err != nil {
		return 0, err
	}
	c, closeChain, err := ls.OpenChain(ctx, top.Ref)
	if err != nil {
		return 0, err
	}
	defer closeChain()
	return qcow2.Flatten(ctx, w, c.Chain, format, qcow2.WriteOptions{})
}

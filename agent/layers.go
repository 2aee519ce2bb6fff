package agent

import (
	"context"
	"errors"
	"io"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
)

// layer is a committed canonical qcow2 layer.
type layer struct {
	Digest      digest.Digest
	Size        int64
	VirtualSize int64
}

// errNoQcow2 is returned until the qcow2 writer lands.
var errNoQcow2 = errors.New("qcow2 normalization is not available in this build")

func normalizeLayer(ctx context.Context, store *blobstore.Store, r io.ReaderAt, size int64, parent *blobstore.Image, ref string) (layer, error) {
	return layer{}, errNoQcow2
}

func flattenChain(ctx context.Context, store *blobstore.Store, top blobstore.Image, format string, w io.Writer) (int64, error) {
	return 0, errNoQcow2
}

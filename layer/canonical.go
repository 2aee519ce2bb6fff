package layer

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/qcow2"
)

// ErrNotCanonical: a qcow2 layer that arrived as bytes (a registry push, a
// peer, Commit's Reader) is not byte for byte what our writer makes of its
// content, so qemu could parse metadata our reader does not read.
var ErrNotCanonical = errors.New("qcow2 layer is not in canonical form")

// ErrFormat: a record's format does not match its bytes (a qcow2 recorded
// as raw would be handed to qemu as raw, or probed).
var ErrFormat = errors.New("image format does not match its bytes")

// CheckCanonical verifies that the stored qcow2 blob d is exactly what our
// writer produces for its content (qcow2.CheckNormalized), with the options
// its header implies (cluster size, backing name, zstd or not). Our writer
// is deterministic, so a layer we wrote passes, and any other byte (a
// patched snapshot table, an extra header extension, another layout) fails
// with ErrNotCanonical. Without zstd it reads the layer's metadata and the
// first bytes of each data cluster (the data cannot differ once the
// metadata is equal); with zstd it re-encodes the layer and compares.
// zeros, if not nil, is a record of which of the blob's blocks are zeros
// made as its bytes were written (ZeroBlocks): the data clusters it knows
// are not read at all.
func CheckCanonical(ctx context.Context, blobs *blobstore.Store, d digest.Digest, zeros qcow2.ZeroMap) error {
	b, err := blobs.OpenBlob(ctx, d)
	if err != nil {
		return err
	}
	defer b.Close()
	im, err := qcow2.Open(b, b.Size())
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotCanonical, err)
	}
	info := im.Info()
	cb := 0
	for cs := im.ClusterSize(); cs > 1; cs >>= 1 {
		cb++
	}
	compress := info.FormatSpecific.Data.CompressionType == "zstd"
	opts := qcow2.WriteOptions{ClusterBits: cb, BackingFile: im.BackingFile(), Compress: compress}
	if err := qcow2.CheckNormalized(ctx, im, b, b.Size(), opts, zeros); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: blob %s: %w", ErrNotCanonical, d, err)
	}
	return nil
}

// CheckFormat checks a record's format against its blob's first bytes: a
// record that is not "qcow2" must not hold a qcow2 (true raw, ISO and
// opaque blobs pass). A "qcow2" record is checked by Check and
// CheckCanonical instead.
func CheckFormat(ctx context.Context, blobs *blobstore.Store, d digest.Digest, format string) error {
	if format == "qcow2" {
		return nil
	}
	b, err := blobs.OpenBlob(ctx, d)
	if err != nil {
		return err
	}
	defer b.Close()
	var head [4]byte
	if _, err := b.ReadAt(head[:], 0); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if string(head[:]) == qcow2Magic {
		return fmt.Errorf("%w: blob %s is a qcow2 but is recorded as %q", ErrFormat, d, format)
	}
	return nil
}

const qcow2Magic = "QFI\xfb"

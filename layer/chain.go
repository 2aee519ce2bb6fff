package layer

import (
	"context"
	"fmt"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/qcow2"
)

// HoldChain holds the blobs of top's chain against GC and checks that the
// chain is one qemu may open in place: every image qcow2 (else
// ErrNotQcow2) and every layer passing Check (else ErrInvalid). Records
// made by Commit and replicate passed the check already, but a store
// written by an older version or by hand may hold anything, so it is
// checked again, held. images are top first (blobstore.Chain); release
// drops the hold and is safe to call twice.
func (s *Store) HoldChain(ctx context.Context, top blobstore.Ref) (images []blobstore.Image, release func(), err error) {
	images, err = s.blobs.Chain(ctx, top)
	if err != nil {
		return nil, nil, err
	}
	ds := make([]digest.Digest, len(images))
	base := make([]blobstore.Image, len(images))
	for i, im := range images {
		ds[i] = im.Blob
		base[len(images)-1-i] = im
	}
	release = s.blobs.Hold(ds...)
	for _, im := range images {
		if im.Format != "qcow2" {
			release()
			return nil, nil, fmt.Errorf("%w: image %s is %s", ErrNotQcow2, im.Ref, im.Format)
		}
	}
	if err := Check(ctx, s.blobs, base); err != nil {
		release()
		return nil, nil, err
	}
	return images, release, nil
}

// Chain is an open stored chain: the guest view (qcow2.Chain) and what it
// was opened from.
type Chain struct {
	*qcow2.Chain
	Images []blobstore.Image // top first
	Stored int64             // bytes of the layers' blobs
}

// OpenChain opens top's chain for reading through our own qcow2 reader, the
// one way a stored chain is read (flatten into the store, export, write to
// a host). The policy: the chain is held (HoldChain: qcow2 only, Check), and
// every layer's digest is verified before a byte of it is used, so a
// corrupt blob is quarantined (blobstore.ErrCorrupt) and nothing built on
// it is written. close closes the blobs and drops the hold; call it once
// the chain is no longer read.
func (s *Store) OpenChain(ctx context.Context, top blobstore.Ref) (c *Chain, close func(), err error) {
	return s.openChain(ctx, top, true)
}

// OpenChainUnverified is OpenChain without reading every layer whole to
// verify its digest first: for serving a chain to a running guest
// (instant restore), where that read before the first byte would cost
// what the feature exists to avoid (a store on S3 would download the
// whole chain). The chain is still held and checked (HoldChain), and its
// bytes still reach their reader only through our hardened qcow2 reader;
// a corrupt blob is what the periodic verify finds, as for a chain
// qemu-nbd reads in place.
func (s *Store) OpenChainUnverified(ctx context.Context, top blobstore.Ref) (c *Chain, close func(), err error) {
	return s.openChain(ctx, top, false)
}

func (s *Store) openChain(ctx context.Context, top blobstore.Ref, verify bool) (c *Chain, close func(), err error) {
	images, release, err := s.HoldChain(ctx, top)
	if err != nil {
		return nil, nil, err
	}
	var blobs []blobstore.Blob
	close = func() {
		for _, b := range blobs {
			_ = b.Close()
		}
		blobs = nil
		release()
	}
	c = &Chain{Images: images}
	layers := make([]*qcow2.Image, 0, len(images))
	for _, im := range images {
		if verify {
			if err := s.blobs.VerifyBlob(ctx, im.Blob); err != nil {
				close()
				return nil, nil, fmt.Errorf("layer %s (%s) failed verification: %w", im.Ref, im.Blob, err)
			}
		}
		b, err := s.blobs.OpenBlob(ctx, im.Blob)
		if err != nil {
			close()
			return nil, nil, err
		}
		blobs = append(blobs, b)
		l, err := qcow2.Open(b, b.Size())
		if err != nil {
			close()
			return nil, nil, fmt.Errorf("layer %s: %w", im.Ref, err)
		}
		layers = append(layers, l)
		c.Stored += b.Size()
	}
	if c.Chain, err = qcow2.NewChain(layers...); err != nil {
		close()
		return nil, nil, err
	}
	return c, close, nil
}

package exports

import (
	"context"
	"io"

	"imagestore/blobstore"
	"imagestore/qcow2"
)

// flatten writes the guest view of the chain ending at top (a qcow2 image)
// as one standalone image of format "qcow2" or "raw" to w. The chain is
// opened the one way a stored chain is read (layer.Store.OpenChain: held,
// checked, verified).
func (s *Service) flatten(ctx context.Context, top blobstore.Image, format string, w io.Writer) (int64, error) {
	c, closeChain, err := s.layers.OpenChain(ctx, top.Ref)
	if err != nil {
		return 0, err
	}
	defer closeChain()
	return qcow2.Flatten(ctx, w, c.Chain, format, qcow2.WriteOptions{})
}

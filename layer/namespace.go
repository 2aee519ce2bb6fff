package layer

import (
	"errors"
	"fmt"

	"imagestore/blobstore"
)

// ErrNamespace: an image's parent is in another namespace where the rule
// (CheckNamespace) does not allow it.
var ErrNamespace = errors.New("parent is in another namespace")

// DatabaseNamespace holds database backups: no chain crosses into or out
// of it.
const DatabaseNamespace = "zsbak"

// CheckNamespace is the namespace rule of image chains: an image's parent
// is in the image's own namespace, with one documented exception, top mode
// (PROTOCOL.md §2.3, note C5): a KVM host pushes the volume's backing image
// first and passes that image's install path as parent, so a parent may be
// a base image (one without a parent) in another namespace, except that
// no chain crosses into or out of the database backups (zsbak).
func CheckNamespace(child blobstore.Ref, parent *blobstore.Image) error {
	switch {
	case parent == nil, parent.Name == child.Name:
		return nil
	case child.Name == DatabaseNamespace || parent.Name == DatabaseNamespace:
		return fmt.Errorf("%w: %s on %s: no chain crosses into or out of the database backups (%s)", ErrNamespace, child, parent.Ref, DatabaseNamespace)
	case parent.Parent == "":
		return nil // top mode: a base image of another namespace
	}
	return fmt.Errorf("%w: %s on %s: a parent in another namespace must be a base image (top mode)", ErrNamespace, child, parent.Ref)
}

package replicate_test

import (
	"errors"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/transfer/oci"
	"imagestore/transfer/replicate"
)

// TestValidateNamespaces: a manifest pushed to one repository may create
// records in another only for a top-mode base image (the documented
// exception, PROTOCOL.md note C5), never a chain crossing namespaces
// otherwise or into zsbak.
func TestValidateNamespaces(t *testing.T) {
	rec := func(name, id, parent string) blobstore.Image {
		d := digest.FromString(name + id)
		return blobstore.Image{Ref: blobstore.Ref{Name: name, ID: id}, Blob: d, Size: 1, Parent: parent, Format: "raw"}
	}
	for _, tc := range []struct {
		name  string
		chain []blobstore.Image
		ok    bool
	}{
		{"one namespace", []blobstore.Image{rec("vol", "b", ""), rec("vol", "t", "vol:b")}, true},
		{"top mode: an image's base", []blobstore.Image{rec("img", "b", ""), rec("vol", "t", "img:b")}, true},
		{"parent a delta of another namespace", []blobstore.Image{rec("other", "b", ""), rec("other", "d", "other:b"), rec("vol", "t", "other:d")}, false},
		{"into zsbak", []blobstore.Image{rec("vol", "b", ""), rec("zsbak", "t", "vol:b")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := oci.Manifest{SchemaVersion: 2}
			for _, img := range tc.chain {
				m.Layers = append(m.Layers, oci.Descriptor{Digest: img.Blob, Size: img.Size})
			}
			top := tc.chain[len(tc.chain)-1].Ref
			_, err := replicate.Validate(m, replicate.Config{Imagestore: replicate.ConfigVersion, Chain: tc.chain}, top.Name, top.ID)
			if tc.ok != (err == nil) || (err != nil && !errors.Is(err, layer.ErrNamespace)) {
				t.Fatalf("Validate = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

package replicate

import (
	"testing"

	"imagestore/transfer/oci"
)

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(`{"imagestore":1,"chain":[{"name":"v","id":"a","blobsum":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","created":"2026-01-01T00:00:00Z","size":0,"virtualsize":0,"format":"raw"}]}`))
	f.Add([]byte(`{"imagestore":2}`))
	f.Add([]byte(`{"imagestore":1,"chain":[]}`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			return
		}
		if len(c.Chain) == 0 {
			t.Fatal("accepted an empty chain")
		}
		// Validate must never accept records that are not a proper chain.
		m := oci.Manifest{SchemaVersion: 2}
		for _, img := range c.Chain {
			m.Layers = append(m.Layers, oci.Descriptor{Digest: img.Blob, Size: img.Size})
		}
		top := c.Chain[len(c.Chain)-1]
		if _, err := Validate(m, c, top.Name, top.ID); err == nil {
			for i, img := range c.Chain {
				if img.Ref.Validate() != nil || (i == 0) != (img.Parent == "") {
					t.Fatalf("invalid chain accepted: %+v", c.Chain)
				}
			}
		}
	})
}

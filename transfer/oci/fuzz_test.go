package oci

import (
	"encoding/json"
	"testing"
)

func FuzzParseManifest(f *testing.F) {
	f.Add([]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:` +
		`e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}`))
	f.Add([]byte(`{"schemaVersion":1}`))
	f.Add([]byte(`{"schemaVersion":2,"config":{"digest":"sha256:zz","size":-1}}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b)
		if err != nil {
			return
		}
		if m.SchemaVersion != 2 || m.Config.Digest.Validate() != nil || m.Config.Size < 0 {
			t.Fatalf("accepted invalid manifest %+v", m)
		}
		for _, l := range m.Layers {
			if l.Digest.Validate() != nil || l.Size < 0 {
				t.Fatalf("accepted invalid layer %+v", l)
			}
		}
		if _, err := json.Marshal(m); err != nil {
			t.Fatal(err)
		}
	})
}

func FuzzParseRangeEnd(f *testing.F) {
	for _, s := range []string{"", "0-0", "0-1023", "bytes=0-5", "5-9", "0--1", "0-x", "0-99999999999999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseRangeEnd(s)
		if err == nil && n < 0 {
			t.Fatalf("%q gave negative offset %d", s, n)
		}
	})
}

func FuzzParseError(f *testing.F) {
	f.Add([]byte(`{"errors":[{"code":"BLOB_UNKNOWN","message":"m","detail":{"a":1}}]}`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, b []byte) {
		e := ParseError("GET", "http://x/", 404, b)
		_ = e.Error()
		if !e.Is(ErrNotFound) {
			t.Fatal("a 404 must match ErrNotFound")
		}
	})
}

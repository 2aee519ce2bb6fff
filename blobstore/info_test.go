package blobstore

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func TestImageInfoFields(t *testing.T) {
	d := digest.FromString("layer")
	img := Image{
		Ref: Ref{Name: "zsbak", ID: "0ed5"}, Blob: d, Parent: "zsbak:base",
		Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Author: "a", Arch: "x86_64",
		Desc: `{"md5":"x"}`, Size: 7, VirtualSize: 9, Format: "gzip",
	}
	b, err := json.Marshal(img.Info())
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"id": "0ed5", "name": "zsbak", "parent": "zsbak:base", "blobsum": d.String(),
		"created": "2026-01-02T03:04:05Z", "author": "a", "arch": "x86_64", "desc": `{"md5":"x"}`,
		"size": 7.0, "virtualsize": 9.0, "format": "gzip", "installPath": "zstore://zsbak/0ed5",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("fields %v, want exactly %d", got, len(want))
	}
}

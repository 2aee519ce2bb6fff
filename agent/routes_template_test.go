package agent

import (
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

func TestTemplateFromBackup(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io")
	e := newRestoreEnv(t, nil)
	files := r7makeChain(t, e.dir, 8<<20)
	top := e.importChain(t, "vol", files...)[2]

	sums := map[bool]string{}
	for _, compress := range []bool{false, true} {
		var first map[string]any
		for i, name := range []string{"tmpl-a", "tmpl-b"} {
			rep := e.ok(t, "/imagestore/template/create-sync", map[string]any{"installPath": top.InstallPath(), "imageUuid": name, "compress": compress, "format": "qcow2"})
			if rep["name"] != name || rep["format"] != "qcow2" || r7num(rep["virtualsize"]) != 8<<20 || r7num(rep["size"]) <= 0 || rep["id"] == "" {
				t.Fatalf("template reply %v", rep)
			}
			if !strings.HasPrefix(rep["installPath"].(string), "zstore://"+name+"/") {
				t.Fatalf("installPath %v", rep["installPath"])
			}
			if i == 0 {
				first = rep
				continue
			}
			if rep["blobsum"] != first["blobsum"] {
				t.Fatalf("same backup, different template digests: %v vs %v", rep["blobsum"], first["blobsum"])
			}
			if rep["id"] == first["id"] {
				t.Fatal("two templates share an id")
			}
		}
		sums[compress] = first["blobsum"].(string)
		p, err := e.store.BlobPath(digest.Digest(first["blobsum"].(string)))
		if err != nil {
			t.Fatal(err)
		}
		r7run(t, "qemu-img", "check", "-f", "qcow2", p)
		info := r7run(t, "qemu-img", "info", "-f", "qcow2", p)
		if strings.Contains(info, "backing file") {
			t.Fatalf("template is not standalone:\n%s", info)
		}
		if compress && !strings.Contains(info, "zstd") {
			t.Fatalf("compressed template without zstd:\n%s", info)
		}
		r7run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", p, files[2])
	}
	if sums[true] == sums[false] {
		t.Fatal("compressed and plain templates have the same digest")
	}

	// A raw template.
	rep := e.ok(t, "/imagestore/template/create-sync", map[string]any{"installPath": top.InstallPath(), "imageUuid": "tmpl-raw", "format": "raw"})
	p, _ := e.store.BlobPath(digest.Digest(rep["blobsum"].(string)))
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", p, files[2])
	if rep["format"] != "raw" || r7num(rep["size"]) != 8<<20 {
		t.Fatalf("raw template %v", rep)
	}
}

func TestTemplateErrors(t *testing.T) {
	t.Parallel()
	e := newRestoreEnv(t, nil)
	for _, c := range []struct {
		name string
		body map[string]any
		want string
	}{
		{"no installPath", map[string]any{"imageUuid": "t"}, "missing field installPath"},
		{"no name", map[string]any{"installPath": "zstore://a/b"}, "missing field imageUuid"},
		{"bad name", map[string]any{"installPath": "zstore://a/b", "imageUuid": "../x"}, "imageUuid"},
		{"bad format", map[string]any{"installPath": "zstore://a/b", "imageUuid": "t", "format": "vmdk"}, "not supported"},
		{"raw compressed", map[string]any{"installPath": "zstore://a/b", "imageUuid": "t", "format": "raw", "compress": true}, "compress needs format qcow2"},
		{"unknown backup", map[string]any{"installPath": "zstore://a/b", "imageUuid": "t"}, "no such image"},
	} {
		t.Run(c.name, func(t *testing.T) { e.fails(t, "/imagestore/template/create-sync", c.body, c.want) })
	}
}

package exports

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
)

// readPackage reads a package's tar (gzipped or not) into name → bytes, in order.
func readPackage(t *testing.T, b []byte, gz bool) ([]string, map[string][]byte) {
	t.Helper()
	var r io.Reader = bytes.NewReader(b)
	if gz {
		zr, err := gzip.NewReader(r)
		if err != nil {
			t.Fatal(err)
		}
		r = zr
	}
	tr := tar.NewReader(r)
	var names []string
	files := map[string][]byte{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		files[h.Name] = data
	}
	return names, files
}

func TestPack(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := e.service(t, nil)
	ctx := context.Background()
	const size = 1 << 20
	guest := make([]byte, size)
	for i := range 300 << 10 {
		guest[i] = byte(i % 241)
	}
	base := e.put(t, blobstore.Ref{Name: "vol", ID: "base"}, "", qcowLayer(t, guest, "", [2]int64{0, 256 << 10}), "qcow2")
	top := e.put(t, blobstore.Ref{Name: "vol", ID: "top"}, base.Ref.String(),
		qcowLayer(t, guest, blobstore.BackingName(base.Blob), [2]int64{256 << 10, 64 << 10}), "qcow2")
	iso := e.put(t, blobstore.Ref{Name: "cdrom", ID: "1"}, "", bytes.Repeat([]byte("iso!"), 5000), "iso")

	for _, tc := range []struct {
		format, ext string
		gz          bool
	}{{"", "tar", false}, {"tar", "tar", false}, {"tar.gz", "tar.gz", true}, {"tgz", "tar.gz", true}} {
		var p recorder
		pkg, err := s.Pack(ctx, &p, []blobstore.Image{top, iso}, PackOptions{
			ImageFormat: "raw", Config: `{"images":["vol","cdrom"]}`, ConfigFormat: "json", Name: "my pkg/../x", Format: tc.format,
		})
		if err != nil {
			t.Fatalf("%s: %v", tc.format, err)
		}
		if pkg.File != "my_pkg_.._x."+tc.ext || !strings.HasPrefix(pkg.Path(), PackagePrefix+pkg.Token+"/") {
			t.Fatalf("%s: file %q path %q", tc.format, pkg.File, pkg.Path())
		}
		m, f, err := s.Resolve(pkg.Path())
		if err != nil {
			t.Fatalf("%s: resolve %s: %v", tc.format, pkg.Path(), err)
		}
		b, _ := io.ReadAll(f)
		f.Close()
		if m.MD5Sum != md5hex(b) || pkg.MD5Sum != m.MD5Sum || pkg.Size != int64(len(b)) {
			t.Fatalf("%s: md5 %s size %d, served %s %d", tc.format, pkg.MD5Sum, pkg.Size, md5hex(b), len(b))
		}
		names, files := readPackage(t, b, tc.gz)
		want := []string{"vol.raw", "cdrom.iso", "my_pkg_.._x.json"}
		if strings.Join(names, ",") != strings.Join(want, ",") {
			t.Fatalf("%s: entries %v, want %v", tc.format, names, want)
		}
		if !bytes.Equal(files["vol.raw"], guest) {
			t.Fatalf("%s: vol.raw is not the flattened guest view", tc.format)
		}
		if !bytes.Equal(files["cdrom.iso"], bytes.Repeat([]byte("iso!"), 5000)) || string(files["my_pkg_.._x.json"]) != `{"images":["vol","cdrom"]}` {
			t.Fatalf("%s: cdrom.iso or the config differ", tc.format)
		}
		// Each image is its export's bytes: the export the same call to
		// Create returns (the one already made is reused).
		exp, err := s.Create(ctx, jobs.Nop{}, top, "raw")
		if err != nil || !bytes.Equal(readExport(t, s, exp), files["vol.raw"]) {
			t.Fatalf("%s: packed image differs from its export: %v", tc.format, err)
		}
		if p.total.Load() == 0 || p.done.Load() < p.total.Load() {
			t.Fatalf("%s: progress %d of %d", tc.format, p.done.Load(), p.total.Load())
		}
		// Deleting image exports leaves packages alone, and the other way round.
		if n, err := s.Delete(ctx, Selector{Token: pkg.Token}); err != nil || n != 0 {
			t.Fatalf("%s: delexp by a package token deleted %d: %v", tc.format, n, err)
		}
		for _, u := range []string{"http://bs.example:8001" + pkg.Path(), pkg.Path()} {
			n, err := s.DeletePackage(ctx, u)
			if err != nil || (u == pkg.Path()) != (n == 0) {
				t.Fatalf("%s: DeletePackage(%s) = %d, %v", tc.format, u, n, err)
			}
		}
		if _, _, err := s.Resolve(pkg.Path()); !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s: deleted package still resolves: %v", tc.format, err)
		}
		if _, _, err := s.Open(exp.Token, exp.File); err != nil {
			t.Fatalf("%s: deleting the package removed an image export: %v", tc.format, err)
		}
	}
	// Two images of one name get <name>-<id>.
	pkg, err := s.Pack(ctx, jobs.Nop{}, []blobstore.Image{top, base}, PackOptions{Name: "two"})
	if err != nil {
		t.Fatal(err)
	}
	_, f, err := s.Resolve(pkg.Path())
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(f)
	f.Close()
	names, _ := readPackage(t, b, false)
	if strings.Join(names, ",") != "vol.qcow2,vol-base.qcow2" {
		t.Fatalf("entries %v", names)
	}
	// Only the package file and export.json in the package's dir.
	ents, _ := os.ReadDir(filepath.Join(e.root, pkg.Token))
	if len(ents) != 2 {
		t.Fatalf("package dir holds %v", ents)
	}
}

func TestPackRefuses(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := e.service(t, nil)
	ctx := context.Background()
	img := e.put(t, blobstore.Ref{Name: "a", ID: "1"}, "", []byte("data"), "iso")
	for _, tc := range []struct {
		imgs []blobstore.Image
		o    PackOptions
		want string
	}{
		{[]blobstore.Image{img}, PackOptions{Name: "p", Format: "zip"}, `packageFormat "zip" not supported`},
		{nil, PackOptions{Name: "p"}, "no images"},
		{[]blobstore.Image{img, img}, PackOptions{Name: "p"}, "listed twice"},
		{[]blobstore.Image{img}, PackOptions{Name: "a", Config: "x", ConfigFormat: "iso"}, "config file's name"},
	} {
		if _, err := s.Pack(ctx, jobs.Nop{}, tc.imgs, tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.o, err, tc.want)
		}
	}
	// No package left behind: only the image's export.
	ents, _ := os.ReadDir(e.root)
	for _, d := range ents {
		if m, err := s.readMeta(d.Name()); err != nil || m.Package {
			t.Errorf("left behind %s: %+v %v", d.Name(), m, err)
		}
	}
	for _, u := range []string{"/export/pkg.tar", "/export/image-" + strings.Repeat("a", 32) + ".raw", PackagePrefix + "xyz/p.tar", "::"} {
		if _, err := s.DeletePackage(ctx, u); err == nil || !strings.Contains(err.Error(), "not a package URL") {
			t.Errorf("DeletePackage(%q): %v", u, err)
		}
	}
	// An absent package is deleted without error.
	if n, err := s.DeletePackage(ctx, PackagePrefix+strings.Repeat("b", 32)+"/p.tar"); err != nil || n != 0 {
		t.Errorf("absent package: %d, %v", n, err)
	}
}

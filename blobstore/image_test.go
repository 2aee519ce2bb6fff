package blobstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func ref(s string) Ref {
	r, err := ParseRef(s)
	if err != nil {
		panic(err)
	}
	return r
}

func TestPutImageValidation(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	blob := mustPut(t, s, content(20, 1000))
	base := Image{Ref: ref("vol:base"), Blob: blob, Format: "qcow2"}
	if err := s.PutImage(ctx, base); err != nil {
		t.Fatal(err)
	}
	missing := digestOf([]byte("never stored"))
	cases := []struct {
		name    string
		img     Image
		wantErr error
		detail  string
	}{
		{"ok child", Image{Ref: ref("vol:c1"), Blob: blob, Parent: "vol:base"}, nil, ""},
		{"idempotent retry", base, nil, ""},
		{"same ref other content", Image{Ref: ref("vol:base"), Blob: blob, Desc: "changed"}, ErrExists, "different content"},
		{"missing blob", Image{Ref: ref("vol:x"), Blob: missing}, ErrNotFound, "blob"},
		{"missing parent", Image{Ref: ref("vol:x"), Blob: blob, Parent: "vol:nope"}, ErrParentNotFound, "vol:nope"},
		{"own parent", Image{Ref: ref("vol:x"), Blob: blob, Parent: "vol:x"}, ErrLoop, "own parent"},
		{"size mismatch", Image{Ref: ref("vol:x"), Blob: blob, Size: 999}, ErrSizeMismatch, "999"},
		{"bad name", Image{Ref: Ref{Name: "../etc", ID: "x"}, Blob: blob}, ErrInvalidName, "dot"},
		{"bad id", Image{Ref: Ref{Name: "vol", ID: "a/b"}, Blob: blob}, ErrInvalidName, "'/'"},
		{"bad parent", Image{Ref: ref("vol:x"), Blob: blob, Parent: "vol/base"}, ErrInvalidName, "name:id"},
		{"bad digest", Image{Ref: ref("vol:x"), Blob: "sha256:zz"}, ErrInvalidName, "digest"},
		{"negative size", Image{Ref: ref("vol:x"), Blob: blob, VirtualSize: -1}, ErrInvalidName, "negative"},
		{"bad format", Image{Ref: ref("vol:x"), Blob: blob, Format: "q/cow"}, ErrInvalidName, "format"},
		{"huge desc", Image{Ref: ref("vol:x"), Blob: blob, Desc: strings.Repeat("d", 5000)}, ErrInvalidName, "desc"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := s.PutImage(ctx, tc.img)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), tc.detail) {
				t.Fatalf("error %q does not mention %q", err, tc.detail)
			}
			if err != nil && tc.img.Ref != base.Ref {
				if _, gerr := s.GetImage(ctx, tc.img.Ref); !errors.Is(gerr, ErrNotFound) && !errors.Is(gerr, ErrInvalidName) {
					t.Fatalf("rejected image was recorded: %v", gerr)
				}
			}
		})
	}
	got, err := s.GetImage(ctx, ref("vol:c1"))
	if err != nil || got.Size != 1000 || got.Created.IsZero() {
		t.Fatalf("GetImage: %+v, %v (size and created should be filled in)", got, err)
	}
}

// writeRecord bypasses PutImage, as a crash or an operator might.
func writeRecord(t *testing.T, s *Store, img Image) {
	t.Helper()
	b, _ := json.Marshal(img)
	os.MkdirAll(filepath.Join(s.Root(), dirImages, img.Name), 0o755)
	if err := os.WriteFile(imageFile(s, img.Ref), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestChainLimits(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	blob := mustPut(t, s, content(21, 10))
	// A MaxChainDepth-deep chain written directly (PutImage is O(depth)).
	for i := 0; i < MaxChainDepth; i++ {
		img := Image{Ref: Ref{Name: "deep", ID: fmt.Sprint(i)}, Blob: blob, Format: "qcow2"}
		if i > 0 {
			img.Parent = fmt.Sprintf("deep:%d", i-1)
		}
		writeRecord(t, s, img)
	}
	top := Ref{Name: "deep", ID: fmt.Sprint(MaxChainDepth - 1)}
	chain, err := s.Chain(ctx, top)
	if err != nil || len(chain) != MaxChainDepth || chain[0].Ref != top || chain[len(chain)-1].Parent != "" {
		t.Fatalf("Chain: %d images, %v", len(chain), err)
	}
	err = s.PutImage(ctx, Image{Ref: ref("deep:one-more"), Blob: blob, Parent: top.String()})
	if !errors.Is(err, ErrChainTooDeep) {
		t.Fatalf("PutImage over the cap: %v", err)
	}
	// A loop made on disk is detected, not followed forever.
	writeRecord(t, s, Image{Ref: ref("loop:a"), Blob: blob, Parent: "loop:b"})
	writeRecord(t, s, Image{Ref: ref("loop:b"), Blob: blob, Parent: "loop:a"})
	if _, err := s.Chain(ctx, ref("loop:a")); !errors.Is(err, ErrLoop) {
		t.Fatalf("Chain of a loop: %v", err)
	}
	if err := s.PutImage(ctx, Image{Ref: ref("loop:c"), Blob: blob, Parent: "loop:a"}); !errors.Is(err, ErrLoop) {
		t.Fatalf("PutImage onto a loop: %v", err)
	}
	// A record naming another ref than its path is refused.
	writeRecord(t, s, Image{Ref: ref("liar:x"), Blob: blob})
	os.Rename(imageFile(s, ref("liar:x")), filepath.Join(s.Root(), dirImages, "liar", "y.json"))
	if _, err := s.GetImage(ctx, ref("liar:y")); err == nil {
		t.Fatal("record with a foreign ref accepted")
	}
}

func TestImagesListChildrenDelete(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s := openStore(t, root)
	b1 := mustPut(t, s, content(22, 100))
	b2 := mustPut(t, s, content(23, 200))
	t0 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	imgs := []Image{
		{Ref: ref("vol:base"), Blob: b1, Created: t0, Format: "qcow2"},
		{Ref: ref("vol:inc1"), Blob: b2, Parent: "vol:base", Created: t0.Add(time.Hour), Format: "qcow2"},
		{Ref: ref("vol:inc2"), Blob: b2, Parent: "vol:base", Created: t0.Add(time.Hour), Format: "qcow2"},
		{Ref: ref("zsbak:db1"), Blob: b1, Created: t0.Add(-time.Hour), Format: "gzip"},
	}
	for _, img := range imgs {
		if err := s.PutImage(ctx, img); err != nil {
			t.Fatal(err)
		}
	}
	s = openStore(t, root) // records survive a reopen
	ids := func(l []Image) string {
		var out []string
		for _, i := range l {
			out = append(out, i.Ref.String())
		}
		return strings.Join(out, ",")
	}
	for _, tc := range []struct{ name, want string }{
		{"", "zsbak:db1,vol:base,vol:inc1,vol:inc2"},
		{"vol", "vol:base,vol:inc1,vol:inc2"},
		{"nobody", ""},
	} {
		l, err := s.ListImages(ctx, tc.name)
		if err != nil || ids(l) != tc.want {
			t.Errorf("ListImages(%q) = %s, %v; want %s", tc.name, ids(l), err, tc.want)
		}
	}
	if _, err := s.ListImages(ctx, "../x"); !errors.Is(err, ErrInvalidName) {
		t.Errorf("ListImages(../x): %v", err)
	}
	kids, err := s.Children(ctx, ref("vol:base"))
	if err != nil || len(kids) != 2 {
		t.Fatalf("Children: %v, %v", kids, err)
	}
	err = s.DeleteImage(ctx, ref("vol:base"))
	if !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "has children vol:inc1, vol:inc2") {
		t.Fatalf("delete parent: %v", err)
	}
	if err := s.DeleteImage(ctx, ref("vol:nope")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete missing: %v", err)
	}
	for _, r := range []string{"vol:inc1", "vol:inc2", "vol:base"} {
		if err := s.DeleteImage(ctx, ref(r)); err != nil {
			t.Fatalf("delete %s: %v", r, err)
		}
	}
	if l, _ := s.ListImages(ctx, ""); ids(l) != "zsbak:db1" {
		t.Fatalf("left: %s", ids(l))
	}
	if _, err := os.Stat(filepath.Join(root, dirImages, "vol")); !os.IsNotExist(err) {
		t.Fatalf("empty name dir left: %v", err)
	}
	if !s.Exists(b2) {
		t.Fatal("DeleteImage freed a blob; only GC may")
	}
}

func TestReads(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	data := content(24, 1<<20+7)
	d := mustPut(t, s, data)
	b, err := s.OpenBlob(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != int64(len(data)) {
		t.Fatalf("Size %d", b.Size())
	}
	for _, r := range []struct{ off, n int }{{0, 10}, {1000, 5000}, {len(data) - 3, 3}, {len(data) / 2, 1 << 19}} {
		p := make([]byte, r.n)
		if _, err := b.ReadAt(p, int64(r.off)); err != nil || string(p) != string(data[r.off:r.off+r.n]) {
			t.Fatalf("ReadAt(%d,%d): %v", r.off, r.n, err)
		}
	}
	bi, err := s.Stat(ctx, d)
	if err != nil || bi.Size != int64(len(data)) || bi.Digest != d || time.Since(bi.ModTime) > time.Hour {
		t.Fatalf("Stat: %+v %v", bi, err)
	}
	other := digestOf([]byte("x"))
	if s.Exists(other) || !s.Exists(d) {
		t.Fatal("Exists wrong")
	}
	if _, err := s.OpenBlob(ctx, other); !errors.Is(err, ErrNotFound) {
		t.Fatalf("OpenBlob missing: %v", err)
	}
	if _, err := s.Stat(ctx, other); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Stat missing: %v", err)
	}
	p, err := s.BlobPath(d)
	if err != nil || !filepath.IsAbs(p) || !strings.HasSuffix(p, BackingName(d)[2:]) {
		t.Fatalf("BlobPath %s %v", p, err)
	}
	// BackingName resolves from a sibling layer's directory.
	if _, err := os.Stat(filepath.Join(filepath.Dir(p), BackingName(d))); err != nil {
		t.Fatalf("backing name does not resolve: %v", err)
	}
	if got, err := DigestFromBackingName(BackingName(d)); err != nil || got != d {
		t.Fatalf("round trip: %s %v", got, err)
	}
}

// TestBadNames feeds path tricks to every entry point taking a name, id,
// ref or digest.
func TestBadNames(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	hex := strings.Repeat("ab", 32)
	bad := []string{"", ".", "..", "../x", "a/b", "/abs", "a\x00b", ".hidden", "a b", "a:b", "a\\b", strings.Repeat("n", MaxNameLen+1), "ü"}
	for _, name := range bad {
		t.Run(fmt.Sprintf("%q", name), func(t *testing.T) {
			if _, err := s.Writer(ctx, name); !errors.Is(err, ErrInvalidName) {
				t.Errorf("Writer: %v", err)
			}
			if _, err := s.IngestOffset(name); !errors.Is(err, ErrInvalidName) {
				t.Errorf("IngestOffset: %v", err)
			}
			for _, r := range []Ref{{Name: name, ID: "x"}, {Name: "x", ID: name}} {
				if _, err := s.GetImage(ctx, r); !errors.Is(err, ErrInvalidName) {
					t.Errorf("GetImage(%v): %v", r, err)
				}
				if err := s.DeleteImage(ctx, r); !errors.Is(err, ErrInvalidName) {
					t.Errorf("DeleteImage(%v): %v", r, err)
				}
				if _, err := s.Chain(ctx, r); !errors.Is(err, ErrInvalidName) {
					t.Errorf("Chain(%v): %v", r, err)
				}
				if _, err := s.GC(ctx, []Ref{r}); !errors.Is(err, ErrInvalidName) {
					t.Errorf("GC(%v): %v", r, err)
				}
				if _, err := ParseRef(r.Name + ":" + r.ID); !errors.Is(err, ErrInvalidName) {
					t.Errorf("ParseRef: %v", err)
				}
				if _, err := ParseInstallPath(InstallPathScheme + r.Name + "/" + r.ID); !errors.Is(err, ErrInvalidName) {
					t.Errorf("ParseInstallPath: %v", err)
				}
			}
		})
	}
	for _, d := range []string{"", "sha256:", "sha256:" + hex[:63], "sha256:../../" + hex[6:], "sha256:" + strings.ToUpper(hex), "md5:" + hex, hex} {
		dd := digestFromString(d)
		if _, err := s.OpenBlob(ctx, dd); !errors.Is(err, ErrInvalidName) {
			t.Errorf("OpenBlob(%q): %v", d, err)
		}
		if _, err := s.BlobPath(dd); !errors.Is(err, ErrInvalidName) {
			t.Errorf("BlobPath(%q): %v", d, err)
		}
		if err := s.VerifyBlob(ctx, dd); !errors.Is(err, ErrInvalidName) {
			t.Errorf("VerifyBlob(%q): %v", d, err)
		}
		if s.Exists(dd) {
			t.Errorf("Exists(%q)", d)
		}
	}
	for _, n := range []string{"", hex, "../" + hex, "../cd/" + hex, "../ab/../" + hex, "../../ab/" + hex, "../ab/" + hex + "/x", "../ab/" + hex[:62]} {
		if _, err := DigestFromBackingName(n); !errors.Is(err, ErrInvalidName) {
			t.Errorf("DigestFromBackingName(%q): %v", n, err)
		}
	}
	for _, p := range []string{"zstore://a", "http://a/b", "zstore://a/b/c", "zstore://../b"} {
		if _, err := ParseInstallPath(p); !errors.Is(err, ErrInvalidName) {
			t.Errorf("ParseInstallPath(%q): %v", p, err)
		}
	}
	if r, err := ParseInstallPath("zstore://vol-1/2024.01_a"); err != nil || r.InstallPath() != "zstore://vol-1/2024.01_a" || r.String() != "vol-1:2024.01_a" {
		t.Errorf("ParseInstallPath good: %v %v", r, err)
	}
	// Nothing escaped the root.
	ents, _ := os.ReadDir(filepath.Dir(s.Root()))
	if len(ents) != 1 {
		t.Errorf("files appeared next to the root: %v", ents)
	}
}

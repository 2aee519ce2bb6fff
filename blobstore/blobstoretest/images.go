package blobstoretest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/blobstore"
)

func testPutImageValidation(t *testing.T, e *env) {
	s := e.open(t)
	ctx := context.Background()
	blob := mustPut(t, s, content(20, 1000))
	base := blobstore.Image{Ref: ref("vol:base"), Blob: blob, Format: "qcow2"}
	if err := s.PutImage(ctx, base); err != nil {
		t.Fatal(err)
	}
	missing := digestOf([]byte("never stored"))
	cases := []struct {
		name    string
		img     blobstore.Image
		wantErr error
		detail  string
	}{
		{"ok child", blobstore.Image{Ref: ref("vol:c1"), Blob: blob, Parent: "vol:base"}, nil, ""},
		{"idempotent retry", base, nil, ""},
		{"same ref other content", blobstore.Image{Ref: ref("vol:base"), Blob: blob, Desc: "changed"}, blobstore.ErrExists, "different content"},
		{"missing blob", blobstore.Image{Ref: ref("vol:x"), Blob: missing}, blobstore.ErrNotFound, "blob"},
		{"missing parent", blobstore.Image{Ref: ref("vol:x"), Blob: blob, Parent: "vol:nope"}, blobstore.ErrParentNotFound, "vol:nope"},
		{"own parent", blobstore.Image{Ref: ref("vol:x"), Blob: blob, Parent: "vol:x"}, blobstore.ErrLoop, "own parent"},
		{"size mismatch", blobstore.Image{Ref: ref("vol:x"), Blob: blob, Size: 999}, blobstore.ErrSizeMismatch, "999"},
		{"bad name", blobstore.Image{Ref: blobstore.Ref{Name: "../etc", ID: "x"}, Blob: blob}, blobstore.ErrInvalidName, "dot"},
		{"bad id", blobstore.Image{Ref: blobstore.Ref{Name: "vol", ID: "a/b"}, Blob: blob}, blobstore.ErrInvalidName, "'/'"},
		{"bad parent", blobstore.Image{Ref: ref("vol:x"), Blob: blob, Parent: "vol/base"}, blobstore.ErrInvalidName, "name:id"},
		{"bad digest", blobstore.Image{Ref: ref("vol:x"), Blob: "sha256:zz"}, blobstore.ErrInvalidName, "digest"},
		{"negative size", blobstore.Image{Ref: ref("vol:x"), Blob: blob, VirtualSize: -1}, blobstore.ErrInvalidName, "negative"},
		{"bad format", blobstore.Image{Ref: ref("vol:x"), Blob: blob, Format: "q/cow"}, blobstore.ErrInvalidName, "format"},
		{"huge desc", blobstore.Image{Ref: ref("vol:x"), Blob: blob, Desc: strings.Repeat("d", 5000)}, blobstore.ErrInvalidName, "desc"},
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
				if _, gerr := s.GetImage(ctx, tc.img.Ref); !errors.Is(gerr, blobstore.ErrNotFound) && !errors.Is(gerr, blobstore.ErrInvalidName) {
					t.Fatalf("rejected image was recorded: %v", gerr)
				}
			}
		})
	}
	got, err := s.GetImage(ctx, ref("vol:c1"))
	if err != nil || got.Size != 1000 || got.Created.IsZero() {
		t.Fatalf("GetImage: %+v, %v (size and created should be filled in)", got, err)
	}
	// Immutable across a restart too.
	s2 := e.open(t)
	if err := s2.PutImage(ctx, blobstore.Image{Ref: ref("vol:base"), Blob: blob, Desc: "changed"}); !errors.Is(err, blobstore.ErrExists) {
		t.Fatalf("changed record after reopen: %v", err)
	}
	if err := s2.PutImage(ctx, base); err != nil {
		t.Fatalf("identical re-put after reopen: %v", err)
	}
}

// testPutImageRace puts the same refs from two stores over one backend at
// once (two agents): identical records all succeed, differing ones leave
// exactly one winner and ErrExists for the others, never a replaced record.
func testPutImageRace(t *testing.T, e *env) {
	ctx := context.Background()
	a, b := e.open(t), e.open(t)
	blob := mustPut(t, a, content(25, 100))
	created := time.Date(2025, 5, 5, 0, 0, 0, 0, time.UTC)
	const n = 8
	for _, tc := range []struct {
		name      string
		identical bool
	}{{"identical", true}, {"different", false}} {
		t.Run(tc.name, func(t *testing.T) {
			var wg sync.WaitGroup
			errs := make([]error, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					img := blobstore.Image{Ref: ref("race:" + tc.name), Blob: blob, Created: created}
					if !tc.identical {
						img.Desc = fmt.Sprint("writer ", i)
					}
					errs[i] = []*blobstore.Store{a, b}[i%2].PutImage(ctx, img)
				}()
			}
			wg.Wait()
			ok := 0
			for i, err := range errs {
				switch {
				case err == nil:
					ok++
				case tc.identical || !errors.Is(err, blobstore.ErrExists):
					t.Fatalf("writer %d: %v", i, err)
				}
			}
			if want := map[bool]int{true: n, false: 1}[tc.identical]; ok != want {
				t.Fatalf("%d writers succeeded, want %d", ok, want)
			}
			if !tc.identical {
				got, err := b.GetImage(ctx, ref("race:different"))
				if err != nil {
					t.Fatal(err)
				}
				for i, err := range errs {
					if err == nil && got.Desc != fmt.Sprint("writer ", i) {
						t.Fatalf("the record says %q, the winner was writer %d", got.Desc, i)
					}
				}
			}
		})
	}
}

// putRecord writes an image record straight to the backend, bypassing
// PutImage's checks, as a crash, an older version or an operator might.
func putRecord(t *testing.T, s *blobstore.Store, key string, img blobstore.Image) {
	t.Helper()
	b, _ := json.Marshal(img)
	if err := s.Backend().PutRecord(context.Background(), key, b); err != nil {
		t.Fatal(err)
	}
}

func imageKey(r blobstore.Ref) string { return "images/" + r.Name + "/" + r.ID }

func testChainLimits(t *testing.T, e *env) {
	ctx := context.Background()
	s := e.open(t)
	blob := mustPut(t, s, content(21, 10))
	// A MaxChainDepth-deep chain written directly (PutImage is O(depth)).
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := 0; i < blobstore.MaxChainDepth; i++ {
		img := blobstore.Image{Ref: blobstore.Ref{Name: "deep", ID: fmt.Sprint(i)}, Blob: blob, Format: "qcow2"}
		if i > 0 {
			img.Parent = fmt.Sprintf("deep:%d", i-1)
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			putRecord(t, s, imageKey(img.Ref), img)
		}()
	}
	wg.Wait()
	top := blobstore.Ref{Name: "deep", ID: fmt.Sprint(blobstore.MaxChainDepth - 1)}
	chain, err := s.Chain(ctx, top)
	if err != nil || len(chain) != blobstore.MaxChainDepth || chain[0].Ref != top || chain[len(chain)-1].Parent != "" {
		t.Fatalf("Chain: %d images, %v", len(chain), err)
	}
	err = s.PutImage(ctx, blobstore.Image{Ref: ref("deep:one-more"), Blob: blob, Parent: top.String()})
	if !errors.Is(err, blobstore.ErrChainTooDeep) {
		t.Fatalf("PutImage over the cap: %v", err)
	}
	// A loop made behind the store's back is detected, not followed forever.
	putRecord(t, s, "images/loop/a", blobstore.Image{Ref: ref("loop:a"), Blob: blob, Parent: "loop:b"})
	putRecord(t, s, "images/loop/b", blobstore.Image{Ref: ref("loop:b"), Blob: blob, Parent: "loop:a"})
	if _, err := s.Chain(ctx, ref("loop:a")); !errors.Is(err, blobstore.ErrLoop) {
		t.Fatalf("Chain of a loop: %v", err)
	}
	if err := s.PutImage(ctx, blobstore.Image{Ref: ref("loop:c"), Blob: blob, Parent: "loop:a"}); !errors.Is(err, blobstore.ErrLoop) {
		t.Fatalf("PutImage onto a loop: %v", err)
	}
	// A record naming another ref than its key is refused.
	putRecord(t, s, "images/liar/y", blobstore.Image{Ref: ref("liar:x"), Blob: blob})
	if _, err := s.GetImage(ctx, ref("liar:y")); err == nil {
		t.Fatal("record with a foreign ref accepted")
	}
}

func testImagesListChildrenDelete(t *testing.T, e *env) {
	ctx := context.Background()
	s := e.open(t)
	b1 := mustPut(t, s, content(22, 100))
	b2 := mustPut(t, s, content(23, 200))
	t0 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	imgs := []blobstore.Image{
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
	s = e.open(t) // records survive a reopen
	ids := func(l []blobstore.Image) string {
		var out []string
		for _, i := range l {
			out = append(out, i.Ref.String())
		}
		return strings.Join(out, ",")
	}
	for _, tc := range []struct{ name, want string }{
		{"", "zsbak:db1,vol:base,vol:inc1,vol:inc2"},
		{"vol", "vol:base,vol:inc1,vol:inc2"},
		{"vo", ""}, // a name is a whole component, not a prefix
		{"nobody", ""},
	} {
		l, err := s.ListImages(ctx, tc.name)
		if err != nil || ids(l) != tc.want {
			t.Errorf("ListImages(%q) = %s, %v; want %s", tc.name, ids(l), err, tc.want)
		}
	}
	if _, err := s.ListImages(ctx, "../x"); !errors.Is(err, blobstore.ErrInvalidName) {
		t.Errorf("ListImages(../x): %v", err)
	}
	if c, err := s.Capacity(); err != nil || c.Images != 4 {
		t.Errorf("Capacity counts %d images, %v; want 4", c.Images, err)
	}
	kids, err := s.Children(ctx, ref("vol:base"))
	if err != nil || len(kids) != 2 {
		t.Fatalf("Children: %v, %v", kids, err)
	}
	err = s.DeleteImage(ctx, ref("vol:base"))
	if !errors.Is(err, blobstore.ErrExists) || !strings.Contains(err.Error(), "has children vol:inc1, vol:inc2") {
		t.Fatalf("delete parent: %v", err)
	}
	if err := s.DeleteImage(ctx, ref("vol:nope")); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("delete missing: %v", err)
	}
	for _, r := range []string{"vol:inc1", "vol:inc2", "vol:base"} {
		if err := s.DeleteImage(ctx, ref(r)); err != nil {
			t.Fatalf("delete %s: %v", r, err)
		}
	}
	if l, _ := e.open(t).ListImages(ctx, ""); ids(l) != "zsbak:db1" {
		t.Fatalf("left after a restart: %s", ids(l))
	}
	if !s.Exists(b2) {
		t.Fatal("DeleteImage freed a blob; only GC may")
	}
	// A deleted ref can be recorded again (with other content).
	if err := s.PutImage(ctx, blobstore.Image{Ref: ref("vol:base"), Blob: b2, Desc: "again"}); err != nil {
		t.Fatalf("re-record after delete: %v", err)
	}
}

func testReads(t *testing.T, e *env) {
	ctx := context.Background()
	s := e.open(t)
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
	p := make([]byte, 10)
	if n, err := b.ReadAt(p, int64(len(data)-4)); n != 4 || err == nil {
		t.Fatalf("ReadAt across the end: %d, %v; want 4 bytes and an error", n, err)
	}
	bi, err := s.Stat(ctx, d)
	if err != nil || bi.Size != int64(len(data)) || bi.Digest != d || time.Since(bi.ModTime) > time.Hour {
		t.Fatalf("Stat: %+v %v", bi, err)
	}
	other := digestOf([]byte("x"))
	if s.Exists(other) || !s.Exists(d) {
		t.Fatal("Exists wrong")
	}
	if _, err := s.OpenBlob(ctx, other); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("OpenBlob missing: %v", err)
	}
	if _, err := s.Stat(ctx, other); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("Stat missing: %v", err)
	}
	path, err := s.BlobPath(d)
	if errors.Is(err, blobstore.ErrNoLocalPath) {
		return // a backend without files; reads go through OpenBlob
	}
	if err != nil || !filepath.IsAbs(path) || !strings.HasSuffix(path, blobstore.BackingName(d)[2:]) {
		t.Fatalf("BlobPath %s %v", path, err)
	}
	// BackingName resolves from a sibling layer's directory.
	if _, err := os.Stat(filepath.Join(filepath.Dir(path), blobstore.BackingName(d))); err != nil {
		t.Fatalf("backing name does not resolve: %v", err)
	}
	if _, err := s.BlobPath(other); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("BlobPath missing: %v", err)
	}
}

// testBadNames feeds path tricks to every entry point taking a name, id,
// ref or digest.
func testBadNames(t *testing.T, e *env) {
	ctx := context.Background()
	s := e.open(t)
	hex := strings.Repeat("ab", 32)
	bad := []string{"", ".", "..", "../x", "a/b", "/abs", "a\x00b", ".hidden", "a b", "a:b", "a\\b", strings.Repeat("n", blobstore.MaxNameLen+1), "ü"}
	for _, name := range bad {
		t.Run(fmt.Sprintf("%q", name), func(t *testing.T) {
			if _, err := s.Writer(ctx, name); !errors.Is(err, blobstore.ErrInvalidName) {
				t.Errorf("Writer: %v", err)
			}
			if _, err := s.IngestOffset(name); !errors.Is(err, blobstore.ErrInvalidName) {
				t.Errorf("IngestOffset: %v", err)
			}
			if name != "" {
				if _, err := s.ListImages(ctx, name); !errors.Is(err, blobstore.ErrInvalidName) {
					t.Errorf("ListImages: %v", err)
				}
			}
			for _, r := range []blobstore.Ref{{Name: name, ID: "x"}, {Name: "x", ID: name}} {
				if _, err := s.GetImage(ctx, r); !errors.Is(err, blobstore.ErrInvalidName) {
					t.Errorf("GetImage(%v): %v", r, err)
				}
				if err := s.DeleteImage(ctx, r); !errors.Is(err, blobstore.ErrInvalidName) {
					t.Errorf("DeleteImage(%v): %v", r, err)
				}
				if _, err := s.Chain(ctx, r); !errors.Is(err, blobstore.ErrInvalidName) {
					t.Errorf("Chain(%v): %v", r, err)
				}
				if _, err := s.Children(ctx, r); !errors.Is(err, blobstore.ErrInvalidName) {
					t.Errorf("Children(%v): %v", r, err)
				}
				if _, err := s.GC(ctx, []blobstore.Ref{r}); !errors.Is(err, blobstore.ErrInvalidName) {
					t.Errorf("GC(%v): %v", r, err)
				}
			}
		})
	}
	for _, d := range []string{"", "sha256:", "sha256:" + hex[:63], "sha256:../../" + hex[6:], "sha256:" + strings.ToUpper(hex), "md5:" + hex, hex} {
		dd := digestFromString(d)
		if _, err := s.OpenBlob(ctx, dd); !errors.Is(err, blobstore.ErrInvalidName) {
			t.Errorf("OpenBlob(%q): %v", d, err)
		}
		if _, err := s.Stat(ctx, dd); !errors.Is(err, blobstore.ErrInvalidName) {
			t.Errorf("Stat(%q): %v", d, err)
		}
		if _, err := s.BlobPath(dd); !errors.Is(err, blobstore.ErrInvalidName) {
			t.Errorf("BlobPath(%q): %v", d, err)
		}
		if err := s.VerifyBlob(ctx, dd); !errors.Is(err, blobstore.ErrInvalidName) {
			t.Errorf("VerifyBlob(%q): %v", d, err)
		}
		if s.Exists(dd) {
			t.Errorf("Exists(%q)", d)
		}
		if _, _, err := s.Put(ctx, bytesReader(nil), 0, dd); d != "" && !errors.Is(err, blobstore.ErrInvalidName) {
			t.Errorf("Put(%q): %v", d, err)
		}
	}
	// Nothing escaped the root.
	ents, _ := os.ReadDir(filepath.Dir(s.Root()))
	if len(ents) != 1 {
		t.Errorf("files appeared next to the root: %v", ents)
	}
}

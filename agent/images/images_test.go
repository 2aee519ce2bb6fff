package images

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
)

func newService(t *testing.T) (*Service, *blobstore.Store) {
	t.Helper()
	store, err := blobstore.Open(context.Background(), blobstore.Options{Root: t.TempDir(), CommitGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	s, err := New(Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	return s, store
}

// put stores data as an opaque image name:id on parent ("" for none).
func put(t *testing.T, store *blobstore.Store, name, id, parent, data string) blobstore.Image {
	t.Helper()
	ctx := context.Background()
	d, n, err := store.Put(ctx, strings.NewReader(data), int64(len(data)), "")
	if err != nil {
		t.Fatal(err)
	}
	img := blobstore.Image{Ref: blobstore.Ref{Name: name, ID: id}, Blob: d, Parent: parent, Created: time.Now().UTC(), Size: n, VirtualSize: n, Format: "gzip"}
	if err := store.PutImage(ctx, img); err != nil {
		t.Fatal(err)
	}
	return img
}

func TestParsePath(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{"zstore://vol/1", "vol:1", ""},
		{"vol:1", "vol:1", ""},
		{"", "", "missing field installPath"},
		{"zstore://../x", "", "installPath: "},
		{"vol", "", "installPath: "},
	} {
		ref, err := ParsePath("installPath", tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParsePath(%q) = %v, %v; want error %q", tc.in, ref, err, tc.err)
			}
			continue
		}
		if err != nil || ref.String() != tc.want {
			t.Errorf("ParsePath(%q) = %v, %v; want %s", tc.in, ref, err, tc.want)
		}
	}
	keep, skipped := ParseKeep([]string{"a:1", "bad", "http://h:8001/imagestore/upload/x/y", "zstore://b/2", "zstore://../x"})
	if len(keep) != 2 || keep[0].String() != "a:1" || keep[1].String() != "b:2" {
		t.Fatalf("ParseKeep kept %v", keep)
	}
	if len(skipped) != 3 || skipped[0].Index != 1 || skipped[1].Index != 2 || skipped[2].Index != 4 ||
		!strings.Contains(skipped[1].String(), "not a zstore:// install path") || !strings.Contains(skipped[0].String(), `imagesToKeep[1] "bad"`) {
		t.Fatalf("ParseKeep skipped %v", skipped)
	}
	if keep, _ := ParseKeep([]string{"ftp://x/y"}); keep != nil {
		t.Fatalf("no usable entry must keep everything (nil), got %#v", keep)
	}
}

func TestReadsAndDelete(t *testing.T) {
	s, store := newService(t)
	ctx := context.Background()
	base := put(t, store, "vol", "1", "", "base bytes")
	top := put(t, store, "vol", "2", "vol:1", "top bytes")
	put(t, store, "other", "1", "", "other")

	if _, err := s.Lookup(ctx, "parent", "vol:9"); err == nil || err.Error() != "parent vol:9 not found in the store" {
		t.Fatalf("unknown parent: %v", err)
	}
	if _, err := s.Info(ctx, "zstore://vol/9"); err == nil || !strings.Contains(err.Error(), "no such image") {
		t.Fatalf("unknown image: %v", err)
	}
	chain, err := s.Chain(ctx, top.InstallPath())
	if err != nil || len(chain) != 2 || chain[0].ID != "2" || chain[1].ID != "1" {
		t.Fatalf("chain %+v %v", chain, err)
	}
	list, err := s.List(ctx, "vol")
	if err != nil || len(list) != 2 {
		t.Fatalf("list %+v %v", list, err)
	}
	if _, err := s.List(ctx, "../x"); err == nil || !strings.HasPrefix(err.Error(), "name: ") {
		t.Fatalf("bad name: %v", err)
	}

	sha, sum := sha256.Sum256([]byte("base bytes")), md5.Sum([]byte("base bytes"))
	for alg, want := range map[string]string{"sha256": hex.EncodeToString(sha[:]), "md5": hex.EncodeToString(sum[:])} {
		got, err := s.Hash(ctx, HashRequest{InstallPath: base.InstallPath(), Algorithm: alg}, jobs.Nop{})
		if err != nil || got != want {
			t.Fatalf("%s: %s %v, want %s", alg, got, err, want)
		}
	}
	if err := CheckHashAlgorithm("sha1"); err == nil || !strings.Contains(err.Error(), `alogrithm "sha1" not supported`) {
		t.Fatalf("sha1: %v", err)
	}

	if res, err := s.Delete(ctx, top.Ref); !res.Deleted || res.Deferred || err != nil {
		t.Fatalf("delete: %+v %v", res, err)
	}
	if res, err := s.Delete(ctx, top.Ref); res.Deleted || err != nil {
		t.Fatalf("second delete: %+v %v, want not deleted and no error", res, err)
	}
	res, err := s.GC(ctx, nil)
	if err != nil || res.BlobsFreed != 1 {
		t.Fatalf("gc %+v %v", res, err)
	}
	_ = base
}

// Deleting an image whose incremental children still need it marks it;
// it disappears from lookups at once and is reclaimed with its last child.
func TestDeleteWithChildren(t *testing.T) {
	s, store := newService(t)
	ctx := context.Background()
	base := put(t, store, "vol", "1", "", "base bytes")
	mid := put(t, store, "vol", "2", "vol:1", "mid bytes")
	top := put(t, store, "vol", "3", "vol:2", "top bytes")

	for _, r := range []blobstore.Image{base, mid} {
		res, err := s.Delete(ctx, r.Ref)
		if err != nil || res.Deleted || !res.Deferred {
			t.Fatalf("delete %s with children: %+v %v", r.Ref, res, err)
		}
		if _, err := s.Info(ctx, r.InstallPath()); err == nil || !strings.Contains(err.Error(), "was deleted") {
			t.Fatalf("info of a deleted parent: %v", err)
		}
	}
	if list, _ := s.List(ctx, "vol"); len(list) != 1 || list[0].ID != "3" {
		t.Fatalf("list shows deleted images: %+v", list)
	}
	// The child still reads its whole chain.
	if chain, err := s.Chain(ctx, top.InstallPath()); err != nil || len(chain) != 3 {
		t.Fatalf("chain of the live child: %d %v", len(chain), err)
	}
	// GC with the child kept keeps the marked ancestors.
	if _, err := s.GC(ctx, []blobstore.Ref{top.Ref}); err != nil {
		t.Fatal(err)
	}
	if _, err := store.GetImage(ctx, base.Ref); err != nil {
		t.Fatalf("gc dropped an ancestor a live child needs: %v", err)
	}
	res, err := s.Delete(ctx, top.Ref)
	if err != nil || !res.Deleted || len(res.Reclaimed) != 2 {
		t.Fatalf("deleting the last child: %+v %v", res, err)
	}
	for _, r := range []blobstore.Image{base, mid, top} {
		if _, err := store.GetImage(ctx, r.Ref); !errors.Is(err, blobstore.ErrNotFound) {
			t.Fatalf("%s still recorded: %v", r.Ref, err)
		}
	}
	gc, err := s.GC(ctx, nil)
	if err != nil || gc.BlobsFreed != 3 {
		t.Fatalf("gc after the reclaim: %+v %v", gc, err)
	}
	if refs, _ := s.markedRefs(); len(refs) != 0 {
		t.Fatalf("marks left: %v", refs)
	}
	// A mark whose image GC removed is dropped too.
	a := put(t, store, "w", "1", "", "a")
	put(t, store, "w", "2", "w:1", "b")
	if res, _ := s.Delete(ctx, a.Ref); !res.Deferred {
		t.Fatal("not deferred")
	}
	keepOther := put(t, store, "z", "1", "", "z")
	if _, err := s.GC(ctx, []blobstore.Ref{keepOther.Ref}); err != nil {
		t.Fatal(err)
	}
	if refs, _ := s.markedRefs(); len(refs) != 0 {
		t.Fatalf("marks left after gc removed their images: %v", refs)
	}
}

func TestAllocInstallPathAndNewRef(t *testing.T) {
	s, store := newService(t)
	ctx := context.Background()
	parent := put(t, store, "vol", "1", "", "x")
	p, err := s.AllocInstallPath(ctx, parent.InstallPath(), "ignored")
	if err != nil || !strings.HasPrefix(p, "zstore://vol/") || p == parent.InstallPath() {
		t.Fatalf("with a parent: %q %v", p, err)
	}
	if p, err := s.AllocInstallPath(ctx, "", "named"); err != nil || !strings.HasPrefix(p, "zstore://named/") {
		t.Fatalf("with a name: %q %v", p, err)
	}
	if _, err := s.AllocInstallPath(ctx, "", "../x"); err == nil || !strings.HasPrefix(err.Error(), "name: ") {
		t.Fatalf("bad name: %v", err)
	}
	if ref, err := NewRef("", "", &parent); err != nil || ref.Name != "vol" || len(ref.ID) != 32 {
		t.Fatalf("NewRef on a parent: %v %v", ref, err)
	}
	if ref, err := NewRef("zstore://a/b", "x", nil); err != nil || ref.String() != "a:b" {
		t.Fatalf("NewRef with an install path: %v %v", ref, err)
	}
}

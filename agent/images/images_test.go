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
	if _, err := ParseKeep([]string{"a:1", "bad"}); err == nil || !strings.Contains(err.Error(), "imagesToKeep[1]") {
		t.Fatalf("ParseKeep: %v", err)
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

	if _, err := s.Delete(ctx, base.Ref); !errors.Is(err, blobstore.ErrExists) {
		t.Fatalf("deleting a parent: %v", err)
	}
	if deleted, err := s.Delete(ctx, top.Ref); !deleted || err != nil {
		t.Fatalf("delete: %v %v", deleted, err)
	}
	if deleted, err := s.Delete(ctx, top.Ref); deleted || err != nil {
		t.Fatalf("second delete: %v %v, want false and no error", deleted, err)
	}
	res, err := s.GC(ctx, nil)
	if err != nil || res.BlobsFreed != 1 {
		t.Fatalf("gc %+v %v", res, err)
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

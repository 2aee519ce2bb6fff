package registry_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/oci"
	"imagestore/transfer/registry/registrytest"
)

// graceNode is a registry over a store whose GC may free any unreferenced
// blob at once (CommitGrace 1 ns), so a test can check what GC frees.
func graceNode(t *testing.T) (*blobstore.Store, *httptest.Server) {
	t.Helper()
	n := registrytest.Start(t, registrytest.Options{CommitGrace: time.Nanosecond})
	return n.Store, n.HTTP
}

func manifestDigest(t *testing.T, base, name, ref string) digest.Digest {
	t.Helper()
	resp, b := do(t, "GET", base+"/v2/"+name+"/manifests/"+ref, nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET manifest %s:%s: %d %s", name, ref, resp.StatusCode, b)
	}
	d := digest.FromBytes(b)
	if h := resp.Header.Get(oci.HeaderContentDigest); h != d.String() {
		t.Fatalf("manifest %s:%s: header digest %s, body %s", name, ref, h, d)
	}
	return d
}

// pullsFine GETs a manifest and every blob it names, checking each digest.
func pullsFine(t *testing.T, base, name, ref string) {
	t.Helper()
	resp, b := do(t, "GET", base+"/v2/"+name+"/manifests/"+ref, nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET manifest %s:%s: %d %s", name, ref, resp.StatusCode, b)
	}
	m, err := oci.ParseManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range append([]oci.Descriptor{m.Config}, m.Layers...) {
		resp, data := do(t, "GET", base+"/v2/"+name+"/blobs/"+l.Digest.String(), nil, nil)
		if resp.StatusCode != http.StatusOK || digest.FromBytes(data) != l.Digest {
			t.Fatalf("blob %s of %s:%s: %d, %d bytes", l.Digest, name, ref, resp.StatusCode, len(data))
		}
	}
}

func tagsOf(t *testing.T, base, name string) string {
	t.Helper()
	resp, b := do(t, "GET", base+"/v2/"+name+"/tags/list", nil, nil)
	if resp.StatusCode == http.StatusNotFound {
		return ""
	}
	var tl struct{ Tags []string }
	if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &tl) != nil {
		t.Fatalf("tags of %s: %d %s", name, resp.StatusCode, b)
	}
	return strings.Join(tl.Tags, ",")
}

func TestDeleteManifest(t *testing.T) {
	for _, byDigest := range []bool{false, true} {
		name := "by tag"
		if byDigest {
			name = "by digest"
		}
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			st, hs := graceNode(t)
			chain := makeChain(t, st, "vol", 4<<10, 2<<10, 1<<10) // vol:l0 <- vol:l1 <- vol:l2
			other := makeChain(t, st, "other", 1<<10)
			refOf := func(id string) string {
				if byDigest {
					return manifestDigest(t, hs.URL, "vol", id).String()
				}
				return id
			}
			del := func(ref string) (*http.Response, []byte) {
				return do(t, "DELETE", hs.URL+"/v2/vol/manifests/"+ref, nil, nil)
			}
			top := manifestDigest(t, hs.URL, "vol", "l2")

			// A parent is refused, naming its child; nothing changes.
			resp, b := del(refOf("l1"))
			if resp.StatusCode != http.StatusConflict || errCode(t, b) != oci.CodeDenied || !strings.Contains(string(b), "vol:l2") {
				t.Fatalf("delete of a parent: %d %s", resp.StatusCode, b)
			}
			pullsFine(t, hs.URL, "vol", "l2")
			if got := tagsOf(t, hs.URL, "vol"); got != "l0,l1,l2" {
				t.Fatalf("tags after a refused delete: %s", got)
			}

			// The top goes; its ancestors stay and still pull.
			resp, b = del(refOf("l2"))
			if resp.StatusCode != http.StatusAccepted {
				t.Fatalf("delete of the top: %d %s", resp.StatusCode, b)
			}
			for _, ref := range []string{"l2", top.String()} {
				resp, b = do(t, "GET", hs.URL+"/v2/vol/manifests/"+ref, nil, nil)
				if resp.StatusCode != http.StatusNotFound || errCode(t, b) != oci.CodeManifestUnknown {
					t.Fatalf("GET %s after delete: %d %s", ref, resp.StatusCode, b)
				}
			}
			if got := tagsOf(t, hs.URL, "vol"); got != "l0,l1" {
				t.Fatalf("tags after delete: %s", got)
			}
			if _, err := st.GetImage(ctx, chain[2].Ref); !errors.Is(err, blobstore.ErrNotFound) {
				t.Fatalf("record still there: %v", err)
			}
			if !st.Exists(chain[2].Blob) {
				t.Fatal("DELETE freed the blob; that is GC's job")
			}
			pullsFine(t, hs.URL, "vol", "l1")

			// Again: gone. Then the former parent goes too.
			resp, b = del(top.String())
			if resp.StatusCode != http.StatusNotFound || errCode(t, b) != oci.CodeManifestUnknown {
				t.Fatalf("second delete: %d %s", resp.StatusCode, b)
			}
			if resp, b = del(refOf("l1")); resp.StatusCode != http.StatusAccepted {
				t.Fatalf("delete of the former parent: %d %s", resp.StatusCode, b)
			}
			if got := tagsOf(t, hs.URL, "vol"); got != "l0" {
				t.Fatalf("tags: %s", got)
			}

			// GC frees exactly the deleted images' blobs.
			res, err := st.GC(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.BlobsFreed != 2 || st.Exists(chain[1].Blob) || st.Exists(chain[2].Blob) ||
				!st.Exists(chain[0].Blob) || !st.Exists(other[0].Blob) {
				t.Fatalf("GC freed %d blobs", res.BlobsFreed)
			}
			pullsFine(t, hs.URL, "vol", "l0")
			pullsFine(t, hs.URL, "other", "l0")
		})
	}
}

func TestDeleteManifestRefusals(t *testing.T) {
	ctx := context.Background()
	st, hs := graceNode(t)
	base := makeChain(t, st, "base", 1<<10)
	// A child in another repository still protects its parent.
	d, n, err := st.Put(ctx, strings.NewReader("child layer"), -1, "")
	if err != nil {
		t.Fatal(err)
	}
	child := blobstore.Image{Ref: blobstore.Ref{Name: "vm", ID: "c1"}, Blob: d, Size: n, Parent: base[0].Ref.String(), Format: "raw"}
	if err := st.PutImage(ctx, child); err != nil {
		t.Fatal(err)
	}
	baseDigest := manifestDigest(t, hs.URL, "base", "l0")
	cases := []struct {
		name, path string
		status     int
		code       string
		msg        string
	}{
		{"parent of a child elsewhere, by tag", "/v2/base/manifests/l0", http.StatusConflict, oci.CodeDenied, "vm:c1"},
		{"parent of a child elsewhere, by digest", "/v2/base/manifests/" + baseDigest.String(), http.StatusConflict, oci.CodeDenied, "vm:c1"},
		{"unknown tag", "/v2/base/manifests/nope", http.StatusNotFound, oci.CodeManifestUnknown, ""},
		{"unknown repository", "/v2/nope/manifests/l0", http.StatusNotFound, oci.CodeManifestUnknown, ""},
		{"unknown digest", "/v2/base/manifests/sha256:" + strings.Repeat("0", 64), http.StatusNotFound, oci.CodeManifestUnknown, ""},
		{"digest of another repository's manifest", "/v2/vm/manifests/" + baseDigest.String(), http.StatusNotFound, oci.CodeManifestUnknown, ""},
		{"bad digest", "/v2/base/manifests/sha256:xyz", http.StatusBadRequest, oci.CodeDigestInvalid, ""},
		{"bad tag", "/v2/base/manifests/-bad!", http.StatusNotFound, oci.CodeManifestUnknown, ""},
		{"blob", "/v2/base/blobs/" + base[0].Blob.String(), http.StatusMethodNotAllowed, oci.CodeUnsupported, "GC"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, b := do(t, "DELETE", hs.URL+c.path, nil, nil)
			if resp.StatusCode != c.status || errCode(t, b) != c.code || !strings.Contains(string(b), c.msg) {
				t.Fatalf("%d %s, want %d %s mentioning %q", resp.StatusCode, b, c.status, c.code, c.msg)
			}
		})
	}
	imgs, err := st.ListImages(ctx, "")
	if err != nil || len(imgs) != 2 || !st.Exists(base[0].Blob) {
		t.Fatalf("a refused delete changed the store: %v %v", imgs, err)
	}
	pullsFine(t, hs.URL, "vm", "c1")
}

func TestDeleteNeedsAuth(t *testing.T) {
	n := newNode(t, "s3cret")
	makeChain(t, n.Store, "vol", 1<<10)
	resp, _ := do(t, "DELETE", n.HTTP.URL+"/v2/vol/manifests/l0", nil, nil)
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("DELETE without credentials: %d", resp.StatusCode)
	}
	if imgs, _ := n.Store.ListImages(context.Background(), "vol"); len(imgs) != 1 {
		t.Fatalf("unauthorized DELETE removed the image: %v", imgs)
	}
	resp, b := do(t, "DELETE", n.HTTP.URL+"/v2/vol/manifests/l0", nil, map[string]string{"Authorization": "Bearer s3cret"})
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("DELETE with credentials: %d %s", resp.StatusCode, b)
	}
}

// TestPushBackAfterDelete: the registry answers HEAD for a config it
// rendered from its cache, so a client re-pushing an image deleted behind
// the registry's back (agent API, GC) skips the config upload; the
// manifest PUT must still find it.
func TestPushBackAfterDelete(t *testing.T) {
	ctx := context.Background()
	st, hs := graceNode(t)
	chain := makeChain(t, st, "vol", 1<<10, 1<<10)
	resp, mb := do(t, "GET", hs.URL+"/v2/vol/manifests/l1", nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET: %d", resp.StatusCode)
	}
	m, err := oci.ParseManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.DeleteImage(ctx, chain[1].Ref); err != nil {
		t.Fatal(err)
	}
	if resp, _ := do(t, "HEAD", hs.URL+"/v2/vol/blobs/"+m.Config.Digest.String(), nil, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("HEAD config: %d (the cache no longer answers: this test no longer tests anything)", resp.StatusCode)
	}
	resp, b := do(t, "PUT", hs.URL+"/v2/vol/manifests/l1", mb, map[string]string{"Content-Type": oci.MediaTypeManifest})
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT back: %d %s", resp.StatusCode, b)
	}
	if got := manifestDigest(t, hs.URL, "vol", "l1"); got != digest.FromBytes(mb) {
		t.Fatalf("digest %s after push-back, was %s", got, digest.FromBytes(mb))
	}
}

// TestDeleteDamagedChain: an image whose blob is lost is no longer served,
// but can still be deleted, by tag or by the digest it had.
func TestDeleteDamagedChain(t *testing.T) {
	ctx := context.Background()
	st, hs := graceNode(t)
	root := st.Root()
	chain := makeChain(t, st, "vol", 1<<10, 1<<10, 1<<10)
	d2 := manifestDigest(t, hs.URL, "vol", "l2")
	for _, img := range chain[1:] {
		hex := img.Blob.Encoded()
		if err := os.Remove(filepath.Join(root, "blobs", "sha256", hex[:2], hex)); err != nil {
			t.Fatal(err)
		}
		if st.Exists(img.Blob) {
			t.Fatalf("blob %s still there: the store layout changed", img.Blob)
		}
	}
	if resp, b := do(t, "GET", hs.URL+"/v2/vol/manifests/l2", nil, nil); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("damaged chain served: %d %s", resp.StatusCode, b)
	}
	for _, ref := range []string{d2.String(), "l1"} {
		if resp, b := do(t, "DELETE", hs.URL+"/v2/vol/manifests/"+ref, nil, nil); resp.StatusCode != http.StatusAccepted {
			t.Fatalf("DELETE %s of a damaged chain: %d %s", ref, resp.StatusCode, b)
		}
	}
	if imgs, err := st.ListImages(ctx, "vol"); err != nil || len(imgs) != 1 || imgs[0].Ref != chain[0].Ref {
		t.Fatalf("left: %v %v", imgs, err)
	}
}

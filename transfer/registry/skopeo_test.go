package registry_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/oci"
	"imagestore/transfer/registry/registrytest"
)

func skopeo(t *testing.T, args ...string) string {
	t.Helper()
	out, err := skopeoRun(t, args...)
	if err != nil {
		t.Fatalf("skopeo %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// skopeoRun runs skopeo and returns its combined output and exit error.
func skopeoRun(t *testing.T, args ...string) (string, error) {
	t.Helper()
	path, err := exec.LookPath("skopeo")
	if err != nil {
		t.Fatalf("skopeo is required for the interop test: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, append([]string{"--insecure-policy"}, args...)...)
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "REGISTRY_AUTH_FILE="+filepath.Join(t.TempDir(), "auth.json"))
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestSkopeoInterop copies a chain between two of our registries and to a
// dir: layout with the real skopeo, with token auth as Basic credentials.
func TestSkopeoInterop(t *testing.T) {
	const token = "interop-token"
	a, b := newNode(t, token), newNode(t, token)
	ctx := context.Background()
	chain := makeChain(t, a.Store, "vol", 200<<10, 100<<10, 50<<10)
	top := chain[len(chain)-1].Ref
	src := "docker://" + a.Addr() + "/vol:" + top.ID
	dst := "docker://" + b.Addr() + "/vol:" + top.ID
	creds := "x:" + token
	skopeo(t, "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--src-creds", creds, "--dest-creds", creds, src, dst)

	da, err := a.Client(t, token, false).HeadManifest(ctx, "vol", top.ID)
	if err != nil {
		t.Fatal(err)
	}
	db, err := b.Client(t, token, false).HeadManifest(ctx, "vol", top.ID)
	if err != nil {
		t.Fatal(err)
	}
	if da.Digest != db.Digest {
		t.Fatalf("manifest digest on B %s, on A %s", db.Digest, da.Digest)
	}
	got, err := b.Store.Chain(ctx, top)
	if err != nil || len(got) != len(chain) {
		t.Fatalf("B's chain: %v %v", got, err)
	}
	for i, img := range got {
		if img.Blob != chain[len(chain)-1-i].Blob {
			t.Fatalf("B's chain[%d] blob %s", i, img.Blob)
		}
	}

	dir := filepath.Join(t.TempDir(), "layout")
	skopeo(t, "copy", "--src-tls-verify=false", "--src-creds", creds, src, "dir:"+dir)
	mb, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if d := digest.FromBytes(mb); d != da.Digest {
		t.Fatalf("dir: manifest digest %s, registry %s", d, da.Digest)
	}
	for _, img := range chain {
		if _, err := os.Stat(filepath.Join(dir, img.Blob.Encoded())); err != nil {
			t.Fatalf("layer %s not in dir: layout: %v", img.Blob, err)
		}
	}
	// And back: from the dir: layout into a third, empty store.
	c := newNode(t, token)
	skopeo(t, "copy", "--dest-tls-verify=false", "--dest-creds", creds, "dir:"+dir, "docker://"+c.Addr()+"/vol:"+top.ID)
	dc, err := c.Client(t, token, false).HeadManifest(ctx, "vol", top.ID)
	if err != nil || dc.Digest != da.Digest {
		t.Fatalf("C's digest %v (%v), want %s", dc.Digest, err, da.Digest)
	}
}

// TestSkopeoDelete deletes by tag with the real skopeo (which resolves the
// tag to the manifest digest and DELETEs by digest), is refused for a
// parent, and can copy a deleted image back from a peer.
func TestSkopeoDelete(t *testing.T) {
	const token = "delete-token"
	a, b := newNode(t, token), newNode(t, token)
	ctx := context.Background()
	creds := "x:" + token
	chain := makeChain(t, a.Store, "vol", 64<<10, 32<<10)
	ref := func(n *registrytest.Node, id string) string { return "docker://" + n.Addr() + "/vol:" + id }
	skopeo(t, "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--src-creds", creds, "--dest-creds", creds, ref(a, "l1"), ref(b, "l1"))
	ca := a.Client(t, token, false)
	want, err := ca.HeadManifest(ctx, "vol", "l1")
	if err != nil {
		t.Fatal(err)
	}

	// Refused for the right reason: skopeo shows our error, naming the child.
	if out, err := skopeoRun(t, "delete", "--tls-verify=false", "--creds", creds, ref(a, "l0")); err == nil || !strings.Contains(out, "parent of vol:l1") {
		t.Fatalf("skopeo delete of a parent: %v\n%s", err, out)
	}
	if _, err := ca.HeadManifest(ctx, "vol", "l0"); err != nil {
		t.Fatalf("refused delete removed the parent: %v", err)
	}

	skopeo(t, "delete", "--tls-verify=false", "--creds", creds, ref(a, "l1"))
	if _, err := ca.HeadManifest(ctx, "vol", "l1"); !errors.Is(err, oci.ErrNotFound) {
		t.Fatalf("manifest after skopeo delete: %v", err)
	}
	if _, err := ca.HeadManifest(ctx, "vol", want.Digest.String()); !errors.Is(err, oci.ErrNotFound) {
		t.Fatalf("manifest by digest after skopeo delete: %v", err)
	}
	if tags, err := ca.Tags(ctx, "vol"); err != nil || strings.Join(tags, ",") != "l0" {
		t.Fatalf("tags after skopeo delete: %v %v", tags, err)
	}
	if _, err := a.Store.GetImage(ctx, chain[1].Ref); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("record after skopeo delete: %v", err)
	}
	if _, err := skopeoRun(t, "inspect", "--raw", "--tls-verify=false", "--creds", creds, ref(a, "l1")); err == nil {
		t.Fatal("skopeo still inspects the deleted image")
	}

	// Back from the peer, with the same digest.
	skopeo(t, "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--src-creds", creds, "--dest-creds", creds, ref(b, "l1"), ref(a, "l1"))
	got, err := ca.HeadManifest(ctx, "vol", "l1")
	if err != nil || got.Digest != want.Digest {
		t.Fatalf("copied back: %v (%v), want %s", got.Digest, err, want.Digest)
	}
}

package registry_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func skopeo(t *testing.T, args ...string) string {
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
	if err != nil {
		t.Fatalf("skopeo %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestSkopeoInterop copies a chain between two of our registries and to a
// dir: layout with the real skopeo, with token auth as Basic credentials.
func TestSkopeoInterop(t *testing.T) {
	const token = "interop-token"
	a, b := newNode(t, token), newNode(t, token)
	ctx := context.Background()
	chain := makeChain(t, a.st, "vol", 200<<10, 100<<10, 50<<10)
	top := chain[len(chain)-1].Ref
	src := "docker://" + a.addr() + "/vol:" + top.ID
	dst := "docker://" + b.addr() + "/vol:" + top.ID
	creds := "x:" + token
	skopeo(t, "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--src-creds", creds, "--dest-creds", creds, src, dst)

	da, err := a.client(t, token, false).HeadManifest(ctx, "vol", top.ID)
	if err != nil {
		t.Fatal(err)
	}
	db, err := b.client(t, token, false).HeadManifest(ctx, "vol", top.ID)
	if err != nil {
		t.Fatal(err)
	}
	if da.Digest != db.Digest {
		t.Fatalf("manifest digest on B %s, on A %s", db.Digest, da.Digest)
	}
	got, err := b.st.Chain(ctx, top)
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
	skopeo(t, "copy", "--dest-tls-verify=false", "--dest-creds", creds, "dir:"+dir, "docker://"+c.addr()+"/vol:"+top.ID)
	dc, err := c.client(t, token, false).HeadManifest(ctx, "vol", top.ID)
	if err != nil || dc.Digest != da.Digest {
		t.Fatalf("C's digest %v (%v), want %s", dc.Digest, err, da.Digest)
	}
}

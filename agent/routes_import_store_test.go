package agent

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/agent/config"
	"imagestore/blobstore"
	"imagestore/internal/testcert"
	"imagestore/layer"
	"imagestore/qcow2"
	"imagestore/transfer/registry/registrytest"
)

// commitChain records qcow2 files (base first) as a chain in st, the way
// an import-backup would, and returns the images, top last.
func commitChain(t *testing.T, st *blobstore.Store, name string, files ...string) []blobstore.Image {
	t.Helper()
	ls, err := layer.New(layer.Options{Blobs: st})
	if err != nil {
		t.Fatal(err)
	}
	var out []blobstore.Image
	for i, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := fh.Stat()
		im, err := qcow2.Open(fh, fi.Size())
		if err != nil {
			t.Fatal(err)
		}
		var parent *blobstore.Image
		if i > 0 {
			parent = &out[i-1]
		}
		img, err := ls.Commit(context.Background(), layer.Spec{
			Record:  layer.Record{Ref: blobstore.Ref{Name: name, ID: fmt.Sprintf("%032x", i+1)}, Parent: parent, Format: "qcow2"},
			Content: layer.Normalize(im, parent, qcow2.WriteOptions{}),
		})
		fh.Close()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, img)
	}
	return out
}

// TestImportFromStore: "create template from volume backup" (PROTOCOL
// note B1): zstore://<bs-host>/<name>/<id> with cacert pulls the chain
// from that store's registry, verifying cacert for the name
// store.zstack.org while dialling an IP, and stores one standalone image
// under the request's name; a wrong CA or name is refused; once this
// store holds the chain (or bs-host is this store) it is read locally.
func TestImportFromStore(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io")
	e := newRestoreEnv(t, func(c *config.Config) { c.ServerName = "store.zstack.org" })
	files := r7makeChain(t, e.dir, 4<<20)
	peerCert := testcert.SelfSigned(t, "store.zstack.org")
	kp, err := tls.X509KeyPair(peerCert.CertPEM(), peerCert.KeyPEM())
	if err != nil {
		t.Fatal(err)
	}
	peer := registrytest.Start(t, registrytest.Options{Cert: &kp})
	chain := commitChain(t, peer.Store, "5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60", files...)
	top := chain[2]
	src := "zstore://" + peer.Addr() + "/" + top.Name + "/" + top.ID
	const tmpl = "1b2c3d4e5f60718293a4b5c6d7e8f9a0"
	req := func(imgurl, ca, name string) map[string]any {
		return map[string]any{"imgurl": imgurl, "name": name, "arch": "amd64", "desc": "from backup", "tag": "20251206-213000",
			"user": "36c27e8ff05c4780bf6d2fa65700f22e", "uuid": "a6f5d0d6c5e54b6f8f0b8d9f5c1e2a3b", "imageuuid": name, "cacert": ca, "concurrency": 4}
	}

	// The wrong CA, and a certificate for another name, are refused.
	other := testcert.SelfSigned(t, "store.zstack.org")
	e.fails(t, "/imagestore/import-sync", req(src, string(other.CertPEM()), tmpl), "certificate")
	wrongName := testcert.SelfSigned(t, "other.example")
	kp2, _ := tls.X509KeyPair(wrongName.CertPEM(), wrongName.KeyPEM())
	peer2 := registrytest.Start(t, registrytest.Options{Cert: &kp2})
	commitChain(t, peer2.Store, top.Name, files...)
	e.fails(t, "/imagestore/import-sync", req("zstore://"+peer2.Addr()+"/"+top.Name+"/"+top.ID, peer2.CA(), tmpl), "certificate")
	if _, err := e.store.GetImage(context.Background(), top.Ref); err == nil {
		t.Fatal("a refused pull recorded the chain")
	}

	rep := e.ok(t, "/imagestore/import-sync", req(src, peer.CA(), tmpl))
	if rep["name"] != tmpl || rep["id"] != tmpl || rep["format"] != "qcow2" || r7num(rep["virtualsize"]) != 4<<20 {
		t.Fatalf("reply %v", rep)
	}
	img, err := e.a.images.Lookup(context.Background(), "installPath", rep["installPath"].(string))
	if err != nil || img.Parent != "" || img.Arch != "amd64" || img.Desc != "from backup" {
		t.Fatalf("template record %+v %v: want a standalone image", img, err)
	}
	flat := filepath.Join(e.dir, "flat.raw")
	r7flattenTo(t, e, rep["installPath"].(string), flat)
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", flat, files[2])

	// Held here now: read locally, even with the peer gone; and a
	// zstore:// URL naming this store reads locally.
	peer.HTTP.Close()
	const tmpl2 = "2b2c3d4e5f60718293a4b5c6d7e8f9a0"
	rep = e.ok(t, "/imagestore/import-sync", req(src, peer.CA(), tmpl2))
	if rep["name"] != tmpl2 {
		t.Fatalf("local reply %v", rep)
	}
	e.fails(t, "/imagestore/import-sync", req("zstore://127.0.0.1/"+top.Name+"/"+strings.Repeat("e", 32), "", "3b2c3d4e5f60718293a4b5c6d7e8f9a0"), "this store has no image")
	for _, bad := range []string{"zstore://h/only-name", "zstore:///n/i", "zstore://h/n/i/x"} {
		e.fails(t, "/imagestore/import-sync", req(bad, "", "4b2c3d4e5f60718293a4b5c6d7e8f9a0"), "want zstore://<bs-host>/<name>/<id>")
	}
}

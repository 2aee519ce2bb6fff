package agent

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/internal/testcert"
	"imagestore/transfer/ftp/ftptest"
	"imagestore/transfer/registry/registrytest"
)

// Setups and checks of the golden fixtures of the data paths: imports
// from another store, FTP, ISO media, NBD backups and upload:// sessions.

// goldenPeerStore: another store whose registry holds a backup chain,
// with ZStack's kind of certificate (self-signed, only name
// store.zstack.org), dialled by IP.
func goldenPeerStore(t *testing.T, e *goldenEnv) map[string]string {
	r7requireTools(t, "qemu-img", "qemu-io")
	pair := testcert.SelfSigned(t, "store.zstack.org")
	kp, err := tls.X509KeyPair(pair.CertPEM(), pair.KeyPEM())
	if err != nil {
		t.Fatal(err)
	}
	peer := registrytest.Start(t, registrytest.Options{Cert: &kp})
	files := r7makeChain(t, t.TempDir(), 4<<20)
	top := commitChain(t, peer.Store, "5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60", files...)[2]
	ca, _ := json.Marshal(peer.CA())
	return map[string]string{"url": "zstore://" + peer.Addr() + "/" + top.Name + "/" + top.ID, "cacert": string(ca)}
}

// goldenFTPImage: a raw disk on a real FTP server.
func goldenFTPImage(t *testing.T, e *goldenEnv) map[string]string {
	srv := ftptest.Start(t)
	if err := os.WriteFile(filepath.Join(srv.Dir, "centos7.raw"), []byte(strings.Repeat("disk", 1<<18)), 0o644); err != nil {
		t.Fatal(err)
	}
	return map[string]string{"url": srv.URL("centos7.raw")}
}

// goldenHTTPISO: an ISO-9660 image on an HTTP server.
func goldenHTTPISO(t *testing.T, e *goldenEnv) map[string]string {
	r7requireTools(t, "genisoimage")
	dir := t.TempDir()
	media := filepath.Join(dir, "media")
	if err := os.Mkdir(media, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(media, "README"), []byte("install media"), 0o644); err != nil {
		t.Fatal(err)
	}
	iso := filepath.Join(dir, "centos7.iso")
	r7run(t, "genisoimage", "-quiet", "-o", iso, media)
	srv := newImageServer(t)
	return map[string]string{"url": srv.add(t, "centos7.iso", iso)}
}

// goldenNBDWritten: a single-volume NBD backup as a KVM host leaves it:
// exportnbdimage into an upload dir, data written over NBD; the import
// names <uploadDir>/<basename(imagePaths[0])> and the group.
func goldenNBDWritten(t *testing.T, e *goldenEnv) map[string]string {
	r7requireTools(t, "qemu-img", "qemu-io", "qemu-nbd")
	dir, err := e.a.uploads.Alloc(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	r := e.do(t, http.MethodPost, "/imagestore/exportnbdimage-sync/", `{"workspace":"`+dir.Path+`","sizes":[4194304]}`, nil)
	if r.body["success"] != true {
		t.Fatalf("exportnbdimage: %s", r.raw)
	}
	path := r.body["imagePaths"].([]any)[0].(string)
	port := int(r.body["ports"].([]any)[0].(float64))
	r7run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 65536", "-c", "write -z 65536 65536", fmt.Sprintf("nbd://127.0.0.1:%d", port))
	return map[string]string{"path": filepath.Join(dir.Path, filepath.Base(path)), "desc": r.body["nbdDescription"].(string)}
}

// goldenUploading: an upload:// import of image 1b2c…f9a0 that has
// received the first MiB of 3 (the size announced by Content-Range).
func goldenUploading(t *testing.T, e *goldenEnv) map[string]string {
	cb := newCBSink(t)
	body := `{"imgurl":"upload://1b2c3d4e5f60718293a4b5c6d7e8f9a0/centos7.qcow2","name":"1b2c3d4e5f60718293a4b5c6d7e8f9a0","arch":"amd64",` +
		`"desc":"centos7","imageuuid":"1b2c3d4e5f60718293a4b5c6d7e8f9a0","concurrency":4}`
	if r := e.do(t, http.MethodPost, "/imagestore/import/", body, map[string]string{"taskuuid": "upl1", "callbackurl": cb.srv.URL}); r.code != 200 {
		t.Fatalf("import: %s", r.raw)
	}
	u, err := url.Parse(cb.wait(t, "upl1")["blobsum"].(string))
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPut, e.srv.URL+u.Path, strings.NewReader(strings.Repeat("x", 1<<20)))
	req.Header.Set("Content-Range", fmt.Sprintf("bytes 0-%d/%d", 1<<20-1, 3<<20))
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("first chunk: %d", res.StatusCode)
	}
	return nil
}

// goldenUploadSession: the first callback of an upload:// import carries
// the absolute upload URL, built from the request's Host, and size 0.
func goldenUploadSession(t *testing.T, reply map[string]json.RawMessage) {
	var r struct {
		Name, ID, Blobsum string
		Size, VirtualSize int64
	}
	raw, _ := json.Marshal(reply)
	_ = json.Unmarshal(raw, &r)
	u, err := url.Parse(r.Blobsum)
	if err != nil || u.Scheme != "http" || !strings.HasPrefix(u.Host, "127.0.0.1:") || !strings.HasPrefix(u.Path, "/imagestore/upload/1b2c3d4e5f60718293a4b5c6d7e8f9a0/") ||
		r.Name != "1b2c3d4e5f60718293a4b5c6d7e8f9a0" || r.ID != "" || r.Size != 0 || r.VirtualSize != 0 {
		t.Errorf("upload session reply %+v (%v)", r, err)
	}
}

// goldenUploadingProgress: actualSize is the announced size, downloadSize
// what arrived (the resume offset).
func goldenUploadingProgress(t *testing.T, reply map[string]json.RawMessage) {
	var r struct {
		Completed                                bool
		ActualSize, DownloadSize, LastOpTime, Sz int64
		Progress                                 int
	}
	raw, _ := json.Marshal(reply)
	_ = json.Unmarshal(raw, &r)
	if r.Completed || r.ActualSize != 3<<20 || r.DownloadSize != 1<<20 || r.Progress != 33 || time.Since(time.UnixMilli(r.LastOpTime)) > time.Hour {
		t.Errorf("progress of a third of an upload: %+v", r)
	}
}

package agent

import (
	"archive/tar"
	"bytes"
	"crypto/md5"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"
)

// A package downloads over plain HTTP without the bearer token, with
// Range, and its md5 is that of the served bytes; its qcow2 entry is the
// image's export; delete-image-package revokes it.
func TestPackDownload(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io")
	e := &goldenEnv{htEnv: newHTEnv(t, nil)}
	e.root = e.a.root
	ip := goldenBackup(t, e)
	r := e.do(t, http.MethodPost, "/imagestore/pack-exported-images-sync/",
		`{"installPathList":["`+ip+`"],"imageExportFormat":"raw","configFileContent":"{\"a\":1}","configFileFormat":"json","packageName":"vm","packageFormat":"tar"}`, nil)
	u, _ := r.body["packageUrl"].(string)
	if r.body["success"] != true || u == "" {
		t.Fatalf("pack: %s", r.raw)
	}
	get := func(rng string) (int, []byte) {
		req, _ := http.NewRequest(http.MethodGet, e.srv.URL+u, nil)
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		res, err := http.DefaultClient.Do(req) // no Authorization header
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, b
	}
	code, body := get("")
	if code != http.StatusOK || fmt.Sprintf("%x", md5.Sum(body)) != r.body["md5Sum"] || float64(len(body)) != r.body["size"] {
		t.Fatalf("GET %s: %d, %d bytes md5 %x; reply %s", u, code, len(body), md5.Sum(body), r.raw)
	}
	if code, part := get(fmt.Sprintf("bytes=%d-", len(body)/3)); code != http.StatusPartialContent || !bytes.Equal(part, body[len(body)/3:]) {
		t.Fatalf("resumed GET: %d, %d bytes", code, len(part))
	}
	tr := tar.NewReader(bytes.NewReader(body))
	h, err := tr.Next()
	if err != nil || h.Name != "5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60.raw" {
		t.Fatalf("first entry %+v: %v", h, err)
	}
	raw := filepath.Join(t.TempDir(), "disk.raw")
	data, _ := io.ReadAll(tr)
	if err := os.WriteFile(raw, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out := r7run(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", "-c", "read -P 0 64k 4032k", raw)
	if bytes.Contains([]byte(out), []byte("fail")) {
		t.Fatalf("packed image: %s", out)
	}
	if h, err := tr.Next(); err != nil || h.Name != "vm.json" {
		t.Fatalf("second entry %+v: %v", h, err)
	}
	if d := e.do(t, http.MethodPost, "/imagestore/delete-image-package-sync", `{"exportUrl":"`+u+`"}`, nil); d.body["success"] != true {
		t.Fatalf("delete-image-package: %s", d.raw)
	}
	if code, _ := get(""); code != http.StatusNotFound {
		t.Fatalf("GET after delete: %d", code)
	}
}

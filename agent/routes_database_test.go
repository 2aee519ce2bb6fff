package agent

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/md5"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestDatabaseBackupFlow(t *testing.T) {
	t.Parallel()
	e := newRestoreEnv(t, nil)
	up := e.uploadDir(t)
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	for i := 0; i < 2000; i++ {
		_, _ = io.WriteString(zw, "INSERT INTO t VALUES ("+r7itoa(i)+", 'row');\n")
	}
	_ = zw.Close()
	dump := buf.Bytes()
	path := filepath.Join(up, "zstack-db-backup.gz")
	if err := os.WriteFile(path, dump, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := md5.Sum(dump)
	desc := func(md5hex string) string {
		return r7jsonString(map[string]any{"name": "db", "description": "nightly", "version": "4.8.0", "type": "mysql", "createdTime": 1700000000000, "md5": md5hex})
	}

	// Corrupt (md5 mismatch), missing or malformed desc: refused, nothing stored.
	wrong := md5.Sum([]byte("other"))
	e.fails(t, "/imagestore/import-backup-sync", map[string]any{"imgurl": path, "name": "zsbak", "desc": desc(hex.EncodeToString(wrong[:]))}, "is corrupt: md5")
	e.fails(t, "/imagestore/import-backup-sync", map[string]any{"imgurl": path, "name": "zsbak", "desc": `{"md5":""}`}, "not an MD5")
	e.fails(t, "/imagestore/import-backup-sync", map[string]any{"imgurl": path, "name": "zsbak", "desc": desc("xyz")}, "not an MD5")
	if imgs, _ := e.store.ListImages(context.Background(), "zsbak"); len(imgs) != 0 {
		t.Fatalf("refused imports stored %v", imgs)
	}

	rep := e.ok(t, "/imagestore/import-backup-sync", map[string]any{"imgurl": "file://" + path, "name": "zsbak", "desc": desc(hex.EncodeToString(sum[:]))})
	if !strings.HasPrefix(rep["installPath"].(string), "zstore://zsbak/") || rep["format"] != "gzip" || r7num(rep["size"]) != int64(len(dump)) {
		t.Fatalf("import reply %v", rep)
	}

	list := e.ok(t, "/imagestore/images/", map[string]any{"name": "zsbak"})
	infos, _ := list["infos"].([]any)
	if len(infos) != 1 {
		t.Fatalf("infos %v", list)
	}
	info := infos[0].(map[string]any)
	for _, k := range []string{"id", "created", "size", "virtualsize", "name", "blobsum", "desc"} {
		if _, ok := info[k]; !ok {
			t.Fatalf("info lacks %s: %v", k, info)
		}
	}
	if info["name"] != "zsbak" || info["id"] != rep["id"] {
		t.Fatalf("info %v", info)
	}
	if l := e.ok(t, "/imagestore/images/", map[string]any{"name": "nothing"}); len(l["infos"].([]any)) != 0 {
		t.Fatalf("unknown name listed %v", l)
	}

	exp := e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": rep["installPath"]})
	u, _ := exp["databaseBackupUrl"].(string)
	if !strings.HasPrefix(u, "/export/image-") || u != exp["imgUrl"] {
		t.Fatalf("export reply %v", exp)
	}
	req, _ := http.NewRequest(http.MethodGet, e.srv.URL+u, nil)
	req.Header.Set("Range", "bytes=10-99")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusPartialContent || !bytes.Equal(got, dump[10:100]) {
		t.Fatalf("ranged download: %d, %d bytes", res.StatusCode, len(got))
	}
	del := e.ok(t, "/imagestore/delexp-sync", map[string]any{"imgUrl": u})
	if r7num(del["deleted"]) != 1 {
		t.Fatalf("delexp %v", del)
	}
	res, err = http.Get(e.srv.URL + u)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusNotFound {
		t.Fatalf("deleted export still served: %d", res.StatusCode)
	}
	// Non-zsbak exports carry no databaseBackupUrl; other imports are untouched by the wrapper.
	if strings.Contains(r7jsonString(e.fails(t, "/imagestore/import-backup-sync", map[string]any{"imgurl": path + ".nope", "name": "vol"}, "no such file")), "md5") {
		t.Fatal("wrapper interfered with a normal import")
	}
}

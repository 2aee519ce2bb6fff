package agent

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/agent/exports"
	"imagestore/blobstore"
	"imagestore/internal/testwait"
	"imagestore/layer"
)

// postJSON is e.call for goroutines: errors are returned in the map.
func postJSON(e *restoreEnv, path string, body any) map[string]any {
	j, _ := json.Marshal(body)
	res, err := http.Post(e.srv.URL+path, "application/json", bytes.NewReader(j))
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	var v map[string]any
	if err := json.Unmarshal(raw, &v); err != nil {
		return map[string]any{"error": fmt.Sprintf("%d %s", res.StatusCode, raw)}
	}
	return v
}

// TestExportDoesNotBlockOthers: while one export is being written (held
// in the flatten here), delexp and other exports complete, and a second
// export of the same image and format waits and gets the same URL.
func TestExportDoesNotBlockOthers(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io")
	e := newRestoreEnv(t, nil)
	files := r7makeChain(t, e.dir, 4<<20)
	imgs := e.importChain(t, "vol", files...)
	slow, other := imgs[2].InstallPath(), imgs[0].InstallPath()

	entered := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	hook := func(ip string) {
		if ip == slow {
			once.Do(func() { close(entered) })
			<-release
		}
	}
	// An export service like the agent's, with the hook (set before any
	// request reaches it).
	exps, err := exports.New(exports.Options{Root: filepath.Join(e.a.root, "exports"), Layers: e.a.layers, BeforeWrite: hook})
	if err != nil {
		t.Fatal(err)
	}
	e.a.exports = exps
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unblock)

	first, second := make(chan map[string]any, 1), make(chan map[string]any, 1)
	go func() {
		first <- postJSON(e, "/imagestore/export-sync", map[string]any{"installPath": slow, "extFmt": "raw"})
	}()
	select {
	case <-entered:
	case <-time.After(testwait.Deadline):
		t.Fatal("export did not start")
	}
	go func() {
		second <- postJSON(e, "/imagestore/export-sync", map[string]any{"installPath": slow, "extFmt": "raw"})
	}()

	// Others go ahead while the slow export is held.
	done := make(chan map[string]any, 2)
	go func() {
		done <- postJSON(e, "/imagestore/delexp-sync", map[string]any{"installPath": other})
		done <- postJSON(e, "/imagestore/export-sync", map[string]any{"installPath": other})
	}()
	for i := 0; i < 2; i++ {
		select {
		case r := <-done:
			if r["success"] != true {
				t.Fatalf("call during a running export: %v", r)
			}
		case <-time.After(testwait.Deadline):
			t.Fatal("delexp/export waited for an unrelated export's flatten")
		}
	}
	select {
	case r := <-second:
		t.Fatalf("second export of the same image finished before the first: %v", r)
	default:
	}
	unblock()
	var reps [2]map[string]any
	for i, ch := range []chan map[string]any{first, second} {
		select {
		case reps[i] = <-ch:
		case <-time.After(testwait.Deadline):
			t.Fatal("export did not finish")
		}
	}
	if reps[0]["success"] != true || reps[0]["imgUrl"] == "" || reps[0]["imgUrl"] != reps[1]["imgUrl"] {
		t.Fatalf("same export twice: %v / %v", reps[0], reps[1])
	}
}

// TestExportSweepsInterrupted: a token dir without export.json (a crash
// mid-export) is removed by the next export/delexp or a sweep; a
// complete export stays.
func TestExportSweepsInterrupted(t *testing.T) {
	t.Parallel()
	e := newRestoreEnv(t, nil)
	img, err := e.a.layers.Commit(context.Background(), layer.Spec{
		Record: layer.Record{Ref: blobstore.Ref{Name: "dump", ID: "1"}, Format: "gzip"},
		Reader: strings.NewReader("opaque dump"), Size: 11,
	})
	if err != nil {
		t.Fatal(err)
	}
	rep := e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": img.InstallPath()})
	partial := func() string {
		dir := filepath.Join(filepath.Join(e.a.root, "exports"), randomHex(16))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "vol-1.raw.tmp"), []byte("half"), 0o644); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	p1 := partial()
	e.a.exports.Sweep()
	if _, err := os.Stat(p1); !os.IsNotExist(err) {
		t.Fatalf("interrupted export kept by Sweep: %v", err)
	}
	p2 := partial()
	e.ok(t, "/imagestore/delexp-sync", map[string]any{"installPath": "zstore://other/1"})
	if _, err := os.Stat(p2); !os.IsNotExist(err) {
		t.Fatalf("interrupted export kept by delexp: %v", err)
	}
	ents, err := os.ReadDir(filepath.Join(e.a.root, "exports"))
	if err != nil || len(ents) != 1 {
		t.Fatalf("exports dir: %v %v", ents, err)
	}
	if again := e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": img.InstallPath()}); again["imgUrl"] != rep["imgUrl"] {
		t.Fatalf("complete export not reused: %v vs %v", again["imgUrl"], rep["imgUrl"])
	}
}

// TestExportURLIsCapability: on an agent with a token, the export URL
// itself is the credential: it downloads without the bearer token (as
// qemu-img or curl would), a wrong or short token is 404, the protocol
// still wants the token, and delexp revokes the URL.
func TestExportURLIsCapability(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io")
	e := newRestoreEnv(t, func(c *config.Config) { c.Token = "s3cret-token" })
	files := r7makeChain(t, e.dir, 4<<20)
	top := e.importChain(t, "vol", files...)[2]
	rep := e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": top.InstallPath(), "extFmt": "raw"})
	rel := rep["imgUrl"].(string)
	imgURL := e.srv.URL + rel
	get := func(url string) (int, []byte) {
		t.Helper()
		res, err := http.Get(url) // no Authorization header
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, err := io.ReadAll(res.Body)
		if err != nil {
			t.Fatal(err)
		}
		return res.StatusCode, b
	}
	code, body := get(imgURL)
	if code != http.StatusOK || fmt.Sprintf("%x", md5.Sum(body)) != rep["md5Sum"] {
		t.Fatalf("GET %s without the bearer token: %d, %d bytes (md5 %x, reply %v)", imgURL, code, len(body), md5.Sum(body), rep["md5Sum"])
	}
	raw := filepath.Join(e.dir, "got.raw")
	if err := os.WriteFile(raw, body, 0o600); err != nil {
		t.Fatal(err)
	}
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, files[2])

	// The URL the management node publishes: the URL-encoded image name in
	// front of the last segment. It serves the same bytes, with Range, so a
	// cut download resumes where it stopped.
	renamed := e.srv.URL + "/export/" + url.PathEscape("centos 7/x86") + "-" + path.Base(rel)
	if code, b := get(renamed); code != http.StatusOK || !bytes.Equal(b, body) {
		t.Fatalf("GET %s: %d, %d bytes", renamed, code, len(b))
	}
	for _, u := range []string{renamed, imgURL} {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", len(body)/3))
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusPartialContent || !bytes.Equal(b, body[len(body)/3:]) {
			t.Fatalf("resumed GET %s: %d, %d bytes", u, res.StatusCode, len(b))
		}
	}

	if fi, err := os.Stat(filepath.Join(e.a.root, "exports")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("export root %v %v: want mode 0700, tokens are credentials", fi.Mode(), err)
	}
	token := strings.TrimSuffix(strings.TrimPrefix(rel, "/export/image-"), ".raw")
	for _, bad := range []string{
		e.srv.URL + "/export/image-" + strings.Repeat("0", len(token)) + ".raw", // another token
		e.srv.URL + "/export/image-" + token[:len(token)-2] + ".raw",            // a prefix of it
		e.srv.URL + "/export/image-" + token + ".qcow2",                         // another file
	} {
		if code, _ := get(bad); code != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", bad, code)
		}
	}
	if code, _ := get(e.srv.URL + "/metrics"); code != http.StatusUnauthorized {
		t.Errorf("/metrics without the token: %d, want 401", code)
	}
	res, err := http.Post(e.srv.URL+"/imagestore/echo/", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusUnauthorized {
		t.Errorf("protocol call without the token: %d, want 401", res.StatusCode)
	}

	e.ok(t, "/imagestore/delexp-sync", map[string]any{"installPath": top.InstallPath(), "extFmt": "raw"})
	if code, _ := get(imgURL); code != http.StatusNotFound {
		t.Fatalf("GET after delexp: %d, want 404", code)
	}
}

// With exportExpiry an export's URL stops working once it is older, the
// housekeeping removes it, younger exports stay, and exporting the image
// again gives a new URL.
func TestExportExpiry(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io")
	e := newRestoreEnv(t, func(c *config.Config) { c.ExportExpiry = time.Hour })
	files := r7makeChain(t, e.dir, 4<<20)
	imgs := e.importChain(t, "vol", files...)
	status := func(url string) int {
		t.Helper()
		res, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	old := e.srv.URL + e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": imgs[2].InstallPath(), "extFmt": "raw"})["imgUrl"].(string)
	young := e.srv.URL + e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": imgs[0].InstallPath(), "extFmt": "raw"})["imgUrl"].(string)
	if status(old) != 200 || status(young) != 200 {
		t.Fatal("fresh exports are not served")
	}
	// age makes the export of url as old as d; it returns its export.json.
	age := func(url string, d time.Duration) string {
		t.Helper()
		token := strings.TrimSuffix(strings.TrimPrefix(url, e.srv.URL+"/export/image-"), ".raw")
		metaPath := filepath.Join(filepath.Join(e.a.root, "exports"), token, "export.json")
		b, err := os.ReadFile(metaPath)
		if err != nil {
			t.Fatal(err)
		}
		var m exports.Meta
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		m.Created = time.Now().Add(-d)
		if b, err = json.Marshal(m); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(metaPath, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return metaPath
	}
	// Exporting again while the export lives hands out the same URL and
	// starts its life again.
	age(young, 50*time.Minute)
	if again := e.srv.URL + e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": imgs[0].InstallPath(), "extFmt": "raw"})["imgUrl"].(string); again != young {
		t.Fatalf("a live export was not reused: %v, first %v", again, young)
	}
	metaPath := age(old, 2*time.Hour)
	if got := status(old); got != 404 {
		t.Fatalf("GET of an expired export: %d, want 404", got)
	}
	e.a.housekeeping()
	if _, err := os.Stat(filepath.Dir(metaPath)); !os.IsNotExist(err) {
		t.Fatalf("expired export still on disk after housekeeping: %v", err)
	}
	if status(young) != 200 {
		t.Fatal("housekeeping removed an export that had not expired")
	}
	again := e.srv.URL + e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": imgs[2].InstallPath(), "extFmt": "raw"})["imgUrl"].(string)
	if again == old || status(again) != 200 {
		t.Fatalf("export after expiry: %s (old %s)", again, old)
	}

	c := config.Default()
	c.ExportExpiry = -time.Second
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "exportExpiry") {
		t.Fatalf("Validate of a negative exportExpiry = %v", err)
	}
}

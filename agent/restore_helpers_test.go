package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/blobstore"
	"imagestore/blobstore/blobstoretest"
)

// restoreEnv is an agent over a fresh store, served by httptest.
type restoreEnv struct {
	a     *Agent
	store *blobstore.Store
	srv   *httptest.Server
	dir   string // scratch dir for test files
}

// token is the agent's bearer token ("" when it has none).
func (e *restoreEnv) token() string { return string(e.a.cfg.Token) }

func r7requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: %v", tool, err)
		}
	}
}

func newRestoreEnv(t *testing.T, mod func(*config.Config)) *restoreEnv {
	t.Helper()
	return newRestoreEnvPaths(t, mod, true)
}

// newRestoreEnvPaths is newRestoreEnv; without paths the store's BlobPath
// answers blobstore.ErrNoLocalPath, as a store on S3 does.
func newRestoreEnvPaths(t *testing.T, mod func(*config.Config), paths bool) *restoreEnv {
	t.Helper()
	root := t.TempDir()
	opts := blobstore.Options{Root: root, CommitGrace: time.Nanosecond}
	if !paths {
		local, err := blobstore.NewLocal(blobstore.LocalOptions{Root: root})
		if err != nil {
			t.Fatal(err)
		}
		opts.Backend = blobstoretest.NoPaths(local)
	}
	store, err := blobstore.Open(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t)
	cfg.Root = root
	// A random slice of ports below the default ephemeral range (32768+),
	// so outgoing connections of parallel tests do not take them; the NBD
	// manager skips busy ones anyway.
	base := 12000 + rand.IntN(20000)
	cfg.NBD.PortRange = r7itoa(base) + "-" + r7itoa(base+200)
	cfg.NBD.Bind = "127.0.0.1"
	cfg.MaxBodyBytes = 1 << 30
	if mod != nil {
		mod(&cfg)
	}
	a, err := New(cfg, store, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(func() {
		srv.Close()
		_ = a.Close()
		_ = store.Close()
	})
	return &restoreEnv{a: a, store: store, srv: srv, dir: t.TempDir()}
}

func r7itoa(n int) string { return fmt.Sprint(n) }

func r7jsonString(v any) string { b, _ := json.Marshal(v); return string(b) }

// call POSTs body to path (use the -sync twin of async routes) and returns
// the decoded reply.
func (e *restoreEnv) call(t *testing.T, path string, body any) map[string]any {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(http.MethodPost, e.srv.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if tok := e.token(); tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	var v map[string]any
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatalf("POST %s: %d %s", path, res.StatusCode, raw)
	}
	return v
}

// ok calls path and requires success.
func (e *restoreEnv) ok(t *testing.T, path string, body any) map[string]any {
	t.Helper()
	v := e.call(t, path, body)
	if v["success"] != true {
		t.Fatalf("%s %s: %v", path, r7jsonString(body), v)
	}
	return v
}

// fails calls path and requires an error containing want.
func (e *restoreEnv) fails(t *testing.T, path string, body any, want string) map[string]any {
	t.Helper()
	v := e.call(t, path, body)
	msg, _ := v["error"].(string)
	if v["success"] != false || !strings.Contains(msg, want) {
		t.Fatalf("%s %s: want error containing %q, got %v", path, r7jsonString(body), want, v)
	}
	return v
}

func (e *restoreEnv) uploadDir(t *testing.T) string {
	t.Helper()
	return e.ok(t, "/imagestore/allocuploaddir/", map[string]any{})["uploadDir"].(string)
}

func r7run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qemuWrite writes pattern p at off (len bytes) into a qcow2 with qemu-io.
func r7qemuWrite(t *testing.T, path string, p byte, off, n int64) {
	t.Helper()
	r7run(t, "qemu-io", "-f", "qcow2", "-c", "write -P "+r7itoa(int(p))+" "+r7itoa(int(off))+" "+r7itoa(int(n)), path)
}

// importChain stores base and its deltas (qemu-img made qcow2 files)
// through import-backup, each delta on top of the previous image, and
// returns the images, top last.
func (e *restoreEnv) importChain(t *testing.T, name string, files ...string) []blobstore.Image {
	t.Helper()
	up := e.uploadDir(t)
	var out []blobstore.Image
	for i, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(up, filepath.Base(f))
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			t.Fatal(err)
		}
		req := map[string]any{"imgurl": dst, "name": name}
		if i > 0 {
			req["parent"] = out[i-1].InstallPath()
		}
		rep := e.ok(t, "/imagestore/import-backup-sync", req)
		img, err := e.a.images.Lookup(context.Background(), "installPath", rep["installPath"].(string))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, img)
	}
	return out
}

func r7randHex() string { return randomHex(8) }

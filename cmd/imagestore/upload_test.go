package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/qcow2/qemutest"
	"imagestore/transfer/faultproxy"
)

// callbacks plays the management node's callback receiver.
type callbacks struct {
	srv *httptest.Server
	mu  sync.Mutex
	got map[string][]byte
}

func newCallbacks(t *testing.T) *callbacks {
	c := &callbacks{got: map[string][]byte{}}
	c.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		c.mu.Lock()
		c.got[r.Header.Get("taskuuid")] = b
		c.mu.Unlock()
	}))
	t.Cleanup(c.srv.Close)
	return c
}

func (c *callbacks) wait(t *testing.T, id string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		b, ok := c.got[id]
		c.mu.Unlock()
		if ok {
			var v map[string]any
			if err := json.Unmarshal(b, &v); err != nil {
				t.Fatalf("callback %s: %v: %s", id, err, b)
			}
			return v
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no callback for %s", id)
	return nil
}

// TestUpload feeds the agent's upload:// import through a proxy that cuts
// the connection several times; the image stored equals the file.
func TestUpload(t *testing.T) {
	s := startStore(t, "tok")
	cb := newCallbacks(t)
	files := chainFixture(t)
	src := files[0]

	p := faultproxy.New(t, strings.TrimPrefix(s.agentURL, "http://"))
	p.CutAfter(700 << 10)
	p.CutNext(3)
	const task = "upload-task-1"
	s.post(t, "/imagestore/import/", map[string]any{"imgurl": "upload://host/base.qcow2", "name": "uploaded"},
		map[string]string{"taskuuid": task, "callbackurl": cb.srv.URL})
	var res uploadResult
	cliJSON(t, &res, "-agent-url", "http://"+p.Addr(), "-token", "tok", "-quiet", "upload", "-json", "-task", task, src)
	if res.State != "succeeded" || !strings.HasPrefix(res.InstallPath, "zstore://uploaded/") {
		t.Fatalf("upload: %+v", res)
	}
	if p.Cuts() < 1 {
		t.Fatal("the proxy never cut the upload")
	}
	reply := cb.wait(t, task)
	if reply["success"] != true {
		t.Fatalf("import callback: %v", reply)
	}
	ref := reply["name"].(string) + ":" + reply["id"].(string)
	dst := filepath.Join(t.TempDir(), "back.qcow2")
	cliOK(t, "-url", s.url, "-token", "tok", "-quiet", "pull", "-installpath", dst, ref)
	qemutest.Compare(t, dst, src)

	// No import waiting for the task: a clear error, quickly.
	_, errs, code := cli(t, "-agent-url", s.agentURL, "-token", "tok", "-quiet", "upload", "-wait-start", "1s", "-task", "nope", src)
	if code != 1 || !strings.Contains(errs, "no upload import waiting") {
		t.Fatalf("upload without an import: exit %d: %s", code, errs)
	}
	_, errs, code = cli(t, "-agent-url", s.agentURL, "-token", "bad", "-quiet", "upload", "-task", "nope", src)
	if code != 1 || !strings.Contains(errs, "authentication failed") {
		t.Fatalf("upload with a wrong token: exit %d: %s", code, errs)
	}
}

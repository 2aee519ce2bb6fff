package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/blobstore"
	"imagestore/internal/testwait"
)

// mnImportReply mirrors the management node's ImageStoreImportRsp field
// types: a string where it expects long fails the decode.
type mnImportReply struct {
	Success     bool   `json:"success"`
	Error       string `json:"error"`
	Name        string `json:"name"`
	ID          string `json:"id"`
	Blobsum     string `json:"blobsum"`
	Size        int64  `json:"size"`
	VirtualSize int64  `json:"virtualsize"`
	TotalSize   *int64 `json:"totalSize"`
	FreeSize    *int64 `json:"freeSize"`
	Format      string `json:"format"`
}

// mnProgressReply mirrors the management node's progress reply types.
type mnProgressReply struct {
	Success      bool   `json:"success"`
	Error        string `json:"error"`
	Completed    bool   `json:"completed"`
	Progress     int32  `json:"progress"`
	Size         int64  `json:"size"`
	ActualSize   int64  `json:"actualSize"`
	DownloadSize int64  `json:"downloadSize"`
	InstallPath  string `json:"installPath"`
	Format       string `json:"format"`
	LastOpTime   int64  `json:"lastOpTime"`
}

// callbackSink is the management node's callback endpoint: it keeps each
// taskuuid's body.
type callbackSink struct {
	*httptest.Server
	mu   sync.Mutex
	got  map[string][]byte
	hits map[string]int
}

func newCallbackSink(t *testing.T) *callbackSink {
	c := &callbackSink{got: map[string][]byte{}, hits: map[string]int{}}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		c.mu.Lock()
		c.got[r.Header.Get("taskuuid")] = b
		c.hits[r.Header.Get("taskuuid")]++
		c.mu.Unlock()
	}))
	t.Cleanup(c.Close)
	return c
}

func (c *callbackSink) wait(t *testing.T, task string) []byte {
	t.Helper()
	testwait.For(t, "callback "+task, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.got[task] != nil
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.got[task]
}

// TestImportUploadSession follows PROTOCOL §2.9 and G8: the management
// node's upload:// import is answered at once with the upload URL (built
// from the request's Host) in blobsum; the bytes arrive at that URL without
// a bearer token, in chunks with offsets (a cut one resumes from the offset
// a 409 names), and /imagestore/progress/ reports actualSize as soon as it
// is known, downloadSize as the resume offset, and at the end the install
// path and the true format. A single raw PUT of an ISO is stored as "iso".
func TestImportUploadSession(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "genisoimage")
	e := newRestoreEnv(t, func(c *config.Config) { c.Token = "s3cret-token" })
	cb := newCallbackSink(t)
	src := filepath.Join(e.dir, "src.raw")
	r7writePattern(t, src, 3<<20, 4)
	qc := filepath.Join(e.dir, "src.qcow2")
	r7run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, qc)
	data, _ := os.ReadFile(qc)

	const imageUUID = "1b2c3d4e5f60718293a4b5c6d7e8f9a0"
	startImport := func(task, imageUUID, file string) mnImportReply {
		t.Helper()
		body := fmt.Sprintf(`{"imgurl":"upload://%s/%s","name":"%s","arch":"amd64","desc":"centos7","tag":"20251206-213000",`+
			`"user":"36c27e8ff05c4780bf6d2fa65700f22e","uuid":"a6f5d0d6c5e54b6f8f0b8d9f5c1e2a3b","imageuuid":"%s","concurrency":4}`, imageUUID, file, imageUUID, imageUUID)
		req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/imagestore/import/", strings.NewReader(body))
		req.Host = "192.168.1.20:8001" // the management node dials the BS hostname
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
		req.Header.Set("Authorization", "Bearer s3cret-token")
		req.Header.Set("taskuuid", task)
		req.Header.Set("callbackurl", cb.URL+"/zstack/asyncrest/callback")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Fatalf("import answered %d", res.StatusCode)
		}
		var rep mnImportReply
		if err := json.Unmarshal(cb.wait(t, task), &rep); err != nil {
			t.Fatalf("callback does not decode as the MN's reply: %v", err)
		}
		return rep
	}
	rep := startImport("0b6f4f5e1c2d4e6f8a9b0c1d2e3f4a5b", imageUUID, "centos7.qcow2")
	prefix := "http://192.168.1.20:8001/imagestore/upload/" + imageUUID + "/"
	if !rep.Success || rep.Name != imageUUID || rep.ID != "" || rep.Size != 0 || rep.VirtualSize != 0 ||
		!strings.HasPrefix(rep.Blobsum, prefix) || len(rep.Blobsum) != len(prefix)+32 || rep.TotalSize == nil || *rep.TotalSize <= 0 || rep.FreeSize == nil {
		t.Fatalf("first callback %+v", rep)
	}
	u, err := url.Parse(rep.Blobsum)
	if err != nil || u.Host != "192.168.1.20:8001" {
		t.Fatalf("blobsum %q is not an absolute URL with the request's host: %v", rep.Blobsum, err)
	}
	uploadURL := e.srv.URL + u.Path

	progress := func() mnProgressReply {
		t.Helper()
		b, _ := json.Marshal(map[string]string{"imageUuid": imageUUID})
		req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/imagestore/progress/", bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer s3cret-token")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		var p mnProgressReply
		if err := json.NewDecoder(res.Body).Decode(&p); err != nil {
			t.Fatalf("progress does not decode as the MN's reply: %v", err)
		}
		return p
	}
	if p := progress(); !p.Success || p.Completed || p.DownloadSize != 0 {
		t.Fatalf("progress before any byte: %+v", p)
	}
	send := func(headers map[string]string, chunk []byte) (int, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPut, uploadURL, bytes.NewReader(chunk))
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		res, err := http.DefaultClient.Do(req) // no Authorization: the URL is the credential
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		var v map[string]any
		_ = json.NewDecoder(res.Body).Decode(&v)
		return res.StatusCode, v
	}
	n := int64(len(data))
	third := n / 3
	start := time.Now().UnixMilli()
	// Content-Range chunk, then a stale one, then the Ceph agent's slice
	// headers, then Upload-Offset with the end.
	if code, v := send(map[string]string{"Content-Range": fmt.Sprintf("bytes 0-%d/%d", third-1, n)}, data[:third]); code != 200 || r7num(v["offset"]) != third {
		t.Fatalf("first chunk: %d %v", code, v)
	}
	p := progress()
	if p.Completed || p.ActualSize != n || p.DownloadSize != third || p.LastOpTime < start || p.Progress != int32(third*100/n) {
		t.Fatalf("progress after a third: %+v (size %d)", p, n)
	}
	if code, v := send(map[string]string{"Upload-Offset": "0"}, data[:10]); code != http.StatusConflict || r7num(v["offset"]) != third {
		t.Fatalf("a chunk at a stale offset: %d %v, want 409 with offset %d", code, v, third)
	}
	if code, v := send(map[string]string{"X-Slice-Offset": fmt.Sprint(third), "X-Image-Size": fmt.Sprint(n)}, data[third:2*third]); code != 200 || r7num(v["offset"]) != 2*third {
		t.Fatalf("slice chunk: %d %v", code, v)
	}
	if code, v := send(map[string]string{"Upload-Offset": fmt.Sprint(2 * third), "Upload-Length": fmt.Sprint(n)}, data[2*third:]); code != 200 || v["complete"] != true {
		t.Fatalf("last chunk: %d %v", code, v)
	}
	testwait.For(t, "upload import to complete", func() bool { return progress().Completed })
	p = progress()
	if !p.Success || p.Progress != 100 || p.Format != "qcow2" || p.Size != 3<<20 || p.ActualSize <= 0 || p.DownloadSize != n ||
		!strings.HasPrefix(p.InstallPath, "zstore://"+imageUUID+"/") {
		t.Fatalf("final progress %+v", p)
	}
	img, err := e.a.images.Lookup(t.Context(), "installPath", p.InstallPath)
	if err != nil || img.Desc != "centos7" || img.Arch != "amd64" {
		t.Fatalf("record %+v %v", img, err)
	}
	flat := filepath.Join(e.dir, "flat.raw")
	r7flattenTo(t, e, p.InstallPath, flat)
	r7run(t, "cmp", flat, src)
	cb.mu.Lock()
	hits := cb.hits["0b6f4f5e1c2d4e6f8a9b0c1d2e3f4a5b"]
	cb.mu.Unlock()
	if hits != 1 {
		t.Fatalf("%d callbacks for one taskuuid, want exactly one", hits)
	}
	if code, _ := send(map[string]string{"Upload-Offset": "0"}, data[:10]); code != http.StatusNotFound {
		t.Fatalf("chunk after completion: %d, want 404", code)
	}

	// A browser's CORS preflight, and unknown sessions.
	req, _ := http.NewRequest(http.MethodOptions, uploadURL, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusNoContent || res.Header.Get("Access-Control-Allow-Origin") != "*" || !strings.Contains(res.Header.Get("Access-Control-Allow-Methods"), "PUT") {
		t.Fatalf("preflight: %d %v", res.StatusCode, res.Header)
	}
	for _, bad := range []string{
		"/imagestore/upload/" + imageUUID + "/" + strings.Repeat("0", 32),
		"/imagestore/upload/0000/" + strings.TrimPrefix(u.Path, "/imagestore/upload/"+imageUUID+"/"),
		"/imagestore/upload/" + imageUUID + "/x",
	} {
		req, _ := http.NewRequest(http.MethodPut, e.srv.URL+bad, strings.NewReader("x"))
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusNotFound {
			t.Fatalf("PUT %s: %d, want 404", bad, res.StatusCode)
		}
	}

	// One raw PUT of a whole ISO image: stored and reported as "iso".
	media := filepath.Join(e.dir, "media")
	if err := os.MkdirAll(media, 0o755); err != nil {
		t.Fatal(err)
	}
	r7run(t, "cp", src, filepath.Join(media, "disk.bin"))
	iso := filepath.Join(e.dir, "m.iso")
	r7run(t, "genisoimage", "-quiet", "-o", iso, media)
	isoBytes, _ := os.ReadFile(iso)
	const isoUUID = "2b2c3d4e5f60718293a4b5c6d7e8f9a0"
	rep = startImport("1b6f4f5e1c2d4e6f8a9b0c1d2e3f4a5b", isoUUID, "m.iso")
	iu, _ := url.Parse(rep.Blobsum)
	res, err = http.Post(e.srv.URL+iu.Path, "application/octet-stream", bytes.NewReader(isoBytes))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("raw POST: %d", res.StatusCode)
	}
	var ip mnProgressReply
	testwait.For(t, "iso upload to complete", func() bool {
		b, _ := json.Marshal(map[string]string{"imageUuid": isoUUID})
		req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/imagestore/progress/", bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer s3cret-token")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		ip = mnProgressReply{}
		_ = json.NewDecoder(res.Body).Decode(&ip)
		return ip.Completed
	})
	if !ip.Success || ip.Format != "iso" || ip.Size != int64(len(isoBytes)) || ip.ActualSize != int64(len(isoBytes)) {
		t.Fatalf("iso progress %+v", ip)
	}
}

// TestImportCancelUploadSession: import/cancel by imageuuid alone stops an
// upload:// import whose bytes are still arriving at its upload URL (the
// upload job, not the import request's job that answered at once): the
// reply names the cancelled job, progress reports it cancelled, and the
// next chunk is refused.
func TestImportCancelUploadSession(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	cb := newCallbackSink(t)
	const imageUUID = "1b2c3d4e5f60718293a4b5c6d7e8f9a0"
	body := `{"imgurl":"upload://` + imageUUID + `/centos7.qcow2","name":"` + imageUUID + `","arch":"amd64","imageuuid":"` + imageUUID + `","concurrency":4}`
	if r := e.do(t, http.MethodPost, "/imagestore/import/", body, map[string]string{"taskuuid": "upl1", "callbackurl": cb.URL}); r.code != 200 {
		t.Fatalf("import: %s", r.raw)
	}
	var rep mnImportReply
	if err := json.Unmarshal(cb.wait(t, "upl1"), &rep); err != nil || !rep.Success {
		t.Fatalf("import callback %+v %v", rep, err)
	}
	u, err := url.Parse(rep.Blobsum)
	if err != nil {
		t.Fatal(err)
	}
	put := func(from, n, total int) int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPut, e.srv.URL+u.Path, strings.NewReader(strings.Repeat("x", n)))
		req.Header.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", from, from+n-1, total))
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	if code := put(0, 1<<20, 3<<20); code != 200 {
		t.Fatalf("first chunk: %d", code)
	}
	var uploadJob string
	for _, in := range e.a.jobs.List() {
		if in.Kind == uploadSessionKind && in.ImageUUID == imageUUID {
			uploadJob = in.ID
		}
	}
	if uploadJob == "" {
		t.Fatal("no upload job for the image")
	}

	r := e.do(t, http.MethodPost, "/imagestore/import/cancel-sync/", `{"imageuuid":"`+imageUUID+`","name":"`+imageUUID+`"}`, nil)
	if r.code != 200 || r.body["success"] != true || fmt.Sprint(r.body["cancelled"]) != "["+uploadJob+"]" {
		t.Fatalf("import/cancel: %s, want the upload job %s cancelled", r.raw, uploadJob)
	}
	j, ok := e.a.jobs.Get(uploadJob)
	if !ok {
		t.Fatal("upload job gone")
	}
	select {
	case <-j.Done():
	default:
		t.Fatal("import/cancel answered before the upload job ended")
	}
	if st := j.Info().State; st != "cancelled" {
		t.Fatalf("upload job state %q, want cancelled", st)
	}
	p := e.do(t, http.MethodPost, "/imagestore/progress/", `{"imageUuid":"`+imageUUID+`"}`, nil)
	if p.body["success"] != false || !strings.Contains(p.errMsg(), "cancelled") {
		t.Fatalf("progress after cancel: %s", p.raw)
	}
	if code := put(1<<20, 1<<20, 3<<20); code != http.StatusNotFound {
		t.Fatalf("chunk after cancel: %d, want 404", code)
	}
}

// lockedBuffer is a log sink safe for the agent's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestUploadSessionTokenSecret: the token in an upload URL is the upload's
// only credential, so it is never the job's id (logged, listed, reported
// by progress), and gc, which the management node sends pending upload
// URLs to keep, neither logs nor echoes it.
func TestUploadSessionTokenSecret(t *testing.T) {
	t.Parallel()
	logs := &lockedBuffer{}
	root := t.TempDir()
	store, err := blobstore.Open(context.Background(), blobstore.Options{Root: root, CommitGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t)
	cfg.Root = root
	cfg.NBD.PortRange = ""
	cfg.CallbackMaxDelay = 5 * time.Millisecond
	a, err := New(cfg, store, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("agent close: %v", err)
		}
		_ = store.Close()
	})
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	e := &htEnv{a: a, store: store, srv: srv, token: string(cfg.Token)}
	cb := newCallbackSink(t)

	const imageUUID = "1b2c3d4e5f60718293a4b5c6d7e8f9a0"
	body := `{"imgurl":"upload://` + imageUUID + `/centos7.qcow2","name":"` + imageUUID + `","arch":"amd64","imageuuid":"` + imageUUID + `","concurrency":4}`
	if r := e.do(t, http.MethodPost, "/imagestore/import/", body, map[string]string{"taskuuid": "upl1", "callbackurl": cb.URL}); r.code != 200 {
		t.Fatalf("import: %s", r.raw)
	}
	var rep mnImportReply
	if err := json.Unmarshal(cb.wait(t, "upl1"), &rep); err != nil || !rep.Success {
		t.Fatalf("import callback %+v %v", rep, err)
	}
	u, err := url.Parse(rep.Blobsum)
	if err != nil {
		t.Fatal(err)
	}
	token := u.Path[strings.LastIndex(u.Path, "/")+1:]
	if !isSessionToken(token) {
		t.Fatalf("upload URL %s ends in %q, not a 128-bit token", rep.Blobsum, token)
	}
	req, _ := http.NewRequest(http.MethodPut, srv.URL+u.Path, strings.NewReader(strings.Repeat("x", 1<<20)))
	req.Header.Set("Content-Range", fmt.Sprintf("bytes 0-%d/%d", 1<<20-1, 3<<20))
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("chunk at the upload URL: %d", res.StatusCode)
	}

	list := e.do(t, http.MethodPost, "/imagestore/job/list/", `{}`, nil)
	var uploadJob string
	for _, in := range a.jobs.List() {
		if in.Kind == uploadSessionKind {
			uploadJob = in.ID
		}
	}
	prog := e.do(t, http.MethodPost, "/imagestore/progress/", `{"imageUuid":"`+imageUUID+`"}`, nil)
	if uploadJob == "" || prog.body["success"] != true || prog.body["taskuuid"] != uploadJob {
		t.Fatalf("progress %s, want upload job %q", prog.raw, uploadJob)
	}
	gc := e.do(t, http.MethodPost, "/imagestore/gc-sync/", fmt.Sprintf(`{"imagesToKeep":[%q]}`, rep.Blobsum), nil)
	if gc.body["success"] != true || gc.body["skippedCount"] != float64(1) || !strings.Contains(gc.raw, "/imagestore/upload/"+imageUUID+"/redacted-") {
		t.Fatalf("gc: %s, want the upload URL skipped with its token redacted", gc.raw)
	}
	if !strings.Contains(logs.String(), "keep-list entries skipped") {
		t.Fatalf("gc logged no skipped entry:\n%s", logs.String())
	}
	for what, s := range map[string]string{
		"upload job id": uploadJob, "job/list": list.raw, "progress": prog.raw, "gc reply": gc.raw, "logs": logs.String(),
	} {
		if strings.Contains(s, token) {
			t.Errorf("%s holds the upload token %s:\n%s", what, token, s)
		}
	}
}

package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/config"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/testwait"
	"imagestore/transfer/sshtest"
)

// imageServer serves files over HTTP with Range support; cutAfter > 0 makes
// the first full-body request drop the connection after that many bytes.
type imageServer struct {
	*httptest.Server
	mu       sync.Mutex
	files    map[string][]byte
	cutAfter int
	cuts     int
	ranges   []string
	block    chan struct{} // when set, /slow sends 64 KiB then waits on it
}

func newImageServer(t *testing.T) *imageServer {
	s := &imageServer{files: map[string][]byte{}, block: make(chan struct{})}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		b, ok := s.files[r.URL.Path]
		cut := s.cutAfter > 0 && s.cuts == 0 && r.Header.Get("Range") == ""
		if cut {
			s.cuts++
		}
		if rg := r.Header.Get("Range"); rg != "" {
			s.ranges = append(s.ranges, rg)
		}
		s.mu.Unlock()
		switch {
		case r.URL.Path == "/slow":
			w.Header().Set("Content-Length", "10485760")
			_, _ = w.Write(make([]byte, 64<<10))
			w.(http.Flusher).Flush()
			select {
			case <-s.block:
			case <-r.Context().Done():
			}
			return
		case !ok:
			http.NotFound(w, r)
			return
		case cut:
			w.Header().Set("Content-Length", fmt.Sprint(len(b)))
			_, _ = w.Write(b[:s.cutAfter])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		http.ServeContent(w, r, "img", time.Time{}, bytes.NewReader(b))
	}))
	t.Cleanup(func() { close(s.block); s.Close() })
	return s
}

func (s *imageServer) add(t *testing.T, name, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.files["/"+name] = b
	s.mu.Unlock()
	return s.URL + "/" + name
}

// storedPath is the blob path of an import reply's image, which must be
// stored in format want ("qcow2" ones pass qemu-img check).
func storedPath(t *testing.T, e *restoreEnv, rep map[string]any, want string) string {
	t.Helper()
	if rep["format"] != want {
		t.Fatalf("stored format %v, want %s", rep["format"], want)
	}
	p, err := e.store.BlobPath(digest.Digest(rep["blobsum"].(string)))
	if err != nil {
		t.Fatal(err)
	}
	if want == "qcow2" {
		r7run(t, "qemu-img", "check", "-f", "qcow2", p)
	}
	return p
}

func TestImportHTTPResumeAndFormats(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img")
	e := newRestoreEnv(t, nil)
	srv := newImageServer(t)
	src := filepath.Join(e.dir, "src.raw")
	r7writePattern(t, src, 4<<20, 9)
	qc := filepath.Join(e.dir, "src.qcow2")
	r7run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, qc)

	// Raw over HTTP, cut mid-body on the first request: resumed with Range.
	srv.mu.Lock()
	srv.cutAfter = 1<<20 + 12345
	srv.mu.Unlock()
	rep := e.ok(t, "/imagestore/import-sync", map[string]any{"imgurl": srv.add(t, "a.raw", src), "name": "img", "arch": "x86_64", "desc": "d"})
	srv.mu.Lock()
	ranges, cuts := append([]string(nil), srv.ranges...), srv.cuts
	srv.mu.Unlock()
	if cuts != 1 || len(ranges) == 0 || ranges[0] == "bytes=0-" {
		t.Fatalf("cuts %d, ranges %v: the download did not resume", cuts, ranges)
	}
	// A raw disk is stored as it is: byte for byte the download.
	p := storedPath(t, e, rep, "raw")
	r7run(t, "cmp", p, src)
	if r7num(rep["virtualsize"]) != 4<<20 || rep["name"] != "img" || r7num(rep["totalSize"]) <= 0 {
		t.Fatalf("reply %v", rep)
	}
	img, err := e.a.images.Lookup(context.Background(), "installPath", rep["installPath"].(string))
	if err != nil || img.Arch != "x86_64" || img.Desc != "d" {
		t.Fatalf("record %+v %v", img, err)
	}

	// qcow2 with a given id.
	rep = e.ok(t, "/imagestore/import-sync", map[string]any{"imgurl": srv.add(t, "b.qcow2", qc), "name": "img", "imageuuid": "0123456789abcdef"})
	if rep["id"] != "0123456789abcdef" {
		t.Fatalf("id %v", rep["id"])
	}
	r7run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", storedPath(t, e, rep, "qcow2"), src)

	// file:// from an upload dir.
	up := e.uploadDir(t)
	r7run(t, "cp", qc, filepath.Join(up, "c.qcow2"))
	rep = e.ok(t, "/imagestore/import-sync", map[string]any{"imgurl": "file://" + filepath.Join(up, "c.qcow2"), "name": "img"})
	r7run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", storedPath(t, e, rep, "qcow2"), src)

	// An ISO-9660 image is an "iso": stored, exported and served as it is.
	r7requireTools(t, "genisoimage")
	media := filepath.Join(e.dir, "media")
	if err := os.MkdirAll(media, 0o755); err != nil {
		t.Fatal(err)
	}
	r7run(t, "cp", src, filepath.Join(media, "disk.bin"))
	iso := filepath.Join(e.dir, "media.iso")
	r7run(t, "genisoimage", "-quiet", "-V", "MEDIA", "-o", iso, media)
	rep = e.ok(t, "/imagestore/import-sync", map[string]any{"imgurl": srv.add(t, "m.iso", iso), "name": "img"})
	r7run(t, "cmp", storedPath(t, e, rep, "iso"), iso)
	isoBytes, _ := os.ReadFile(iso)
	if r7num(rep["size"]) != int64(len(isoBytes)) || r7num(rep["virtualsize"]) != int64(len(isoBytes)) {
		t.Fatalf("iso reply %v", rep)
	}
	exp := e.ok(t, "/imagestore/export-sync", map[string]any{"installPath": rep["installPath"], "extFmt": ""})
	if !strings.HasSuffix(exp["imgUrl"].(string), ".iso") || exp["format"] != "iso" {
		t.Fatalf("iso export %v", exp)
	}
	res, err := http.Get(e.srv.URL + exp["imgUrl"].(string))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if !bytes.Equal(got, isoBytes) {
		t.Fatalf("exported iso differs: %d bytes", len(got))
	}
}

func TestImportErrors(t *testing.T) {
	t.Parallel()
	e := newRestoreEnv(t, func(c *config.Config) { c.MaxImportSize = 1 << 20 })
	srv := newImageServer(t)
	text := filepath.Join(e.dir, "page.html")
	if err := os.WriteFile(text, []byte("<html>not an image</html>\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	gz := filepath.Join(e.dir, "x.gz")
	if err := os.WriteFile(gz, append([]byte{0x1f, 0x8b}, make([]byte, 1022)...), 0o644); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(e.dir, "big.raw")
	r7writePattern(t, big, 2<<20, 1)
	empty := filepath.Join(e.dir, "empty")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, url, want string }{
		{"gopher", "gopher://h/x.qcow2", "scheme gopher is not supported"},
		{"ftp refused", "ftp://127.0.0.1:1/x.qcow2", "connection refused"},
		{"no scheme", "/x.qcow2", "no scheme"},
		{"no host", "http:///x", "no host"},
		{"not found", srv.URL + "/missing", "HTTP 404"},
		{"refused", "http://127.0.0.1:1/x", "connection refused"},
		{"non-image", srv.add(t, "page.html", text), "not a disk image"},
		{"gzip", srv.add(t, "x.gz", gz), "gzip-compressed"},
		{"oversized", srv.add(t, "big.raw", big), "larger than maxImportSize"},
		{"empty", srv.add(t, "empty", empty), "empty"},
		{"file outside", "file:///etc/passwd", "escapes the upload dirs"},
		{"sftp without known hosts", "sftp://u@127.0.0.1/x", "knownHostsFile"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e.fails(t, "/imagestore/import-sync", map[string]any{"imgurl": c.url, "name": "img"}, c.want)
		})
	}
	e.fails(t, "/imagestore/import-sync", map[string]any{"imgurl": "http://h/x"}, "missing field name")
	// A password never appears in errors.
	for _, u := range []string{"http://user:s3cret@127.0.0.1:1/x", "ftp://user:s3cret@127.0.0.1:1/x"} {
		v := e.fails(t, "/imagestore/import-sync", map[string]any{"imgurl": u, "name": "img"}, "refused")
		if strings.Contains(fmt.Sprint(v), "s3cret") {
			t.Fatalf("password leaked: %v", v)
		}
	}
	imgs, _ := e.store.ListImages(context.Background(), "")
	if len(imgs) != 0 {
		t.Fatalf("failed imports stored images: %v", imgs)
	}
}

func TestImportCancelRemovesIngest(t *testing.T) {
	t.Parallel()
	e := newRestoreEnv(t, nil)
	srv := newImageServer(t)
	id := "cancel-" + r7randHex()
	req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/imagestore/import/", strings.NewReader(r7jsonString(map[string]any{"imgurl": srv.URL + "/slow", "name": "img"})))
	req.Header.Set("taskuuid", id)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	ingest := "import-" + id
	testwait.For(t, "download to start", func() bool {
		n, err := e.store.IngestOffset(ingest)
		return err == nil && n > 0 || func() bool {
			j, ok := e.a.jobs.Get(id)
			return ok && j.Info().Done > 0
		}()
	})
	e.ok(t, "/imagestore/job/cancel/", map[string]any{"taskuuid": id})
	j, _ := e.a.jobs.Get(id)
	select {
	case <-j.Done():
	case <-time.After(60 * time.Second):
		t.Fatal("cancelled import did not stop")
	}
	if st := j.Info().State; st != jobs.Cancelled {
		t.Fatalf("state %v", st)
	}
	if _, err := e.store.IngestOffset(ingest); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("partial ingest left after cancel: %v", err)
	}
}

func TestImportSFTP(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "sshd")
	s := sshtest.Start(t)
	keyFile := filepath.Join(t.TempDir(), "id")
	if err := os.WriteFile(keyFile, s.PrivateKey, 0o600); err != nil {
		t.Fatal(err)
	}
	e := newRestoreEnv(t, func(c *config.Config) { c.KnownHostsFile = s.KnownHostsFile; c.SSHKeyFile = keyFile })
	src := filepath.Join(s.Dir, "src.raw")
	r7writePattern(t, src, 2<<20, 5)
	qc := filepath.Join(s.Dir, "src.qcow2")
	r7run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, qc)
	rep := e.ok(t, "/imagestore/import-sync", map[string]any{"imgurl": fmt.Sprintf("sftp://%s@127.0.0.1:%d%s", s.User, s.Port, qc), "name": "img"})
	r7run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", storedPath(t, e, rep, "qcow2"), src)
	e.fails(t, "/imagestore/import-sync", map[string]any{"imgurl": fmt.Sprintf("sftp://%s@127.0.0.1:%d%s", s.User, s.Port, s.Dir+"/missing"), "name": "img"}, "not exist")

	// A host whose key is not in known_hosts is refused.
	other := sshtest.Start(t)
	e.fails(t, "/imagestore/import-sync", map[string]any{"imgurl": fmt.Sprintf("sftp://%s@127.0.0.1:%d%s", other.User, other.Port, qc), "name": "img"}, "host key")
}

func TestImportUpload(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img")
	e := newRestoreEnv(t, func(c *config.Config) { c.MaxBodyBytes = 256 << 10 })
	src := filepath.Join(e.dir, "src.raw")
	r7writePattern(t, src, 1<<20, 7)
	data, _ := os.ReadFile(src)
	id := "upload-" + r7randHex()
	req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/imagestore/import/", strings.NewReader(`{"imgurl":"upload://src.raw","name":"img"}`))
	req.Header.Set("taskuuid", id)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	put := func(off int, chunk []byte, last bool) int {
		r, _ := http.NewRequest(http.MethodPut, e.srv.URL+"/imagestore/upload/", bytes.NewReader(chunk))
		r.Header.Set("taskuuid", id)
		r.Header.Set("Upload-Offset", fmt.Sprint(off))
		if last {
			r.Header.Set("Upload-Complete", "true")
		}
		res, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	// The job registers its session asynchronously: retry the first chunk.
	testwait.For(t, "upload session", func() bool { return put(0, data[:200<<10], false) == http.StatusOK })
	if code := put(0, data[:10], false); code != http.StatusConflict {
		t.Fatalf("chunk at a stale offset: %d, want 409", code)
	}
	for off := 200 << 10; off < len(data); off += 200 << 10 {
		end := min(off+200<<10, len(data))
		if code := put(off, data[off:end], end == len(data)); code != http.StatusOK {
			t.Fatalf("chunk at %d: %d", off, code)
		}
	}
	j, _ := e.a.jobs.Get(id)
	<-j.Done()
	info := j.Info()
	if info.State != jobs.Succeeded {
		t.Fatalf("upload import: %v %s", info.State, info.Result)
	}
	var rep map[string]any
	_ = json.Unmarshal(info.Result, &rep)
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", storedPath(t, e, rep, "raw"), src)
}

// A host that stalls in the middle of a chunk must not hold up the job's
// cancel: the in-flight copy is cut off at once, not after the idle timeout.
func TestImportUploadStalledChunkDoesNotBlockCancel(t *testing.T) {
	t.Parallel()
	e := newRestoreEnv(t, nil)
	id := "upload-" + r7randHex()
	req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/imagestore/import/", strings.NewReader(`{"imgurl":"upload://x.raw","name":"img"}`))
	req.Header.Set("taskuuid", id)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	testwait.For(t, "upload session", func() bool { waiting, _ := e.a.uploads.Receiving(id); return waiting })

	pr, pw := io.Pipe()
	defer pw.Close()
	putDone := make(chan struct{})
	go func() {
		defer close(putDone)
		r, _ := http.NewRequest(http.MethodPut, e.srv.URL+"/imagestore/upload/", pr)
		r.Header.Set("taskuuid", id)
		r.Header.Set("Upload-Offset", "0")
		if res, err := http.DefaultClient.Do(r); err == nil {
			res.Body.Close()
		}
	}()
	if _, err := pw.Write(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	// The chunk is now being copied, and the client sends nothing more.
	testwait.For(t, "chunk in flight", func() bool { _, busy := e.a.uploads.Receiving(id); return busy })
	if _, err := e.a.jobs.Cancel(id); err != nil {
		t.Fatal(err)
	}
	j, _ := e.a.jobs.Get(id)
	select {
	case <-j.Done():
	case <-time.After(e.a.uploads.ChunkReadIdle() / 2):
		t.Fatalf("cancel waited on a stalled upload chunk (idle timeout %v)", e.a.uploads.ChunkReadIdle())
	}
	if st := j.Info().State; st != jobs.Cancelled {
		t.Fatalf("state %v, want cancelled", st)
	}
	pw.CloseWithError(errors.New("test done"))
	<-putDone
}

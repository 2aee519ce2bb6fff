package ingest

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/agent/images"
	"imagestore/agent/jobs"
	"imagestore/agent/uploads"
	"imagestore/blobstore"
	"imagestore/internal/retry"
	"imagestore/layer"
)

type env struct {
	svc   *Service
	store *blobstore.Store
	ups   *uploads.Uploads
	waits []time.Duration // resume waits of fetchHTTP
}

func newEnv(t *testing.T) *env {
	t.Helper()
	root := t.TempDir()
	store, err := blobstore.Open(context.Background(), blobstore.Options{Root: root, CommitGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	ls, err := layer.New(layer.Options{Blobs: store})
	if err != nil {
		t.Fatal(err)
	}
	ims, err := images.New(images.Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	ups, err := uploads.New(uploads.Options{Root: filepath.Join(root, "uploads"), Expiry: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{store: store, ups: ups}
	var mu sync.Mutex
	e.svc, err = New(Options{
		Store: store, Layers: ls, Images: ims, Uploads: ups,
		Resume: retry.Policy{Attempts: 3, Initial: time.Second, Sleep: func(_ context.Context, d time.Duration) error {
			mu.Lock()
			defer mu.Unlock()
			e.waits = append(e.waits, d)
			return nil
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// upload writes data into a fresh upload dir and returns its path.
func (e *env) upload(t *testing.T, name string, data []byte) string {
	t.Helper()
	dir, err := e.ups.Alloc(0)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir.Path, name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestImportBackupOpaque(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	data := append([]byte{0x1f, 0x8b}, bytes.Repeat([]byte("dump"), 1000)...)
	img, err := e.svc.ImportBackup(ctx, BackupRequest{Task: "t1", ImgURL: "file://" + e.upload(t, "d.gz", data), Name: "vol", Desc: "d"}, jobs.Nop{})
	if err != nil {
		t.Fatal(err)
	}
	if img.Format != "gzip" || img.Size != int64(len(data)) || img.VirtualSize != img.Size || img.Desc != "d" || img.Name != "vol" {
		t.Fatalf("image %+v", img)
	}
	if _, err := e.svc.ImportBackup(ctx, BackupRequest{Task: "t2", ImgURL: "/etc/passwd", Name: "vol"}, jobs.Nop{}); err == nil || !strings.Contains(err.Error(), "escapes the upload dirs") {
		t.Fatalf("outside path: %v", err)
	}
	if _, err := e.svc.ImportBackup(ctx, BackupRequest{Task: "t3", ImgURL: e.upload(t, "x", data), Parent: "vol:nothing"}, jobs.Nop{}); err == nil || !strings.Contains(err.Error(), "parent vol:nothing not found") {
		t.Fatalf("unknown parent: %v", err)
	}
}

func TestImportDatabaseBackup(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	dump := []byte("INSERT INTO t VALUES (1);\n")
	path := e.upload(t, "db.sql", dump)
	sum := md5.Sum(dump)
	desc := fmt.Sprintf(`{"name":"db","createdTime":1700000000000,"md5":%q}`, strings.ToUpper(hex.EncodeToString(sum[:])))
	if !IsDatabaseBackup(images.DatabaseBackupName, desc) || IsDatabaseBackup("vol", desc) || IsDatabaseBackup(images.DatabaseBackupName, `{"name":"x"}`) {
		t.Fatal("IsDatabaseBackup")
	}
	bad := `{"md5":"00112233445566778899aabbccddeeff"}`
	if _, err := e.svc.ImportDatabaseBackup(ctx, DatabaseBackupRequest{ImgURL: path, Desc: bad}, jobs.Nop{}); err == nil || !strings.Contains(err.Error(), "is corrupt: md5") {
		t.Fatalf("mismatch: %v", err)
	}
	if imgs, _ := e.store.ListImages(ctx, ""); len(imgs) != 0 {
		t.Fatalf("a corrupt dump was recorded: %v", imgs)
	}
	img, err := e.svc.ImportDatabaseBackup(ctx, DatabaseBackupRequest{ImgURL: path, Desc: desc}, jobs.Nop{})
	if err != nil || img.Name != images.DatabaseBackupName || img.Desc != desc || img.Size != int64(len(dump)) {
		t.Fatalf("import %+v %v", img, err)
	}
	if _, err := ParseDatabaseDesc(`{"md5":"xyz"}`); err == nil || !strings.Contains(err.Error(), "not an MD5 hex digest") {
		t.Fatalf("bad md5: %v", err)
	}
}

// A raw download cut mid-body resumes with a Range request (paced by the
// Resume policy) and is stored as it is, a raw disk.
func TestImportURLResumes(t *testing.T) {
	e := newEnv(t)
	raw := make([]byte, 1<<20)
	for i := range raw {
		raw[i] = byte(i/4096 + 1)
	}
	var mu sync.Mutex
	var ranges []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/disk.raw" {
			http.NotFound(w, r)
			return
		}
		mu.Lock()
		ranges = append(ranges, r.Header.Get("Range"))
		first := len(ranges) == 1
		mu.Unlock()
		if first {
			w.Header().Set("Content-Length", fmt.Sprint(len(raw)))
			_, _ = w.Write(raw[:300000])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		http.ServeContent(w, r, "disk.raw", time.Time{}, bytes.NewReader(raw))
	}))
	defer srv.Close()
	img, err := e.svc.ImportURL(context.Background(), URLRequest{Task: "u1", ImgURL: srv.URL + "/disk.raw", Name: "img", Arch: "x86_64"}, jobs.Nop{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ranges) != 2 || ranges[1] != "bytes=300000-" || len(e.waits) != 1 || e.waits[0] != time.Second {
		t.Fatalf("ranges %q, waits %v", ranges, e.waits)
	}
	if img.Format != "raw" || img.VirtualSize != int64(len(raw)) || img.Size != int64(len(raw)) || img.Arch != "x86_64" {
		t.Fatalf("image %+v", img)
	}
	b, err := e.store.OpenBlob(context.Background(), img.Blob)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	got := make([]byte, len(raw))
	if _, err := b.ReadAt(got, 0); err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("stored blob differs from the download (%v)", err)
	}

	// A 404 is not retried; errors never show the URL's password.
	_, err = e.svc.ImportURL(context.Background(), URLRequest{Task: "u2", ImgURL: "http://u:s3cret@" + strings.TrimPrefix(srv.URL, "http://") + "/missing", Name: "img"}, jobs.Nop{})
	if err == nil || !strings.Contains(err.Error(), "HTTP 404") || strings.Contains(err.Error(), "s3cret") || len(e.waits) != 1 {
		t.Fatalf("404: %v (waits %v)", err, e.waits)
	}
}

// TestImportBackupWrittenBeforeBoot: backup targets are written without
// flushes, so a file last written before the machine started may be torn;
// import-backup refuses it, names the times, and stores nothing. A file
// written since is imported.
func TestImportBackupWrittenBeforeBoot(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	if e.svc.bootTime().IsZero() || time.Since(e.svc.bootTime()) <= 0 {
		t.Fatalf("boot time read from /proc/stat: %v", e.svc.bootTime())
	}
	p := e.upload(t, "b.raw", bytes.Repeat([]byte{7}, 4096))
	if _, err := e.svc.ImportBackup(ctx, BackupRequest{Task: "ok", ImgURL: p, Name: "vol"}, jobs.Nop{}); err != nil {
		t.Fatalf("a file written since boot: %v", err)
	}
	old := e.svc.bootTime().Add(-time.Minute)
	if err := os.Chtimes(p, old, old); err != nil {
		t.Fatal(err)
	}
	before, _ := e.store.ListImages(ctx, "")
	_, err := e.svc.ImportBackup(ctx, BackupRequest{Task: "old", ImgURL: p, Name: "vol2"}, jobs.Nop{})
	if !errors.Is(err, ErrWrittenBeforeBoot) || !strings.Contains(err.Error(), "take the backup again") {
		t.Fatalf("a file written before boot: %v, want ErrWrittenBeforeBoot", err)
	}
	if after, _ := e.store.ListImages(ctx, ""); len(after) != len(before) {
		t.Fatalf("a refused import recorded an image: %d -> %d", len(before), len(after))
	}
}

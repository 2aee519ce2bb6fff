package agent

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"imagestore/agent/config"
	"imagestore/agent/uploads"
	"imagestore/internal/testwait"
)

func (e *htEnv) allocUploadDir(t *testing.T, body string) string {
	t.Helper()
	r := e.do(t, http.MethodPost, "/imagestore/allocuploaddir/", body, nil)
	dir, _ := r.body["uploadDir"].(string)
	if r.code != 200 || r.body["success"] != true || dir == "" {
		t.Fatalf("allocuploaddir: %d %s", r.code, r.raw)
	}
	return dir
}

func exists(p string) bool { _, err := os.Lstat(p); return err == nil }

func TestAllocUploadDirExpireHour(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	for _, tc := range []struct {
		body, err string
		ttl       time.Duration
	}{
		{`{}`, "", 24 * time.Hour}, // uploadDirExpiry default
		{`{"expireHour":3}`, "", 3 * time.Hour},
		{`{"expireHour":"2"}`, "", 2 * time.Hour},
		{`{"expireHour":-1}`, "expireHour -1 is negative", 0},
		{`{"expireHour":10000000000}`, "expireHour 10000000000 is too large", 0},
		{`{"expireHour":"soon"}`, "bad JSON in request body", 0},
	} {
		t.Run(tc.body, func(t *testing.T) {
			before := time.Now().Truncate(time.Second)
			r := e.do(t, http.MethodPost, "/imagestore/allocuploaddir/", tc.body, nil)
			if tc.err != "" {
				if r.body["success"] != false || !strings.Contains(r.errMsg(), tc.err) {
					t.Fatalf("%d %s", r.code, r.raw)
				}
				return
			}
			dir, _ := r.body["uploadDir"].(string)
			exp, err := time.Parse(time.RFC3339, r.body["expires"].(string))
			if err != nil || !exists(dir) || filepath.Dir(dir) != e.a.uploads.Root() {
				t.Fatalf("reply %s: %v", r.raw, err)
			}
			if exp.Before(before.Add(tc.ttl-time.Second)) || exp.After(time.Now().Add(tc.ttl+time.Second)) {
				t.Fatalf("expires %v, want about now+%v", exp, tc.ttl)
			}
			onDisk, err := e.a.uploads.Expiry(dir)
			if err != nil || !onDisk.Equal(exp) {
				t.Fatalf("expiry file %v %v, reply %v", onDisk, err, exp)
			}
		})
	}
}

func TestCleanUploadDirs(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, func(c *config.Config) { c.UploadDirExpiry = time.Hour })
	short := e.allocUploadDir(t, `{"expireHour":1}`)
	long := e.allocUploadDir(t, `{"expireHour":5}`)
	for _, d := range []string{short, long} {
		if err := os.WriteFile(filepath.Join(d, "disk.qcow2"), []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(d, "sub", "deeper"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Without an expiry file the dir's age counts (uploadDirExpiry = 1h).
	noExpOld := filepath.Join(e.a.uploads.Root(), uploads.DirPrefix+"noexpiry-old")
	noExpNew := filepath.Join(e.a.uploads.Root(), uploads.DirPrefix+"noexpiry-new")
	foreign := filepath.Join(e.a.uploads.Root(), "not-an-upload-dir")
	for _, d := range []string{noExpOld, noExpNew, foreign} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-3 * time.Hour)
	if err := os.Chtimes(noExpOld, old, old); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(foreign, old, old); err != nil {
		t.Fatal(err)
	}
	// A corrupt expiry file falls back to the age as well.
	garbled := e.allocUploadDir(t, `{"expireHour":100}`)
	if err := os.WriteFile(garbled+".expires", []byte("tomorrow-ish"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(garbled, old, old); err != nil {
		t.Fatal(err)
	}

	for _, step := range []struct {
		name    string
		now     time.Time
		removed int
		gone    []string
		kept    []string
	}{
		{"now", time.Now(), 2, []string{noExpOld, garbled}, []string{short, long, noExpNew, foreign}},
		{"in 2h", time.Now().Add(2 * time.Hour), 2, []string{short, noExpNew}, []string{long, foreign}},
		{"in 2h again", time.Now().Add(2 * time.Hour), 0, nil, []string{long, foreign}},
		{"in 6h", time.Now().Add(6 * time.Hour), 1, []string{long}, []string{foreign}},
	} {
		n, err := e.a.uploads.CleanExpired(step.now)
		if err != nil || n != step.removed {
			t.Fatalf("%s: removed %d (%v), want %d", step.name, n, err, step.removed)
		}
		for _, d := range step.gone {
			if exists(d) || exists(d+".expires") {
				t.Fatalf("%s: %s (or its expiry file) still there", step.name, d)
			}
		}
		for _, d := range step.kept {
			if !exists(d) {
				t.Fatalf("%s: %s removed too early", step.name, d)
			}
		}
	}
}

func TestHousekeepingRemovesExpiredAndPrunesJobs(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, func(c *config.Config) { c.JobRetention = time.Nanosecond })
	expired := e.allocUploadDir(t, `{"expireHour":1}`)
	live := e.allocUploadDir(t, `{"expireHour":1}`)
	past := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)
	if err := os.WriteFile(expired+".expires", []byte(past), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := e.do(t, http.MethodPost, "/imagestore/ping-sync/", "{}", map[string]string{"taskuuid": "old-job"}); r.body["success"] != true {
		t.Fatal(r.raw)
	}
	j, ok := e.a.jobs.Get("old-job")
	if !ok {
		t.Fatal("sync job not recorded")
	}
	testwait.For(t, "job end in the past", func() bool {
		in := j.Info()
		return in.Ended != nil && time.Since(*in.Ended) > 0
	})
	e.a.housekeeping()
	if exists(expired) || !exists(live) {
		t.Fatalf("expired kept=%v, live kept=%v", exists(expired), exists(live))
	}
	if _, ok := e.a.jobs.Get("old-job"); ok {
		t.Fatal("finished job older than jobRetention not pruned")
	}
}

func putBlob(t *testing.T, e *htEnv, data []byte) digest.Digest {
	t.Helper()
	d, n, err := e.store.Put(context.Background(), bytes.NewReader(data), int64(len(data)), "")
	if err != nil || n != int64(len(data)) {
		t.Fatalf("put: %d %v", n, err)
	}
	return d
}

func TestPeriodicVerifyQuarantines(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	good := putBlob(t, e, bytes.Repeat([]byte("good "), 1000))
	bad := putBlob(t, e, bytes.Repeat([]byte("soon corrupt "), 1000))
	p, err := e.store.BlobPath(bad)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("X"), 100); err != nil {
		t.Fatal(err)
	}
	f.Close()

	e.a.verify(context.Background())
	if got := testutil.ToFloat64(e.a.m.verifyFailures); got != 1 {
		t.Fatalf("verify failures %v, want 1", got)
	}
	if got := testutil.ToFloat64(e.a.m.verifyRuns); got != 1 {
		t.Fatalf("verify runs %v, want 1", got)
	}
	if e.store.Exists(bad) || !e.store.Exists(good) {
		t.Fatalf("after verify: bad exists=%v good exists=%v", e.store.Exists(bad), e.store.Exists(good))
	}
	q, err := os.ReadDir(filepath.Join(e.a.root, "quarantine"))
	if err != nil || len(q) == 0 {
		t.Fatalf("quarantine dir: %v %v", q, err)
	}
	found := false
	_ = filepath.WalkDir(filepath.Join(e.a.root, "quarantine"), func(path string, d os.DirEntry, err error) error {
		found = found || (err == nil && strings.Contains(path, bad.Encoded()))
		return nil
	})
	if !found {
		t.Fatalf("corrupt blob %s not in the quarantine", bad)
	}
	if _, err := e.store.OpenBlob(context.Background(), bad); err == nil {
		t.Fatal("quarantined blob still readable from the store")
	}
	// A second scrub finds nothing new.
	e.a.verify(context.Background())
	if got := testutil.ToFloat64(e.a.m.verifyFailures); got != 1 {
		t.Fatalf("verify failures after a clean run %v, want 1", got)
	}
	r := e.do(t, http.MethodGet, "/metrics", nil, nil)
	if !strings.Contains(r.raw, "imagestore_agent_verify_failures_total 1\n") || !strings.Contains(r.raw, "imagestore_agent_verify_runs_total 2\n") {
		t.Fatalf("metrics do not show the scrub:\n%.2000s", r.raw)
	}
}

func TestRunLoopVerifiesAndStops(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, func(c *config.Config) { c.VerifyInterval = 5 * time.Millisecond })
	putBlob(t, e, []byte("some blob"))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.a.Run(ctx) }()
	testwait.For(t, "a periodic verify run", func() bool { return testutil.ToFloat64(e.a.m.verifyRuns) >= 1 })
	cancel()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(testwait.Deadline):
		t.Fatal("Run did not stop on cancel")
	}
	if got := testutil.ToFloat64(e.a.m.verifyFailures); got != 0 {
		t.Fatalf("clean store reported %v failures", got)
	}
}

package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestE2EErrors sends the built daemon bad requests and checks each clear
// error; one function (a table and subtests) so they share one daemon start.
func TestE2EErrors(t *testing.T) {
	d := startDaemon(t, daemonOpts{})
	m := newMgmt(t)
	up := d.sync(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1})["uploadDir"].(string)
	file := filepath.Join(up, "db.gz")
	writeRaw(t, file, 4096, 1)
	outside := filepath.Join(t.TempDir(), "outside.raw")
	writeRaw(t, outside, 100, 2)
	if err := os.Symlink(outside, filepath.Join(up, "link.raw")); err != nil {
		t.Fatal(err)
	}
	base := d.async(t, m, "/imagestore/import-backup/", map[string]any{"imgurl": file, "name": "zsbak"})
	mustSucceed(t, "import", base)

	for _, tc := range []struct {
		name, path string
		body       any
		want       string
	}{
		{"bad json", "/imagestore/imginfo/", `{"installPath":`, "bad JSON in request body"},
		{"wrong type", "/imagestore/allocuploaddir/", `{"expireHour":"x"}`, "bad JSON in request body"},
		{"missing field", "/imagestore/imginfo/", map[string]any{}, "missing field installPath"},
		{"missing imgurl", "/imagestore/import-backup/", map[string]any{"name": "x"}, "missing field imgurl"},
		{"missing uuid", "/imagestore/connect/", map[string]any{}, "missing field uuid"},
		{"malformed install path", "/imagestore/imginfo/", map[string]any{"installPath": "zstore://a"}, "not of the form"},
		{"install path traversal", "/imagestore/imgchain/", map[string]any{"installPath": "zstore://../etc"}, "invalid name"},
		{"unknown install path", "/imagestore/imginfo/", map[string]any{"installPath": "zstore://nope/nope"}, "unknown install path zstore://nope/nope"},
		{"unknown export", "/imagestore/export/", map[string]any{"installPath": "zstore://nope/nope"}, "unknown install path"},
		{"escaping upload dir", "/imagestore/import-backup/", map[string]any{"imgurl": "file://" + outside, "name": "x"}, "escapes the upload dirs"},
		{"dotdot escape", "/imagestore/import-backup/", map[string]any{"imgurl": up + "/../../../../etc/passwd", "name": "x"}, "escapes the upload dirs"},
		{"symlink escape", "/imagestore/import-backup/", map[string]any{"imgurl": filepath.Join(up, "link.raw"), "name": "x"}, "escapes the upload dirs"},
		{"relative path", "/imagestore/import-backup/", map[string]any{"imgurl": "db.gz", "name": "x"}, "not an absolute path"},
		{"url scheme", "/imagestore/import-backup/", map[string]any{"imgurl": "http://example.com/x", "name": "x"}, "scheme http is not supported"},
		{"parent not found", "/imagestore/import-backup/", map[string]any{"imgurl": file, "name": "x", "parent": "zstore://x/missing"}, "parent zstore://x/missing not found"},
		{"alloc parent not found", "/imagestore/installpath/allocate", map[string]any{"parent": "zstore://x/missing"}, "parent zstore://x/missing not found"},
		{"bad algorithm", "/imagestore/getimagehash/", map[string]any{"installPath": "zstore://a/b", "alogrithm": "crc"}, "not supported"},
		{"import without url", "/imagestore/import/", map[string]any{}, "missing field imgurl"},
		{"import ftp", "/imagestore/import/", map[string]any{"imgurl": "ftp://example.com/x.qcow2", "name": "x"}, "ftp"},
		{"negative quota", "/imagestore/setquota/", map[string]any{"maxCapacity": -1}, "negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := m.newID()
			r := d.post(t, tc.path, tc.body, map[string]string{"taskuuid": id, "callbackurl": m.srv.URL})
			if r.code != 200 {
				t.Fatalf("status %d: %s", r.code, r.raw)
			}
			var got map[string]any
			syncPath := strings.Contains(tc.path, "allocuploaddir") || strings.Contains(tc.path, "allocate") || strings.Contains(tc.path, "connect")
			if syncPath {
				got = r.body
			} else if r.body["success"] == false {
				got = r.body // rejected inline; the callback must say the same
				cb := m.wait(t, id)
				if cb["success"] != false || cb["error"] != got["error"] {
					t.Fatalf("callback %v differs from inline %v", cb, got)
				}
			} else {
				got = m.wait(t, id)
			}
			if got["success"] != false || !strings.Contains(got["error"].(string), tc.want) {
				t.Fatalf("got %v, want error containing %q", got, tc.want)
			}
		})
	}

	t.Run("missing taskuuid", func(t *testing.T) {
		r := d.post(t, "/imagestore/imginfo/", map[string]any{"installPath": "zstore://a/b"}, nil)
		if r.code != 400 || r.body["success"] != false || !strings.Contains(r.body["error"].(string), "taskuuid") {
			t.Fatalf("%d %s", r.code, r.raw)
		}
	})
	t.Run("body too large", func(t *testing.T) {
		big := `{"uuid":"` + strings.Repeat("a", 2<<20) + `"}`
		r := d.post(t, "/imagestore/connect/", big, nil)
		if r.code != 200 || r.body["success"] != false || !strings.Contains(r.body["error"].(string), "too large") {
			t.Fatalf("%d %.200s", r.code, r.raw)
		}
	})
	t.Run("unknown path", func(t *testing.T) {
		r := d.post(t, "/imagestore/nosuch/", "{}", nil)
		if r.code != 404 || !strings.Contains(r.body["error"].(string), "unknown path") {
			t.Fatalf("%d %s", r.code, r.raw)
		}
	})
	t.Run("sync variant inline error", func(t *testing.T) {
		r := d.post(t, "/imagestore/imginfo-sync/", map[string]any{"installPath": "zstore://nope/nope"}, nil)
		if r.code != 200 || r.body["success"] != false || !strings.Contains(r.body["error"].(string), "unknown install path") {
			t.Fatalf("%d %s", r.code, r.raw)
		}
	})
}

func TestE2ECallbackDown(t *testing.T) {
	d := startDaemon(t, daemonOpts{})
	dead := "http://" + freePortClosed(t) + "/callback"
	r := d.post(t, "/imagestore/ping/", map[string]any{"uuid": "x"}, map[string]string{"taskuuid": "down-1", "callbackurl": dead})
	if r.code != 200 || r.body["success"] != true {
		t.Fatalf("%d %s", r.code, r.raw)
	}
	deadline := time.Now().Add(waitLong)
	for {
		job := d.sync(t, "/imagestore/job/get/", map[string]any{"taskuuid": "down-1"})["job"].(map[string]any)
		cb := job["callback"].(map[string]any)
		if cb["givenUp"] == true {
			if job["state"] != "succeeded" || num(cb["attempts"]) != 3 || cb["delivered"] != false || cb["lastError"] == "" {
				t.Fatalf("job after giving up: %v", job)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("callback never given up: %v", job)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The daemon's stderr reaches d.log() through a pipe, so the line may
	// trail the job state by a moment.
	for !strings.Contains(d.log(), "callback given up") {
		if time.Now().After(deadline) {
			t.Fatal("no log line for the abandoned callback")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestE2ELoad sends 200 requests with queued backup jobs to the built daemon
// while watching that no more than parallelismDegree backup jobs run. One
// function because the watcher and the load share one timeline.
func TestE2ELoad(t *testing.T) {
	const par = 3
	d := startDaemon(t, daemonOpts{parallelism: par})
	m := newMgmt(t)
	up := d.sync(t, "/imagestore/allocuploaddir/", map[string]any{})["uploadDir"].(string)
	var files []string
	for i := range 10 {
		f := filepath.Join(up, fmt.Sprintf("db-%d.raw", i))
		writeRaw(t, f, 1<<20, byte(i))
		files = append(files, f)
	}
	// Watch the job list while the load runs: never more than par backup jobs running.
	stop := make(chan struct{})
	var maxRunning, sawWaiting int
	var watch sync.WaitGroup
	watch.Add(1)
	go func() {
		defer watch.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			r := d.post(t, "/imagestore/job/list/", map[string]any{}, nil)
			jobs, _ := r.body["jobs"].([]any)
			running := 0
			for _, j := range jobs {
				jm := j.(map[string]any)
				if jm["backup"] == true && jm["state"] == "running" {
					running++
				}
				if jm["backup"] == true && jm["state"] == "waiting" {
					sawWaiting++
				}
			}
			maxRunning = max(maxRunning, running)
		}
	}()

	var wg sync.WaitGroup
	errs := make(chan error, 300)
	call := func(path string, body any) {
		defer wg.Done()
		id := m.newID()
		r := d.post(t, path, body, map[string]string{"taskuuid": id, "callbackurl": m.srv.URL})
		if r.code != 200 || r.body["success"] != true {
			errs <- fmt.Errorf("%s: %d %s", path, r.code, r.raw)
			return
		}
		if cb := m.wait(t, id); cb["success"] != true {
			errs <- fmt.Errorf("%s: callback %v", path, cb)
		}
	}
	for i := range 200 {
		wg.Add(1)
		if i%4 == 0 {
			// backup-slot jobs that take long enough to queue
			go call("/imagestore/debug/sleep/", map[string]any{"millis": 20, "backup": true})
		} else {
			go call("/imagestore/ping/", map[string]any{"uuid": "u"})
		}
	}
	for _, f := range files {
		wg.Add(1)
		go call("/imagestore/import-backup/", map[string]any{"imgurl": f, "name": "zsbak"})
	}
	wg.Wait()
	close(stop)
	watch.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if maxRunning > par {
		t.Fatalf("job list showed %d backup jobs running, parallelismDegree %d", maxRunning, par)
	}
	peak := scrapeValue(t, d, "imagestore_agent_backup_jobs_running_peak")
	if peak < 1 || peak > par {
		t.Fatalf("peak running backup jobs %v, want 1..%d", peak, par)
	}
	imgs := scrapeValue(t, d, "imagestore_store_images")
	if imgs != 10 {
		t.Fatalf("store has %v images, want 10", imgs)
	}
	t.Logf("max running seen %d, waiting observations %d, peak %v", maxRunning, sawWaiting, peak)
}

func TestE2ERestartFailsRunningJob(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			d := startDaemon(t, daemonOpts{parallelism: 1})
			r := d.post(t, "/imagestore/debug/sleep/", map[string]any{"millis": 600000, "backup": true}, map[string]string{"taskuuid": "long-1"})
			r2 := d.post(t, "/imagestore/debug/sleep/", map[string]any{"millis": 600000, "backup": true}, map[string]string{"taskuuid": "queued-1"})
			if r.code != 200 || r2.code != 200 {
				t.Fatalf("%s %s", r.raw, r2.raw)
			}
			waitJobState(t, d, "long-1", "running")
			waitJobState(t, d, "queued-1", "waiting")
			code := d.stop(sig)
			if sig == syscall.SIGTERM && code != 0 {
				t.Fatalf("exit code %d after SIGTERM", code)
			}
			d2 := startDaemon(t, daemonOpts{root: d.root})
			for _, id := range []string{"long-1", "queued-1"} {
				job := d2.sync(t, "/imagestore/job/get/", map[string]any{"taskuuid": id})["job"].(map[string]any)
				if job["state"] != "failed" || job["error"] != "interrupted by agent restart" {
					t.Fatalf("%s after restart: %v", id, job)
				}
			}
		})
	}
}

func waitJobState(t *testing.T, d *daemon, id, state string) {
	t.Helper()
	deadline := time.Now().Add(waitLong)
	for time.Now().Before(deadline) {
		r := d.post(t, "/imagestore/job/get/", map[string]any{"taskuuid": id}, nil)
		if job, ok := r.body["job"].(map[string]any); ok && job["state"] == state {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("job %s never reached %s", id, state)
}

func scrape(t *testing.T, d *daemon) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, d.url+"/metrics", nil)
	if d.token != "" {
		req.Header.Set("Authorization", "Bearer "+d.token)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func scrapeValue(t *testing.T, d *daemon, name string) float64 {
	t.Helper()
	for _, line := range strings.Split(scrape(t, d), "\n") {
		if strings.HasPrefix(line, name+" ") {
			var v float64
			if _, err := fmt.Sscanf(strings.TrimPrefix(line, name+" "), "%g", &v); err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return v
		}
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

func TestE2EMetricsPromtool(t *testing.T) {
	d := startDaemon(t, daemonOpts{})
	m := newMgmt(t)
	mustSucceed(t, "ping", d.async(t, m, "/imagestore/ping/", map[string]any{"uuid": "x"}))
	d.post(t, "/imagestore/nosuch/", "{}", nil)
	text := scrape(t, d)
	for _, want := range []string{
		`imagestore_agent_jobs_total{kind="ping",outcome="succeeded"} 1`,
		`imagestore_agent_http_requests_total{code="404",route="unmatched"} 1`,
		`imagestore_store_bytes{kind="free"}`,
		`imagestore_agent_job_duration_seconds_bucket{kind="ping"`,
		`imagestore_store_blobs 0`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not installed: %v", err)
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}

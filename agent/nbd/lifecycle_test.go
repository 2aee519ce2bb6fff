package nbd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestStaleCleanup(t *testing.T) {
	min, max := freeRange(t, 4)
	dir := t.TempDir()
	old, oldLogs := newTestManager(t, dir, min, max)
	ctx := context.Background()
	_, targets, err := old.CreateTargets(ctx, []int64{MiB}, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, top := makeChain(t)
	ro, err := old.ServeOverlay(ctx, top, "top")
	if err != nil {
		t.Fatal(err)
	}
	recs := records(t, dir)
	if len(recs) != 2 {
		t.Fatalf("records %+v", recs)
	}
	// A stray pid file, and a record for a pid that is not ours (this test
	// process): neither may be killed.
	stray := record{ID: "00000000000000aa", PID: os.Getpid(), Port: min, Path: "/x", Started: time.Now()}
	if err := writeRecord(filepath.Join(dir, stray.ID+".json"), stray); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ffffffffffffffff.pid"), []byte(fmt.Sprint(os.Getpid())), 0o600); err != nil {
		t.Fatal(err)
	}

	// The old manager "crashed": its servers still run when a new one
	// starts on the same dir.
	m, _ := newTestManager(t, dir, min, max)
	for _, r := range recs {
		if !waitGone(r.PID, 10*time.Second) {
			t.Fatalf("stale qemu-nbd %d still running", r.PID)
		}
	}
	if _, err := os.Stat(targets[0].Path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale target still there: %v", err)
	}
	if _, err := os.Stat(top); err != nil {
		t.Fatalf("read-only export's file removed: %v", err)
	}
	if left, _ := os.ReadDir(dir); len(left) != 2 || left[0].Name() != "overlays" || left[1].Name() != "targets" {
		t.Fatalf("dir not clean: %v", left)
	}
	if left, _ := os.ReadDir(m.overlayDir()); len(left) != 0 {
		t.Fatalf("stale overlay left: %v", left)
	}
	if left, _ := os.ReadDir(m.TargetDir()); len(left) != 0 {
		t.Fatalf("target dir not clean: %v", left)
	}
	// The old manager notices its servers died.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(oldLogs.String(), "exited unexpectedly") || len(old.List()) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("old manager did not notice: list %+v logs %s", old.List(), oldLogs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The new manager can use the whole range again.
	s, err := m.ServeOverlay(ctx, top, "top")
	if err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", nbdURI(s), top)
	if err := old.Stop(ctx, ro.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("old manager still tracks its dead server: %v", err)
	}
}

func TestUnexpectedExitIsNoticed(t *testing.T) {
	min, max := freeRange(t, 2)
	m, logs := newTestManager(t, t.TempDir(), min, max)
	ctx := context.Background()
	_, top := makeChain(t)
	s, err := m.ServeOverlay(ctx, top, "top")
	if err != nil {
		t.Fatal(err)
	}
	recs := records(t, m.opts.Dir)
	if len(recs) != 1 || recs[0].ID != s.ID {
		t.Fatalf("records %+v", recs)
	}
	if err := syscall.Kill(recs[0].PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(m.List()) != 0 || !strings.Contains(logs.String(), "exited unexpectedly") {
		if time.Now().After(deadline) {
			t.Fatalf("kill not noticed: %+v", m.List())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(records(t, m.opts.Dir)) != 0 {
		t.Fatal("record of a dead read-only server kept")
	}
	if err := m.Stop(ctx, s.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Stop of dead server: %v", err)
	}
}

func TestConcurrentAndClose(t *testing.T) {
	const n = 6
	min, max := freeRange(t, n)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	ctx := context.Background()
	_, top := makeChain(t)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if i%2 == 0 {
				_, err = m.ServeOverlay(ctx, top, fmt.Sprintf("e%d", i))
			} else {
				_, _, err = m.CreateTargets(ctx, []int64{MiB}, time.Hour)
			}
			m.List()
			m.Count()
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	seen := map[int]bool{}
	for _, s := range m.List() {
		if seen[s.Port] {
			t.Fatalf("port %d used twice", s.Port)
		}
		seen[s.Port] = true
	}
	if w, r := m.Count(); w != n/2 || r != n/2 {
		t.Fatalf("Count = %d, %d", w, r)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if w, r := m.Count(); w+r != 0 {
		t.Fatalf("after Close: %d %d", w, r)
	}
	if entries, _ := os.ReadDir(m.TargetDir()); len(entries) != 0 {
		t.Fatalf("Close left %d targets", len(entries))
	}
	if left, _ := os.ReadDir(m.opts.Dir); len(left) != 2 || left[0].Name() != "overlays" || left[1].Name() != "targets" {
		t.Fatalf("Close left %v", left)
	}
	if left, _ := os.ReadDir(m.overlayDir()); len(left) != 0 {
		t.Fatalf("Close left overlays %v", left)
	}
	if _, err := m.ServeOverlay(ctx, top, "x"); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}

func TestIsOurCmdline(t *testing.T) {
	pf := "/var/lib/imagestore/nbd/0123456789abcdef.pid"
	tests := []struct {
		cl   string
		want bool
	}{
		{"/usr/bin/qemu-nbd\x00-f\x00qcow2\x00--pid-file=" + pf + "\x00/x\x00", true},
		{"qemu-nbd\x00--pid-file=" + pf + "\x00", true},
		{"/usr/bin/qemu-nbd\x00--pid-file=/other/0123456789abcdef.pid\x00", false},
		{"/bin/sh\x00-c\x00--pid-file=" + pf + "\x00", false},
		{"qemu-nbd\x00", false},
		{"", false},
	}
	for _, tc := range tests {
		if got := isOurCmdline([]byte(tc.cl), pf); got != tc.want {
			t.Errorf("isOurCmdline(%q) = %v", tc.cl, got)
		}
	}
}

func TestDialHost(t *testing.T) {
	for in, want := range map[string]string{
		"0.0.0.0": "127.0.0.1", "::": "::1", "127.0.0.1": "127.0.0.1", "10.1.2.3": "10.1.2.3", "host": "host",
	} {
		if got := dialHost(in); got != want {
			t.Errorf("dialHost(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzParseRecord(f *testing.F) {
	f.Add([]byte(`{"id":"0123456789abcdef","pid":1234,"port":10809,"path":"/ws/nbd-0011223344556677-0.qcow2","target":true,"desc":"nbd-0011223344556677","started":"2024-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"id":"0123456789abcdef","pid":1234,"port":10809,"path":"/etc/passwd","target":true,"desc":"nbd-1"}`))
	f.Add([]byte(`{"id":"0123456789abcdef","pid":1234,"path":"/s/blobs/ab/cd","readOnly":true,"exportName":"x"}`))
	f.Add([]byte(`{"id":"../../x","pid":1}`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseRecord(b)
		if err != nil {
			return
		}
		if r.PID <= 1 || len(r.ID) != 16 || !filepath.IsAbs(r.Path) {
			t.Fatalf("accepted %+v", r)
		}
		if r.Target && (!strings.HasPrefix(filepath.Base(r.Path), r.Desc+"-") || !strings.HasSuffix(r.Path, ".qcow2")) {
			t.Fatalf("accepted target %+v", r)
		}
	})
}

func FuzzCheckGreeting(f *testing.F) {
	f.Add([]byte("NBDMAGICIHAVEOPT\x00\x03"))
	f.Add([]byte("NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53"))
	f.Add([]byte("SSH-2.0-OpenSSH_9.2"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if checkGreeting(b) == nil && (len(b) < 18 || string(b[:8]) != nbdMagic || b[17]&1 == 0) {
			t.Fatalf("accepted %q", b)
		}
	})
}

// TestTargetsArePrivate: targets live in the manager's own target dir
// (0700, not a host upload dir); TargetPath accepts only released targets
// there, never a symlink, a served group's file or anything else; released
// targets are swept after their retention.
func TestTargetsArePrivate(t *testing.T) {
	min, max := freeRange(t, 3)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	ctx := context.Background()
	if fi, err := os.Stat(m.TargetDir()); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("target dir: %v %v", fi, err)
	}
	desc, servers, err := m.CreateTargets(ctx, []int64{MiB, MiB}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if p, ok := m.TargetPath(servers[0].Path); ok {
		t.Fatalf("TargetPath accepted %s while it is served", p)
	}
	if _, err := m.Release(ctx, desc); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(m.TargetDir(), "nbd-00112233445566ff-0.qcow2")
	if err := os.Symlink(servers[0].Path, link); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(t.TempDir(), filepath.Base(servers[0].Path))
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", outside, "1M")
	for _, tc := range []struct {
		path string
		want bool
	}{
		{servers[0].Path, true},
		{servers[1].Path, true},
		{filepath.Join(m.TargetDir(), "x", "..", filepath.Base(servers[1].Path)), true},
		{link, false},
		{outside, false},
		{filepath.Join(m.TargetDir(), "nbd-0011223344556677-9.qcow2"), false}, // missing
		{filepath.Join(m.TargetDir(), "other.qcow2"), false},
		{m.TargetDir(), false},
		{"relative/" + filepath.Base(servers[0].Path), false},
	} {
		if got, ok := m.TargetPath(tc.path); ok != tc.want || (ok && filepath.Dir(got) != m.TargetDir()) {
			t.Errorf("TargetPath(%s) = %q, %v; want %v", tc.path, got, ok, tc.want)
		}
	}
	if err := os.Remove(link); err != nil {
		t.Fatal(err)
	}
	// Released targets stay for the retention, then go; served ones stay.
	_, live, err := m.CreateTargets(ctx, []int64{MiB}, 0)
	if err != nil {
		t.Fatal(err)
	}
	m.Expire(ctx, time.Now())
	for _, s := range servers {
		if _, err := os.Stat(s.Path); err != nil {
			t.Fatalf("released target removed within retention: %v", err)
		}
	}
	m.Expire(ctx, time.Now().Add(25*time.Hour))
	for _, s := range servers {
		if _, err := os.Stat(s.Path); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("released target kept past retention: %v", err)
		}
	}
	if _, err := os.Stat(live[0].Path); err != nil {
		t.Fatalf("served target swept: %v", err)
	}
}

// TestReleaseSettlesTargets: a target is served with --cache=unsafe, so
// its bytes are trusted only after a clean exit. Release fsyncs a cleanly
// stopped target and keeps it for the import; a target whose qemu-nbd
// died (SIGKILL: its qcow2 metadata may never have been written) is
// removed, and Release says so, so no import can read a torn file.
func TestReleaseSettlesTargets(t *testing.T) {
	min, max := freeRange(t, 2)
	dir := t.TempDir()
	m, _ := newTestManager(t, dir, min, max)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		kill bool
	}{{"clean stop", false}, {"qemu-nbd killed", true}} {
		t.Run(tc.name, func(t *testing.T) {
			desc, servers, err := m.CreateTargets(ctx, []int64{MiB}, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if tc.kill {
				pid := readPidFile(filepath.Join(dir, servers[0].ID+".pid"))
				if pid <= 0 {
					t.Fatalf("no pid for %s", servers[0].ID)
				}
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
			}
			_, err = m.Release(ctx, desc)
			_, ok := m.TargetPath(servers[0].Path)
			_, statErr := os.Stat(servers[0].Path)
			if tc.kill {
				if err == nil || !strings.Contains(err.Error(), "removed") {
					t.Fatalf("Release after a killed qemu-nbd: %v, want an error saying the target was removed", err)
				}
				if ok || !errors.Is(statErr, os.ErrNotExist) {
					t.Fatalf("the killed server's target is still there (TargetPath %v, stat %v)", ok, statErr)
				}
				return
			}
			if err != nil || !ok || statErr != nil {
				t.Fatalf("clean release: err %v, TargetPath %v, stat %v", err, ok, statErr)
			}
			run(t, "qemu-img", "check", "-q", servers[0].Path)
		})
	}
}

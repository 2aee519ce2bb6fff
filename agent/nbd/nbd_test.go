package nbd

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"imagestore/internal/lockedbuf"
)

const MiB = 1 << 20

func needTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-nbd", "qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: %v", tool, err)
		}
	}
}

// freeRange returns a range with room for n servers: n+20 ports, so a
// port someone takes meanwhile (the manager skips busy ports) costs nothing.
func freeRange(t *testing.T, n int) (int, int) {
	t.Helper()
	min, _ := portBlock(t, n+20)
	return min, min + n + 19
}

// portBlock finds n consecutive ports on 127.0.0.1 that are free right
// now, outside the kernel's ephemeral range: ports in it are handed to
// every outgoing connection and every listen on :0 of parallel tests.
func portBlock(t *testing.T, n int) (int, int) {
	t.Helper()
	lo, hi := 32768, 60999
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if _, err := fmt.Sscan(string(b), &lo, &hi); err != nil {
			t.Fatalf("ip_local_port_range %q: %v", b, err)
		}
	}
	// Candidate bases: [10000, lo) and (hi, 65535], each leaving room for n.
	var spans [][2]int
	if lo-n > 10000 {
		spans = append(spans, [2]int{10000, lo - n})
	}
	if 65535-n+1 > hi+1 {
		spans = append(spans, [2]int{hi + 1, 65535 - n + 1})
	}
	if len(spans) == 0 {
		t.Fatalf("no room for %d ports outside the ephemeral range %d-%d", n, lo, hi)
	}
	for try := 0; try < 200; try++ {
		sp := spans[rand.Intn(len(spans))]
		p := sp[0] + rand.Intn(sp[1]-sp[0])
		ok := true
		for q := p; q < p+n && ok; q++ {
			l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", q))
			if err != nil {
				ok = false
				break
			}
			l.Close()
		}
		if ok {
			return p, p + n - 1
		}
	}
	t.Fatalf("no block of %d free ports", n)
	return 0, 0
}

func newTestManager(t *testing.T, dir string, min, max int) (*Manager, *lockedbuf.Buffer) {
	t.Helper()
	needTools(t)
	logs := &lockedbuf.Buffer{}
	m, err := NewManager(Options{
		Dir: dir, PortMin: min, PortMax: max, Bind: "127.0.0.1",
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m, logs
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// writeSource makes a raw image with data, zero and sparse stretches.
func writeSource(t *testing.T, path string, size int64, seed int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(seed))
	buf := make([]byte, 64*1024)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if r.Intn(3) == 0 {
			continue // hole
		}
		n := min(int64(len(buf)), size-off)
		r.Read(buf[:n])
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
	}
}

func nbdURI(s Server) string {
	return fmt.Sprintf("nbd://127.0.0.1:%d/%s", s.Port, s.ExportName)
}

func fileState(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x %d %s", sha256.Sum256(b), fi.Size(), fi.ModTime().Format(time.RFC3339Nano))
}

func records(t *testing.T, dir string) []record {
	t.Helper()
	ms, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	var out []record
	for _, f := range ms {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		r, err := parseRecord(b)
		if err != nil {
			t.Fatalf("record %s: %v", f, err)
		}
		out = append(out, r)
	}
	return out
}

func TestTargetsWriteReleaseCompare(t *testing.T) {
	min, max := freeRange(t, 4)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	ctx := context.Background()
	sizes := []int64{4 * MiB, 6*MiB + 512}
	desc, servers, err := m.CreateTargets(ctx, sizes, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(servers) != 2 || servers[0].Port == servers[1].Port {
		t.Fatalf("servers %+v", servers)
	}
	if w, r := m.Count(); w != 2 || r != 0 {
		t.Fatalf("Count = %d, %d", w, r)
	}
	srcs := make([]string, len(servers))
	for i, s := range servers {
		if s.ReadOnly || s.Description != desc || s.Port < min || s.Port > max || filepath.Dir(s.Path) != m.TargetDir() || s.Expires.IsZero() {
			t.Fatalf("server %d: %+v", i, s)
		}
		src := filepath.Join(t.TempDir(), "src.raw")
		srcs[i] = src
		writeSource(t, src, sizes[i], int64(i+1))
		// A QEMU-style writer fills the target, then a second client reads
		// it back through the same (persistent) server.
		run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, nbdURI(s))
		run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, nbdURI(s))
	}
	released, err := m.Release(ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	if len(released) != 2 || len(m.List()) != 0 || len(records(t, m.opts.Dir)) != 0 {
		t.Fatalf("after release: %+v, list %+v", released, m.List())
	}
	for i, s := range released {
		if s.Path != servers[i].Path {
			t.Fatalf("released %+v, created %+v", s, servers[i])
		}
		run(t, "qemu-img", "check", "-f", "qcow2", s.Path)
		run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", srcs[i], s.Path)
	}
	if _, err := m.Release(ctx, desc); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Release: %v", err)
	}
	if err := m.Cancel(ctx, desc); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Cancel after Release: %v", err)
	}
}

// makeChain builds base <- mid <- top with relative backing names and a
// distinct pattern written in each layer.
func makeChain(t *testing.T) (dir, top string) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "layers")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := func(args ...string) {
		t.Helper()
		c := exec.Command(args[0], args[1:]...)
		c.Dir = dir
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	cmd("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M")
	cmd("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x12 6M 1M", "base.qcow2")
	cmd("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
	cmd("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 1M 1M", "-c", "write -z 6M 512k", "mid.qcow2")
	cmd("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
	cmd("qemu-io", "-f", "qcow2", "-c", "write -P 0x31 2M 64k", "-c", "write -P 0x32 7M 1M", "top.qcow2")
	return dir, filepath.Join(dir, "top.qcow2")
}

func TestServeReadOnlyChain(t *testing.T) {
	min, max := freeRange(t, 3)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	dir, top := makeChain(t)
	ctx := context.Background()
	before := map[string]string{}
	for _, f := range []string{"base.qcow2", "mid.qcow2", "top.qcow2"} {
		before[f] = fileState(t, filepath.Join(dir, f))
	}
	s, err := m.ServeReadOnly(ctx, top, "chain-top")
	if err != nil {
		t.Fatal(err)
	}
	if !s.ReadOnly || s.ExportName != "chain-top" || s.Path != top || s.Port < min || s.Port > max {
		t.Fatalf("server %+v", s)
	}
	if w, r := m.Count(); w != 0 || r != 1 {
		t.Fatalf("Count = %d, %d", w, r)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", nbdURI(s), top)

	// A write through NBD must fail, whether at open or at the write.
	out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 512", nbdURI(s)).CombinedOutput()
	if err == nil && !strings.Contains(strings.ToLower(string(out)), "read-only") &&
		!strings.Contains(strings.ToLower(string(out)), "failed") {
		t.Fatalf("write through read-only export succeeded: %s", out)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", nbdURI(s), top)

	if err := m.Stop(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if len(m.List()) != 0 || len(records(t, m.opts.Dir)) != 0 {
		t.Fatalf("after Stop: %+v", m.List())
	}
	if err := m.Stop(ctx, s.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Stop: %v", err)
	}
	for f, st := range before {
		if got := fileState(t, filepath.Join(dir, f)); got != st {
			t.Fatalf("%s changed: %s -> %s", f, st, got)
		}
	}
}

func TestInvalidArguments(t *testing.T) {
	min, max := freeRange(t, 1)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	ctx := context.Background()
	ws := t.TempDir()
	file := filepath.Join(ws, "f.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", file, "1M")
	tests := []struct {
		name string
		call func() error
	}{
		{"no sizes", func() error { _, _, err := m.CreateTargets(ctx, nil, 0); return err }},
		{"zero size", func() error { _, _, err := m.CreateTargets(ctx, []int64{MiB, 0}, 0); return err }},
		{"empty export", func() error { _, err := m.ServeReadOnly(ctx, file, ""); return err }},
		{"slash in export", func() error { _, err := m.ServeReadOnly(ctx, file, "a/b"); return err }},
		{"space in export", func() error { _, err := m.ServeReadOnly(ctx, file, "a b"); return err }},
		{"long export", func() error { _, err := m.ServeReadOnly(ctx, file, strings.Repeat("x", 256)); return err }},
		{"serve a directory", func() error { _, err := m.ServeReadOnly(ctx, ws, "x"); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
		})
	}
	if _, err := m.ServeReadOnly(ctx, filepath.Join(ws, "missing"), "x"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
	if entries, _ := os.ReadDir(ws); len(entries) != 1 {
		t.Fatalf("workspace has %d entries", len(entries))
	}
	for _, o := range []Options{
		{Dir: "", PortMin: 1, PortMax: 2},
		{Dir: "x", PortMin: 0, PortMax: 2},
		{Dir: "x", PortMin: 5, PortMax: 4},
		{Dir: "x", PortMin: 5, PortMax: 70000},
		{Dir: "x", PortMin: 5, PortMax: 6, Shared: -1},
	} {
		if _, err := NewManager(o); !errors.Is(err, ErrInvalid) {
			t.Fatalf("NewManager(%+v) = %v", o, err)
		}
	}
	if _, err := NewManager(Options{Dir: t.TempDir(), PortMin: 1, PortMax: 2, QemuNBD: "/nonexistent/qemu-nbd"}); err == nil {
		t.Fatal("missing qemu-nbd accepted")
	}
}

func TestPortExhaustion(t *testing.T) {
	min, max := portBlock(t, 2)
	// Someone else holds the first port: it must be skipped, and the
	// range then runs out.
	busy, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", min))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	m, _ := newTestManager(t, t.TempDir(), min, max)
	ctx := context.Background()
	_, _, err = m.CreateTargets(ctx, []int64{MiB, MiB}, 0)
	if !errors.Is(err, ErrNoPort) || !strings.Contains(err.Error(), fmt.Sprintf("%d-%d", min, max)) {
		t.Fatalf("err = %v, want ErrNoPort naming the range", err)
	}
	if entries, _ := os.ReadDir(m.TargetDir()); len(entries) != 0 {
		t.Fatalf("failed create left %d files", len(entries))
	}
	if w, r := m.Count(); w != 0 || r != 0 || len(records(t, m.opts.Dir)) != 0 {
		t.Fatalf("failed create left servers: %d %d", w, r)
	}
	// One target fits, on the port nobody holds.
	_, servers, err := m.CreateTargets(ctx, []int64{MiB}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if servers[0].Port != max {
		t.Fatalf("port %d, want %d", servers[0].Port, max)
	}
	file := filepath.Join(t.TempDir(), "f.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", file, "1M")
	if _, err := m.ServeReadOnly(ctx, file, "f"); !errors.Is(err, ErrNoPort) {
		t.Fatalf("ServeReadOnly with full range: %v", err)
	}
}

func TestCancelRemovesTargets(t *testing.T) {
	min, max := freeRange(t, 3)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	ctx := context.Background()
	desc, servers, err := m.CreateTargets(ctx, []int64{MiB, 2 * MiB}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Cancel(ctx, desc); err != nil {
		t.Fatal(err)
	}
	for _, s := range servers {
		if _, err := os.Stat(s.Path); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("target %s still there: %v", s.Path, err)
		}
		if err := probe(ctx, fmt.Sprintf("127.0.0.1:%d", s.Port)); err == nil {
			t.Fatalf("port %d still serving", s.Port)
		}
	}
	if w, r := m.Count(); w+r != 0 || len(records(t, m.opts.Dir)) != 0 {
		t.Fatalf("left: %d %d", w, r)
	}
	if err := m.Cancel(ctx, desc); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Cancel: %v", err)
	}
	// The freed ports serve again.
	if _, _, err := m.CreateTargets(ctx, []int64{MiB, MiB, MiB}, 0); err != nil {
		t.Fatal(err)
	}
}

func TestExpire(t *testing.T) {
	min, max := freeRange(t, 3)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	ctx := context.Background()
	short, shortSrv, err := m.CreateTargets(ctx, []int64{MiB, MiB}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	_, neverSrv, err := m.CreateTargets(ctx, []int64{MiB}, 0)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if n := m.Expire(ctx, now); n != 0 {
		t.Fatalf("Expire(now) = %d", n)
	}
	if n := m.Expire(ctx, now.Add(2*time.Hour)); n != 1 {
		t.Fatalf("Expire(+2h) = %d", n)
	}
	for _, s := range shortSrv {
		if _, err := os.Stat(s.Path); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("expired target %s still there", s.Path)
		}
	}
	if _, err := os.Stat(neverSrv[0].Path); err != nil {
		t.Fatalf("unexpiring target: %v", err)
	}
	if l := m.List(); len(l) != 1 || l[0].ID != neverSrv[0].ID {
		t.Fatalf("List = %+v", l)
	}
	if err := m.Cancel(ctx, short); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Cancel expired: %v", err)
	}
	if n := m.Expire(ctx, now.Add(100*365*24*time.Hour)); n != 0 {
		t.Fatalf("Expire of a never-expiring group = %d", n)
	}
}

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
	ro, err := old.ServeReadOnly(ctx, top, "top")
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
	if left, _ := os.ReadDir(dir); len(left) != 1 || left[0].Name() != "targets" {
		t.Fatalf("dir not clean: %v", left)
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
	s, err := m.ServeReadOnly(ctx, top, "top")
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
	s, err := m.ServeReadOnly(ctx, top, "top")
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
				_, err = m.ServeReadOnly(ctx, top, fmt.Sprintf("e%d", i))
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
	if left, _ := os.ReadDir(m.opts.Dir); len(left) != 1 || left[0].Name() != "targets" {
		t.Fatalf("Close left %v", left)
	}
	if _, err := m.ServeReadOnly(ctx, top, "x"); !errors.Is(err, ErrClosed) {
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

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
	"testing"
	"time"

	"imagestore/internal/lockedbuf"
	"imagestore/qcow2"
	"imagestore/transfer/nbdserve"
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

// TestServeOverlayChain: a chain served for a guest to run on takes
// writes and discards into a private overlay; the chain's files never
// change, and Stop removes the overlay.
func TestServeOverlayChain(t *testing.T) {
	min, max := freeRange(t, 3)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	dir, top := makeChain(t)
	ctx := context.Background()
	before := map[string]string{}
	for _, f := range []string{"base.qcow2", "mid.qcow2", "top.qcow2"} {
		before[f] = fileState(t, filepath.Join(dir, f))
	}
	s, err := m.ServeOverlay(ctx, top, "chain-top")
	if err != nil {
		t.Fatal(err)
	}
	if s.ReadOnly || s.ExportName != "chain-top" || filepath.Dir(s.Path) != m.overlayDir() || s.Port < min || s.Port > max {
		t.Fatalf("server %+v", s)
	}
	if w, r := m.Count(); w != 0 || r != 1 {
		t.Fatalf("Count = %d, %d", w, r)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", nbdURI(s), top)
	// A second export of the same chain has its own overlay.
	s2, err := m.ServeOverlay(ctx, top, "chain-top")
	if err != nil {
		t.Fatal(err)
	}
	if s2.Path == s.Path || s2.Port == s.Port {
		t.Fatalf("two exports share %s / port %d", s.Path, s.Port)
	}

	// The guest writes and discards; it reads back what it wrote.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 65536", "-c", "discard 131072 65536", "-c", "read -P 0x77 0 65536",
		"-c", "read -P 0 131072 65536", nbdURI(s))
	if err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "qcow2", nbdURI(s), top).Run(); err == nil {
		t.Fatal("the guest's writes are not visible")
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", nbdURI(s2), top)

	for _, id := range []string{s.ID, s2.ID} {
		if err := m.Stop(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if len(m.List()) != 0 || len(records(t, m.opts.Dir)) != 0 {
		t.Fatalf("after Stop: %+v", m.List())
	}
	if left, _ := os.ReadDir(m.overlayDir()); len(left) != 0 {
		t.Fatalf("overlays left after Stop: %v", left)
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
		{"empty export", func() error { _, err := m.ServeOverlay(ctx, file, ""); return err }},
		{"slash in export", func() error { _, err := m.ServeOverlay(ctx, file, "a/b"); return err }},
		{"space in export", func() error { _, err := m.ServeOverlay(ctx, file, "a b"); return err }},
		{"long export", func() error { _, err := m.ServeOverlay(ctx, file, strings.Repeat("x", 256)); return err }},
		{"serve a directory", func() error { _, err := m.ServeOverlay(ctx, ws, "x"); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
		})
	}
	if _, err := m.ServeOverlay(ctx, filepath.Join(ws, "missing"), "x"); !errors.Is(err, os.ErrNotExist) {
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
	if _, err := m.ServeOverlay(ctx, file, "f"); !errors.Is(err, ErrNoPort) {
		t.Fatalf("ServeOverlay with full range: %v, want ErrNoPort", err)
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

// TestServeOverlayNBD: the overlay's backing is our own NBD server
// (transfer/nbdserve) serving the chain's guest view, not a file: the
// guest sees the chain, its writes land in the overlay, the chain's files
// never change, and Stop removes the overlay and hangs up on the server.
func TestServeOverlayNBD(t *testing.T) {
	min, max := freeRange(t, 2)
	m, _ := newTestManager(t, t.TempDir(), min, max)
	dir, top := makeChain(t)
	ctx := context.Background()
	before := map[string]string{}
	var layers []*qcow2.Image
	for _, f := range []string{"top.qcow2", "mid.qcow2", "base.qcow2"} {
		before[f] = fileState(t, filepath.Join(dir, f))
		fh, err := os.Open(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		defer fh.Close()
		fi, _ := fh.Stat()
		im, err := qcow2.Open(fh, fi.Size())
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, im)
	}
	chain, err := qcow2.NewChain(layers...)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := nbdserve.New(nbdserve.Options{Export: nbdserve.Export{Name: "chain", Size: chain.VirtualSize(), Data: chain, Extents: chain.Extents}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := srv.ListenUnix(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	for _, bad := range []string{"nbd://127.0.0.1:1/x", "/etc/passwd", "json:{}"} {
		if _, err := m.ServeOverlayNBD(ctx, bad, chain.VirtualSize(), "x"); !errors.Is(err, ErrInvalid) {
			t.Errorf("backing %q: want ErrInvalid, got %v", bad, err)
		}
	}
	s, err := m.ServeOverlayNBD(ctx, l.URI(), chain.VirtualSize(), "chain-top")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(s.Path) != m.overlayDir() || s.ExportName != "chain-top" {
		t.Fatalf("server %+v", s)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", nbdURI(s), top)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 65536", "-c", "discard 131072 65536", "-c", "read -P 0x77 0 65536",
		"-c", "read -P 0 131072 65536", "-c", "read -P 0x32 7M 1M", nbdURI(s))
	if err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "qcow2", nbdURI(s), top).Run(); err == nil {
		t.Fatal("the guest's writes are not visible")
	}
	if err := m.Stop(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(m.overlayDir()); len(left) != 0 {
		t.Fatalf("overlays left after Stop: %v", left)
	}
	for f, st := range before {
		if got := fileState(t, filepath.Join(dir, f)); got != st {
			t.Fatalf("%s changed: %s -> %s", f, st, got)
		}
	}
	// The chain server still serves the unchanged chain.
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", l.URI(), top)
}

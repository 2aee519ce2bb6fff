package nbdserve

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"imagestore/qcow2"
	"imagestore/qcow2/qemutest"
)

// chainFixture builds a two-layer qcow2 chain with qemu-img and opens it
// with our reader. top.qcow2 is what qemu reads the same chain from.
func chainFixture(t *testing.T) (*qcow2.Chain, string) {
	t.Helper()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, base, 64<<20, "")
	qemutest.IO(t, base, "write -P 0x11 0 1M", "write -P 0x22 10M 4M", "write -P 0x33 63M 1M")
	qemutest.Create(t, top, 64<<20, "", "-b", base, "-F", "qcow2")
	qemutest.IO(t, top, "write -P 0x44 512k 1M", "write -z 10M 1M", "write -P 0x55 40M 64k")
	var layers []*qcow2.Image
	for _, p := range []string{top, base} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		fi, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		im, err := qcow2.Open(f, fi.Size())
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, im)
	}
	c, err := qcow2.NewChain(layers...)
	if err != nil {
		t.Fatal(err)
	}
	return c, top
}

func serveChain(t *testing.T, c *qcow2.Chain, opts Options) *Listening {
	t.Helper()
	opts.Export = Export{Name: "chain", Size: c.VirtualSize(), Data: opts.Export.Data, Extents: c.Extents}
	if opts.Export.Data == nil {
		opts.Export.Data = c
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	l, err := s.ListenUnix(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// qemuIO runs qemu-io commands on a raw NBD export and fails on any
// failed command (qemu-io exits 0 after one).
func qemuIO(t *testing.T, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-r", "-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := string(qemutest.Run(t, "qemu-io", append(args, uri)...))
	if strings.Contains(out, "fail") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io %q: %s", cmds, out)
	}
	return out
}

// TestQemuReadsChain: qemu's NBD client sees exactly the chain's guest
// view, keeps its zero ranges sparse (base:allocation) and cannot write.
func TestQemuReadsChain(t *testing.T) {
	c, top := chainFixture(t)
	l := serveChain(t, c, Options{})
	uri := l.URI()

	t.Run("compare", func(t *testing.T) {
		qemutest.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, top)
	})
	t.Run("patterns", func(t *testing.T) {
		qemuIO(t, uri, "read -P 0x11 0 512k", "read -P 0x44 512k 1M", "read -P 0 10M 1M",
			"read -P 0x22 11M 3M", "read -P 0x55 40M 64k", "read -P 0x33 63M 1M", "read -P 0 20M 1M")
	})
	t.Run("map", func(t *testing.T) {
		out := qemutest.Run(t, "qemu-img", "map", "-f", "raw", "--output=json", uri)
		var entries []struct {
			Start, Length int64
			Data, Zero    bool
		}
		if err := json.Unmarshal(out, &entries); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		ext, _ := c.Extents()
		var want, got []qcow2.Extent
		for _, e := range ext {
			if e.Kind == qcow2.Data {
				want = append(want, qcow2.Extent{Offset: e.Offset, Length: e.Length})
			}
		}
		for _, e := range entries {
			if !e.Data {
				if !e.Zero {
					t.Errorf("range %d+%d: neither data nor zero", e.Start, e.Length)
				}
				continue
			}
			if n := len(got); n > 0 && got[n-1].End() == e.Start {
				got[n-1].Length += e.Length
			} else {
				got = append(got, qcow2.Extent{Offset: e.Start, Length: e.Length})
			}
		}
		if len(got) != len(want) || len(want) < 3 {
			t.Fatalf("qemu-img map data ranges %v, want %v", got, want)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("qemu-img map data ranges %v, want %v", got, want)
			}
		}
	})
	t.Run("convert sparse", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "out.raw")
		qemutest.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", "-m", "8", uri, out)
		qemutest.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, top)
		var st syscall.Stat_t
		if err := syscall.Stat(out, &st); err != nil {
			t.Fatal(err)
		}
		// Data: 1.5 MiB + 3 MiB + 64 KiB + 1 MiB; the rest of 64 MiB is holes.
		if used := st.Blocks * 512; used > 8<<20 {
			t.Errorf("converted raw uses %d bytes on disk; zero ranges were written", used)
		}
	})
	t.Run("read-only", func(t *testing.T) {
		out, err := qemutest.RunErr("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4k", uri)
		if err == nil && !strings.Contains(string(out), "failed") {
			t.Fatalf("a write to the export succeeded: %s", out)
		}
		qemuIO(t, uri, "read -P 0x11 0 4k")
	})
	t.Run("unknown export", func(t *testing.T) {
		bad := strings.Replace(uri, "/chain?", "/other?", 1)
		if out, err := qemutest.RunErr("qemu-img", "info", "-f", "raw", bad); err == nil {
			t.Fatalf("export %q opened: %s", bad, out)
		}
	})
	t.Run("close", func(t *testing.T) {
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Dir(l.Socket)); !os.IsNotExist(err) {
			t.Fatalf("socket dir after Close: %v", err)
		}
		if out, err := qemutest.RunErr("qemu-img", "info", "-f", "raw", uri); err == nil {
			t.Fatalf("export still answers after Close: %s", out)
		}
	})
}

// gate is an io.ReaderAt that records how many reads run at once and
// holds each read until want of them run together (or a second passes,
// so a client that never overlaps does not hang the test).
type gate struct {
	r    io.ReaderAt
	want int

	mu      sync.Mutex
	cond    *sync.Cond
	now, hi int
}

func (g *gate) ReadAt(p []byte, off int64) (int, error) {
	g.mu.Lock()
	g.now++
	g.hi = max(g.hi, g.now)
	g.cond.Broadcast()
	deadline := time.AfterFunc(time.Second, func() { g.mu.Lock(); g.cond.Broadcast(); g.mu.Unlock() })
	start := time.Now()
	for g.hi < g.want && time.Since(start) < time.Second {
		g.cond.Wait()
	}
	deadline.Stop()
	g.mu.Unlock()
	n, err := g.r.ReadAt(p, off)
	g.mu.Lock()
	g.now--
	g.mu.Unlock()
	return n, err
}

// TestConcurrentReads: requests a client sends without waiting are read
// at the same time, and small request and buffer bounds still serve
// everything.
func TestConcurrentReads(t *testing.T) {
	c, top := chainFixture(t)
	g := &gate{r: c, want: 3}
	g.cond = sync.NewCond(&g.mu)
	l := serveChain(t, c, Options{Export: Export{Data: g}, MaxRequest: 64 << 10, MaxBuffered: 256 << 10, MaxInFlight: 4})
	qemuIO(t, l.URI(), "aio_read -P 0x44 512k 64k", "aio_read -P 0x22 11M 64k", "aio_read -P 0 10M 64k", "aio_flush")
	g.mu.Lock()
	hi := g.hi
	g.mu.Unlock()
	if hi < 3 {
		t.Fatalf("at most %d reads ran at once, want 3", hi)
	}
	// 64 KiB requests through a 256 KiB budget: everything still arrives.
	qemutest.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", l.URI(), top)
	g.mu.Lock()
	hi = g.hi
	g.mu.Unlock()
	if hi > 4 {
		t.Fatalf("%d reads ran at once, MaxInFlight is 4", hi)
	}
}

// TestRawExport: an export without extents (a raw blob) offers no
// metadata context, and qemu reads it as all data.
func TestRawExport(t *testing.T) {
	data := bytes.Repeat([]byte{0xab}, 1<<20)
	s, err := New(Options{Export: Export{Name: "raw", Size: int64(len(data)), Data: bytes.NewReader(data)}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := s.ListenUnix(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	qemuIO(t, l.URI(), "read -P 0xab 0 1M")
	out := qemutest.Run(t, "qemu-img", "map", "-f", "raw", "--output=json", l.URI())
	if !bytes.Contains(out, []byte(`"data": true`)) || bytes.Contains(out, []byte(`"data": false`)) {
		t.Fatalf("qemu-img map of a raw export: %s", out)
	}
}

// BenchmarkConvert: qemu-img convert of a 256 MiB fully allocated qcow2
// image to raw, reading the file in place ("file") or its guest view
// through our reader and this server ("nbdserve"), -m 8 both.
func BenchmarkConvert(b *testing.B) {
	const size = 256 << 20
	dir := b.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	qemutest.Create(b, img, size, "")
	var cmds []string
	for off := int64(0); off < size; off += 16 << 20 {
		cmds = append(cmds, "write -P "+strconv.Itoa(int(off>>20)%251+1)+" "+strconv.FormatInt(off, 10)+" 16M")
	}
	qemutest.IO(b, img, cmds...)
	f, err := os.Open(img)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	im, err := qcow2.Open(f, fi.Size())
	if err != nil {
		b.Fatal(err)
	}
	c, err := qcow2.NewChain(im)
	if err != nil {
		b.Fatal(err)
	}
	s, err := New(Options{Export: Export{Name: "img", Size: c.VirtualSize(), Data: c, Extents: c.Extents}})
	if err != nil {
		b.Fatal(err)
	}
	l, err := s.ListenUnix(context.Background(), dir)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	out := filepath.Join(dir, "out.raw")
	for _, src := range []struct{ name, fmt, path string }{{"file", "qcow2", img}, {"nbdserve", "raw", l.URI()}} {
		b.Run(src.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				qemutest.Run(b, "qemu-img", "convert", "-m", "8", "-f", src.fmt, "-O", "raw", src.path, out)
				_ = os.Remove(out)
			}
		})
	}
}

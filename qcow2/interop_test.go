package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"imagestore/qcow2/qemutest"
)

func openFile(t testing.TB, path string) *Image {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	im, err := Open(f, st.Size())
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	return im
}

func toQemu(ext []Extent) []qemutest.Extent {
	out := make([]qemutest.Extent, len(ext))
	for i, e := range ext {
		out[i] = qemutest.Extent{Offset: e.Offset, Length: e.Length, Kind: e.Kind.String()}
	}
	return out
}

func assertSameMap(t *testing.T, got []Extent, want []qemutest.Extent) {
	t.Helper()
	g := toQemu(got)
	if fmt.Sprint(g) != fmt.Sprint(want) {
		t.Fatalf("extents differ from qemu-img map:\n got %v\nwant %v", g, want)
	}
}

// rawSource writes a raw file with patterns for qemu-img convert.
func rawSource(t *testing.T, dir string, size int64, cmds ...string) string {
	t.Helper()
	p := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	qemutest.Run(t, "qemu-io", append(args, p)...)
	return p
}

var patterns = []string{
	"write -P 0x11 0 96k",
	"write -P 0x22 200k 4k",
	"write -P 0x33 1m 300k",
	"write -P 0x44 3m 1k",
}

func TestInteropMatrix(t *testing.T) {
	const size = 4 << 20
	cases := []struct {
		name    string
		opts    string
		cmds    []string
		convert []string   // if set: build from a raw source with these convert flags
		after   [][]string // qemu-img invocations after the writes, then cmds2 via qemu-io
		cmds2   []string
	}{
		{name: "v2-64k", opts: "compat=0.10", cmds: append(patterns[:4:4], "discard 1m 64k")},
		{name: "v2-zero-write", opts: "compat=0.10", cmds: append(patterns[:4:4], "write -z 0 64k")},
		{name: "v3-512", opts: "compat=1.1,cluster_size=512", cmds: append(patterns[:4:4], "write -z 1100k 3k", "discard 0 8k")},
		{name: "v3-4k", opts: "cluster_size=4096", cmds: append(patterns[:4:4], "write -z 1m 8k", "discard 12k 8k")},
		{name: "v3-64k", opts: "compat=1.1", cmds: append(patterns[:4:4], "write -z 2m 128k", "write -z 1m 64k", "discard 0 64k")},
		{name: "v3-2m", opts: "cluster_size=2M", cmds: append(patterns[:4:4], "write -z 2m 2m")},
		{name: "v3-lazy-refcounts", opts: "lazy_refcounts=on", cmds: patterns},
		{name: "zlib", convert: []string{"-c"}},
		{name: "zstd", convert: []string{"-c", "-o", "compression_type=zstd"}},
		{name: "zstd-4k", convert: []string{"-c", "-o", "compression_type=zstd,cluster_size=4096"}},
		{name: "zlib-v2-512", convert: []string{"-c", "-o", "compat=0.10,cluster_size=512"}},
		{name: "empty", opts: ""},
		{name: "snapshot", opts: "", cmds: patterns, after: [][]string{{"snapshot", "-c", "s1"}}, cmds2: []string{"write -P 0x99 0 8k", "discard 1m 64k"}},
		{name: "bitmap", opts: "", cmds: patterns, after: [][]string{{"bitmap", "--add"}}, cmds2: []string{"write -P 0x98 64k 8k"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			if tc.convert != nil {
				src := rawSource(t, dir, size, patterns...)
				args := append([]string{"-f", "raw", "-O", "qcow2"}, tc.convert...)
				qemutest.Convert(t, append(args, src, p)...)
			} else {
				qemutest.Create(t, p, size, tc.opts)
				if len(tc.cmds) > 0 {
					qemutest.IO(t, p, tc.cmds...)
				}
				for _, a := range tc.after {
					args := append(append([]string{}, a...), p)
					if a[0] == "bitmap" {
						args = append(args, "b0")
					}
					qemutest.Run(t, "qemu-img", args...)
				}
				if len(tc.cmds2) > 0 {
					qemutest.IO(t, p, tc.cmds2...)
				}
			}
			im := openFile(t, p)
			if im.VirtualSize() != size {
				t.Fatalf("virtual size %d", im.VirtualSize())
			}
			ext, err := im.Extents()
			if err != nil {
				t.Fatal(err)
			}
			assertSameMap(t, ext, qemutest.Map(t, p))
			if got, want := qemutest.DigestReaderAt(t, im, size), qemutest.ConvertRaw(t, p); got != want {
				t.Fatalf("guest view digest %s, qemu-img convert %s", got, want)
			}
			info := qemutest.Info(t, p)
			if got := im.Info(); float64(got.ClusterSize) != info["cluster-size"] {
				t.Fatalf("cluster size %d, qemu says %v", got.ClusterSize, info["cluster-size"])
			}
			fs := info["format-specific"].(map[string]any)["data"].(map[string]any)
			if got := im.Info().FormatSpecific.Data; got.Compat != fs["compat"] || got.CompressionType != fs["compression-type"] {
				t.Fatalf("info %+v, qemu %v", got, fs)
			}
			checkDataRanges(t, im)
			if tc.convert == nil {
				assertSameQemuMap(t, im, p)
			}
		})
	}
}

// checkDataRanges asserts the prefetch plan is sorted, merged, inside the
// file, and covers exactly the bytes data reads touch.
func checkDataRanges(t *testing.T, im *Image) {
	t.Helper()
	rs := im.DataRanges()
	var total int64
	for i, r := range rs {
		if r.Length <= 0 || r.Offset <= 0 || r.Offset+r.Length > im.size {
			t.Fatalf("bad range %+v (file %d)", r, im.size)
		}
		if i > 0 && rs[i-1].Offset+rs[i-1].Length >= r.Offset {
			t.Fatalf("ranges not sorted/merged: %+v then %+v", rs[i-1], r)
		}
		total += r.Length
	}
	if im.AllocatedBytes() > 0 && total == 0 {
		t.Fatalf("data but no ranges")
	}
	// Reading the guest view through a reader that only serves the planned
	// ranges must succeed.
	ra := &plannedReader{r: im.r, rs: rs}
	im2 := &Image{r: ra, size: im.size, h: im.h, cb: im.cb, cs: im.cs, l2Bits: im.l2Bits, l1: im.l1,
		l2Index: im.l2Index, l2Tables: im.l2Tables, extents: im.extents, cacheIdx: -1}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < im.VirtualSize(); off += int64(len(buf)) {
		if _, err := im2.ReadAt(buf, off); err != nil && off+int64(len(buf)) < im.VirtualSize() {
			t.Fatalf("read outside DataRanges: %v", err)
		}
	}
}

type plannedReader struct {
	r interface {
		ReadAt([]byte, int64) (int, error)
	}
	rs []HostRange
}

func (p *plannedReader) ReadAt(b []byte, off int64) (int, error) {
	for _, r := range p.rs {
		if off >= r.Offset && off+int64(len(b)) <= r.Offset+r.Length {
			return p.r.ReadAt(b, off)
		}
	}
	return 0, fmt.Errorf("read %d+%d outside planned ranges", off, len(b))
}

func TestOverlayAndChain(t *testing.T) {
	const size = 2 << 20
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, size, "")
	qemutest.IO(t, base, "write -P 0xaa 0 1m", "write -P 0xbb 1536k 256k")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, size, "", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.IO(t, top, "write -P 0xcc 64k 64k", "write -z 256k 128k", "discard 512k 64k")

	bim, tim := openFile(t, base), openFile(t, top)
	if tim.BackingFile() != "base.qcow2" || tim.BackingFormat() != "qcow2" {
		t.Fatalf("backing %q %q", tim.BackingFile(), tim.BackingFormat())
	}
	ext, _ := tim.Extents()
	assertSameMap(t, ext, qemutest.Map(t, top))
	qi, info := qemutest.Info(t, top), tim.Info()
	if qi["backing-filename"] != info.BackingFilename || qi["backing-filename-format"] != info.BackingFilenameFormat ||
		qi["virtual-size"] != float64(info.VirtualSize) {
		t.Fatalf("info %+v, qemu %v", info, qi)
	}
	c, err := NewChain(tim, bim)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := qemutest.DigestReaderAt(t, c, size), qemutest.ConvertRaw(t, top); got != want {
		t.Fatalf("chain digest %s, qemu %s", got, want)
	}
	// A layer read alone shows zeros where it defers to the base.
	buf := make([]byte, 4096)
	if _, err := tim.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, make([]byte, 4096)) {
		t.Fatalf("unallocated range of top read %v %x", err, buf[:8])
	}
}

// chainMap turns qemu-img map of a whole chain into Data/Zero extents.
func chainMap(t *testing.T, path string) []qemutest.Extent {
	out := qemutest.Run(t, "qemu-img", "map", "-f", "qcow2", "--output=json", path)
	var entries []struct {
		Start, Length int64
		Data          bool
	}
	if err := jsonUnmarshal(out, &entries); err != nil {
		t.Fatal(err)
	}
	var res []qemutest.Extent
	for _, e := range entries {
		k := "zero"
		if e.Data {
			k = "data"
		}
		if n := len(res); n > 0 && res[n-1].Kind == k {
			res[n-1].Length += e.Length
			continue
		}
		res = append(res, qemutest.Extent{Offset: e.Start, Length: e.Length, Kind: k})
	}
	return res
}

func TestChain30(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	var layers []*Image
	prev := ""
	for i := 0; i < 30; i++ {
		p := filepath.Join(dir, fmt.Sprintf("l%02d.qcow2", i))
		if prev == "" {
			qemutest.Create(t, p, size, "cluster_size=4096")
		} else {
			qemutest.Create(t, p, size, "cluster_size=4096", "-b", filepath.Base(prev), "-F", "qcow2")
		}
		off := int64(i) * 100 << 10
		cmds := []string{fmt.Sprintf("write -P %d %d 150k", i+1, off)}
		if i%5 == 4 {
			cmds = append(cmds, fmt.Sprintf("write -z %d 20k", off/2))
		}
		if i%7 == 6 {
			cmds = append(cmds, fmt.Sprintf("discard %d 8k", off))
		}
		qemutest.IO(t, p, cmds...)
		layers = append([]*Image{openFile(t, p)}, layers...)
		prev = p
	}
	c, err := NewChain(layers...)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := qemutest.DigestReaderAt(t, c, size), qemutest.ConvertRaw(t, prev); got != want {
		t.Fatalf("30-layer chain digest %s, qemu %s", got, want)
	}
	ext, _ := c.Extents()
	if g, w := fmt.Sprint(toQemu(ext)), fmt.Sprint(chainMap(t, prev)); g != w {
		t.Fatalf("chain extents\n got %s\nwant %s", g, w)
	}
}

func TestChainSizeMismatch(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	qemutest.Create(t, a, 1<<20, "")
	qemutest.Create(t, b, 2<<20, "")
	if _, err := NewChain(openFile(t, a), openFile(t, b)); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("chain of mismatched sizes: %v", err)
	}
	if _, err := NewChain(); err == nil {
		t.Fatal("empty chain accepted")
	}
}

// TestHugeSparse opens a 1 TiB image and checks nothing scales with the
// virtual size: Open allocates little, extents match qemu, data reads back.
func TestHugeSparse(t *testing.T) {
	const size = 1 << 40
	dir := t.TempDir()
	p := filepath.Join(dir, "huge.qcow2")
	qemutest.Create(t, p, size, "")
	qemutest.IO(t, p, "write -P 0x5a 0 64k", "write -P 0x6b 512g 128k", "write -z 700g 1m", "write -P 0x7c 1099511562240 64k")
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	im := openFile(t, p)
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > 8<<20 {
		t.Fatalf("Open of a 1 TiB sparse image allocated %d bytes", d)
	}
	ext, _ := im.Extents()
	assertSameMap(t, ext, qemutest.Map(t, p))
	if im.AllocatedBytes() != 256<<10 {
		t.Fatalf("allocated %d", im.AllocatedBytes())
	}
	for _, r := range []struct {
		off int64
		b   byte
	}{{0, 0x5a}, {512 << 30, 0x6b}, {512<<30 + 64<<10, 0x6b}, {700 << 30, 0}, {size - 64<<10, 0x7c}, {100 << 30, 0}} {
		buf := make([]byte, 64<<10)
		if _, err := im.ReadAt(buf, r.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, bytes.Repeat([]byte{r.b}, len(buf))) {
			t.Fatalf("at %d: got %x..., want %x", r.off, buf[:4], r.b)
		}
	}
	// Past the end.
	if n, err := im.ReadAt(make([]byte, 10), size-4); n != 4 || err == nil {
		t.Fatalf("tail read n=%d err=%v", n, err)
	}
}

// assertSameQemuMap compares Map() with qemu-img map's JSON, host offsets included.
func assertSameQemuMap(t *testing.T, im *Image, path string) {
	t.Helper()
	var want []MapEntry
	if err := jsonUnmarshal(qemutest.Run(t, "qemu-img", "map", "-f", "qcow2", "--output=json", path), &want); err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(im.Map())
	w, _ := json.Marshal(want)
	if !bytes.Equal(got, w) {
		t.Fatalf("Map differs from qemu-img map:\n got %s\nwant %s", got, w)
	}
}

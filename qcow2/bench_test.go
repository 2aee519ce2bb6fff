package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// Benchmarks of the writer paths. QCOW2_BENCH_MB sets the guest size
// (default 256). bench/qcow2.sh compares the same operations with qemu-img.

func wbSize(b *testing.B) int64 {
	mb := int64(256)
	if s := os.Getenv("QCOW2_BENCH_MB"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil || v <= 0 {
			b.Fatalf("QCOW2_BENCH_MB=%q", s)
		}
		mb = v
	}
	return mb << 20
}

// wbSource is a deterministic ReaderAt of alternating random and text
// clusters, so both the plain and the zstd paths do real work.
type wbSource struct{}

var wbBlocks = func() [2][]byte {
	r := rand.New(rand.NewPCG(1, 2))
	rnd := make([]byte, 65536)
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	text := bytes.Repeat([]byte("imagestore canonical layer, "), 65536/28+1)[:65536]
	return [2][]byte{rnd, text}
}()

func (wbSource) ReadAt(p []byte, off int64) (int, error) {
	for i := 0; i < len(p); {
		pos := off + int64(i)
		n := copy(p[i:], wbBlocks[(pos>>16)%2][pos&65535:])
		i += n
	}
	return len(p), nil
}

func BenchmarkWrite(b *testing.B) {
	size := wbSize(b)
	for _, compress := range []bool{false, true} {
		b.Run(fmt.Sprintf("zstd=%v", compress), func(b *testing.B) {
			ext := []Extent{{0, size, Data}}
			b.SetBytes(size)
			for b.Loop() {
				if _, err := Write(context.Background(), io.Discard, size, ext, wbSource{}, WriteOptions{Compress: compress}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// wbChain writes a base of the whole disk and layers-1 overlays, each
// rewriting 8% of the disk, with our own writer; returns paths base first.
func wbChain(b *testing.B, dir string, size int64, layers int) []string {
	var paths []string
	for i := range layers {
		var ext []Extent
		if i == 0 {
			ext = []Extent{{0, size, Data}}
		} else {
			step := size / 16
			for j := int64(0); j < 16; j++ {
				off := (j*step + int64(i)*(1<<20)) &^ (64<<10 - 1)
				ln := min(step*8/100&^(64<<10-1), size-off)
				if ln > 0 {
					ext = append(ext, Extent{off, ln, Data})
				}
			}
		}
		opts := WriteOptions{}
		if i > 0 {
			opts.BackingFile = filepath.Base(paths[i-1])
		}
		p := filepath.Join(dir, fmt.Sprintf("l%02d.qcow2", i))
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Write(context.Background(), f, size, ext, wbSource{}, opts); err != nil {
			b.Fatal(err)
		}
		if err := f.Close(); err != nil {
			b.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

func BenchmarkFlatten(b *testing.B) {
	size := wbSize(b)
	paths := wbChain(b, b.TempDir(), size, 10)
	c := wtOpenChain(b, paths)
	for _, format := range []string{"qcow2", "raw"} {
		b.Run(format, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				if _, err := Flatten(context.Background(), io.Discard, c, format, WriteOptions{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkNormalize(b *testing.B) {
	size := wbSize(b)
	dir := b.TempDir()
	p := filepath.Join(dir, "delta.qcow2")
	var buf bytes.Buffer
	if _, err := Write(context.Background(), &buf, size, []Extent{{0, size, Data}}, wbSource{}, WriteOptions{BackingFile: "base"}); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		b.Fatal(err)
	}
	buf = bytes.Buffer{}
	src := wtOpen(b, p)
	b.SetBytes(size)
	for b.Loop() {
		if _, err := Normalize(context.Background(), io.Discard, src, WriteOptions{BackingFile: "base"}); err != nil {
			b.Fatal(err)
		}
	}
}

// cnSource alternates random clusters with log-like text that compresses
// about 4:1 (wbSource's text compresses past the reader's ratio budget).
type cnSource [2][]byte

func newCNSource() cnSource {
	r := rand.New(rand.NewPCG(3, 4))
	rnd := make([]byte, 65536)
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	var text []byte
	for len(text) < 65536 {
		text = fmt.Appendf(text, "2026-12-07T20:%02d:%02d.%06d host%d kernel: [%d] eth0: rx %x drops %d\n",
			r.IntN(60), r.IntN(60), r.IntN(1e6), r.IntN(9), r.IntN(1e7), r.Uint64(), r.IntN(1e4))
	}
	return cnSource{rnd, text[:65536]}
}

func (s cnSource) ReadAt(p []byte, off int64) (int, error) {
	for i := 0; i < len(p); {
		pos := off + int64(i)
		i += copy(p[i:], s[(pos>>16)%2][pos&65535:])
	}
	return len(p), nil
}

// BenchmarkCheckNormalized: the store's check of a pushed layer, plain and
// zstd, on alternating random and text clusters.
func BenchmarkCheckNormalized(b *testing.B) {
	size := wbSize(b)
	src := newCNSource()
	for _, compress := range []bool{false, true} {
		b.Run(fmt.Sprintf("zstd=%v", compress), func(b *testing.B) {
			opts := WriteOptions{Compress: compress}
			var buf bytes.Buffer
			if _, err := Write(context.Background(), &buf, size, []Extent{{0, size, Data}}, src, opts); err != nil {
				b.Fatal(err)
			}
			r := bytes.NewReader(buf.Bytes())
			im, err := Open(r, r.Size())
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(size)
			for b.Loop() {
				if err := CheckNormalized(context.Background(), im, r, r.Size(), opts, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

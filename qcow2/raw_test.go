package qcow2

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"imagestore/qcow2/qemutest"
)

// rtMakeRaw writes a raw disk of size bytes: random data pieces, explicit
// zero pieces (allocated zeros) and, when sparse, holes left by skipping.
func rtMakeRaw(t *testing.T, path string, size int64, sparse bool, seed uint64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 2))
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 256<<10)
	for off := int64(0); off < size; {
		n := min(size-off, 4096*(1+rng.Int64N(int64(len(buf))/4096)))
		switch rng.IntN(3) {
		case 0: // data
			for i := range buf[:n] {
				buf[i] = byte(rng.Uint32())
			}
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
		case 1: // written zeros
			if _, err := f.WriteAt(make([]byte, n), off); err != nil {
				t.Fatal(err)
			}
		case 2: // hole, or written zeros for a dense file
			if !sparse {
				if _, err := f.WriteAt(make([]byte, n), off); err != nil {
					t.Fatal(err)
				}
			}
		}
		off += n
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func TestNormalizeRaw(t *testing.T) {
	dir := t.TempDir()
	const size = 6<<20 + 512 // a partial last cluster
	// A base full of data, so a delta that fails to zero-flag shows through.
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, size, "")
	qemutest.IO(t, base, "write -P 0x5a 0 6M", "write -P 0x5b 6M 512")

	for _, tc := range []struct {
		name     string
		sparse   bool
		asFile   bool // pass the *os.File (hole detection) or a plain ReaderAt
		opts     WriteOptions
		maxAlloc bool // data bytes mapped must not exceed the non-zero data
	}{
		{"dense-readerat", false, false, WriteOptions{}, true},
		{"sparse-file", true, true, WriteOptions{}, true},
		{"sparse-readerat", true, false, WriteOptions{}, true},
		{"sparse-file-4k-zstd", true, true, WriteOptions{ClusterBits: 12, Compress: true}, false},
		{"delta-over-base", true, true, WriteOptions{BackingFile: "base.qcow2"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := filepath.Join(dir, tc.name+".raw")
			rtMakeRaw(t, raw, size, tc.sparse, uint64(len(tc.name)))
			f, err := os.Open(raw)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			var src io.ReaderAt = f
			if !tc.asFile {
				src = io.NewSectionReader(f, 0, size)
			}
			out := filepath.Join(dir, tc.name+".qcow2")
			b := wtWriteFile(t, out, func(w *os.File) (int64, error) {
				return NormalizeRaw(context.Background(), w, src, size, tc.opts)
			})
			qemutest.Check(t, out)
			qemutest.Compare(t, raw, out)
			info := qemutest.Info(t, out)
			if got := int64(info["virtual-size"].(float64)); got != size {
				t.Fatalf("virtual size %d, want %d", got, size)
			}
			// Deterministic: the same input gives the same bytes, with or
			// without hole detection.
			var again bytes.Buffer
			if _, err := NormalizeRaw(context.Background(), &again, io.NewSectionReader(f, 0, size), size, tc.opts); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again.Bytes(), b) {
				t.Fatal("hole detection changed the output bytes")
			}
			if tc.maxAlloc {
				want, err := os.ReadFile(raw)
				if err != nil {
					t.Fatal(err)
				}
				var nonzero int64
				for off := 0; off < len(want); off += 64 << 10 {
					if !wrIsZero(want[off:min(len(want), off+64<<10)]) {
						nonzero += 64 << 10
					}
				}
				if got := wtDataBytes(qemutest.Map(t, out)); got > nonzero {
					t.Errorf("maps %d data bytes, only %d bytes of non-zero clusters", got, nonzero)
				}
			}
		})
	}
}

func TestNormalizeRawErrors(t *testing.T) {
	for _, size := range []int64{-512, 1, 511, 1<<20 + 100} {
		_, err := NormalizeRaw(context.Background(), io.Discard, bytes.NewReader(make([]byte, max(size, 0))), size, WriteOptions{})
		if !errors.Is(err, ErrRawSize) {
			t.Errorf("size %d: got %v, want ErrRawSize", size, err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := NormalizeRaw(ctx, io.Discard, bytes.NewReader(bytes.Repeat([]byte{1}, 8<<20)), 8<<20, WriteOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: got %v", err)
	}
}

// rtWriterAt is an in-memory WriterAt without Truncate that checks the
// ascending-order promise.
type rtWriterAt struct {
	t    *testing.T
	b    []byte
	last int64
	n    int64
}

func (w *rtWriterAt) WriteAt(p []byte, off int64) (int, error) {
	if off < w.last {
		w.t.Errorf("write at %d after a write ending at %d", off, w.last)
	}
	if end := off + int64(len(p)); end > int64(len(w.b)) {
		w.b = append(w.b, make([]byte, end-int64(len(w.b)))...)
	}
	copy(w.b[off:], p)
	w.last = off + int64(len(p))
	w.n += int64(len(p))
	return len(p), nil
}

func TestFlattenRawSparse(t *testing.T) {
	dir := t.TempDir()
	const size = 4<<20 + 512
	paths := wtMakeChain(t, dir, 8, size, 11)
	top := paths[len(paths)-1]
	// A top layer ending in zeros exercises the size-setting tail.
	qemutest.IO(t, top, "write -z 4M 512")
	c := wtOpenChain(t, paths)
	want := qemutest.ConvertRaw(t, top)
	ext, err := c.Extents()
	if err != nil {
		t.Fatal(err)
	}
	var dataBytes int64
	for _, e := range ext {
		if e.Kind == Data {
			dataBytes += e.Length
		}
	}

	t.Run("file", func(t *testing.T) {
		out := filepath.Join(dir, "flat.raw")
		f, err := os.Create(out)
		if err != nil {
			t.Fatal(err)
		}
		n, err := FlattenRawSparse(context.Background(), f, c)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(b)) != size {
			t.Fatalf("file is %d bytes, want %d", len(b), size)
		}
		if got := wtDigest(b); got != want {
			t.Fatalf("flattened %s, qemu %s", got, want)
		}
		if n != dataBytes {
			t.Errorf("wrote %d bytes, the chain has %d data bytes", n, dataBytes)
		}
		qemutest.Compare(t, top, out)
	})
	t.Run("writerat", func(t *testing.T) {
		w := &rtWriterAt{t: t}
		n, err := FlattenRawSparse(context.Background(), w, c)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(w.b)) != size {
			t.Fatalf("output is %d bytes, want %d", len(w.b), size)
		}
		if got := wtDigest(w.b); got != want {
			t.Fatalf("flattened %s, qemu %s", got, want)
		}
		if n != w.n || n > dataBytes+512 {
			t.Errorf("returned %d, wrote %d, data %d", n, w.n, dataBytes)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if dataBytes == 0 {
			t.Fatal("chain has no data")
		}
		if _, err := FlattenRawSparse(ctx, &rtWriterAt{t: t}, c); !errors.Is(err, context.Canceled) {
			t.Errorf("got %v, want context.Canceled", err)
		}
	})
}

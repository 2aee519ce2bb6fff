package qcow2

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"imagestore/qcow2/qemutest"
)

// wtMakeChain builds a chain of n qcow2 layers with qemu-img and qemu-io:
// each layer writes, zeroes and discards random ranges. It returns the layer
// paths, base first.
func wtMakeChain(t testing.TB, dir string, n int, size int64, seed uint64) []string {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	var paths []string
	for i := range n {
		p := filepath.Join(dir, fmt.Sprintf("l%02d.qcow2", i))
		var extra []string
		opts := "cluster_size=65536"
		if i%7 == 3 {
			opts = "cluster_size=4096"
		}
		if i > 0 {
			extra = []string{"-b", filepath.Base(paths[i-1]), "-F", "qcow2"}
		}
		qemutest.Create(t, p, size, opts, extra...)
		var cmds []string
		for range 4 {
			off := rng.Int64N(size/4096) * 4096
			ln := min(size-off, 4096*(1+rng.Int64N(64)))
			switch rng.IntN(6) {
			case 0:
				cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, ln))
			case 1:
				if i > 0 {
					cmds = append(cmds, fmt.Sprintf("discard %d %d", off, ln))
				}
			default:
				cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 1+rng.IntN(254), off, ln))
			}
		}
		if len(cmds) > 0 {
			qemutest.IO(t, p, cmds...)
		}
		paths = append(paths, p)
	}
	return paths
}

// wtOpenChain opens layer files (base first) as a Chain (top first).
func wtOpenChain(t testing.TB, paths []string) *Chain {
	t.Helper()
	var layers []*Image
	for i := len(paths) - 1; i >= 0; i-- {
		layers = append(layers, wtOpen(t, paths[i]))
	}
	c, err := NewChain(layers...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestFlatten30Layers(t *testing.T) {
	dir := t.TempDir()
	const size = 4<<20 + 512
	paths := wtMakeChain(t, dir, 30, size, 7)
	top := paths[len(paths)-1]
	c := wtOpenChain(t, paths)
	want := qemutest.ConvertRaw(t, top)

	qemuFlat := filepath.Join(dir, "qemu-flat.qcow2")
	qemutest.Convert(t, "-O", "qcow2", top, qemuFlat)

	for _, tc := range []struct {
		name   string
		format string
		opts   WriteOptions
	}{
		{"qcow2", "qcow2", WriteOptions{}},
		{"qcow2-zstd", "qcow2", WriteOptions{Compress: true}},
		{"qcow2-4k", "qcow2", WriteOptions{ClusterBits: 12}},
		{"raw", "raw", WriteOptions{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, "flat-"+tc.name)
			b := wtWriteFile(t, out, func(f *os.File) (int64, error) {
				return Flatten(context.Background(), f, c, tc.format, tc.opts)
			})
			if tc.format == "raw" {
				if int64(len(b)) != size {
					t.Fatalf("raw flatten is %d bytes, want %d", len(b), size)
				}
				if got := wtDigest(b); got != want {
					t.Fatalf("raw flatten %s, qemu %s", got, want)
				}
				qemutest.Compare(t, qemuFlat, out)
				return
			}
			qemutest.Check(t, out)
			if got := qemutest.ConvertRaw(t, out); got != want {
				t.Errorf("flatten %s, qemu %s", got, want)
			}
			qemutest.Compare(t, top, out)
			qemutest.Compare(t, qemuFlat, out)
			if info := qemutest.Info(t, out); info["backing-filename"] != nil {
				t.Errorf("flattened image has a backing file: %v", info["backing-filename"])
			}
			// Our flatten leaves no more allocated than qemu's own.
			if ours, theirs := wtDataBytes(qemutest.Map(t, out)), wtDataBytes(qemutest.Map(t, qemuFlat)); ours > theirs+int64(64<<10) {
				t.Errorf("our flatten maps %d data bytes, qemu's %d", ours, theirs)
			}
		})
	}
}

func wtDataBytes(m []qemutest.Extent) int64 {
	var n int64
	for _, e := range m {
		if e.Kind == "data" {
			n += e.Length
		}
	}
	return n
}

// wtFailWriter fails after limit bytes.
type wtFailWriter struct{ limit int }

var errWtWrite = errors.New("disk full")

func (w *wtFailWriter) Write(p []byte) (int, error) {
	if len(p) > w.limit {
		n := w.limit
		w.limit = 0
		return n, errWtWrite
	}
	w.limit -= len(p)
	return len(p), nil
}

func TestFlattenErrors(t *testing.T) {
	dir := t.TempDir()
	paths := wtMakeChain(t, dir, 2, 16<<20, 3)
	c := wtOpenChain(t, paths)
	ctx := context.Background()
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	full, err := Flatten(ctx, io.Discard, c, "qcow2", WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		ctx    context.Context
		w      io.Writer
		format string
		opts   WriteOptions
		is     error
	}{
		{"bad-format", ctx, io.Discard, "vmdk", WriteOptions{}, nil},
		{"backing", ctx, io.Discard, "qcow2", WriteOptions{BackingFile: "x"}, nil},
		{"cancelled-raw", cancelled, io.Discard, "raw", WriteOptions{}, context.Canceled},
		{"cancelled-qcow2", cancelled, io.Discard, "qcow2", WriteOptions{}, context.Canceled},
		{"write-error-raw", ctx, &wtFailWriter{limit: 3 << 20}, "raw", WriteOptions{}, errWtWrite},
		{"write-error-qcow2-data", ctx, &wtFailWriter{limit: int(full) - 4096}, "qcow2", WriteOptions{}, errWtWrite},
		{"write-error-qcow2-meta", ctx, &wtFailWriter{limit: 100}, "qcow2", WriteOptions{}, errWtWrite},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Flatten(tc.ctx, tc.w, c, tc.format, tc.opts)
			if err == nil {
				t.Fatal("Flatten succeeded, want an error")
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Fatalf("error %v, want %v", err, tc.is)
			}
		})
	}
	if _, err := Flatten(ctx, io.Discard, nil, "raw", WriteOptions{}); err == nil {
		t.Error("nil chain accepted")
	}
	var buf bytes.Buffer
	if _, err := Normalize(ctx, &buf, nil, WriteOptions{}); err == nil {
		t.Error("nil image accepted")
	}
}

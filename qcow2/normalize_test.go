package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"imagestore/qcow2/qemutest"
)

// wtOpen opens a qcow2 file with our reader; the file is closed at cleanup.
func wtOpen(t testing.TB, path string) *Image {
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
		t.Fatalf("Open %s: %v", path, err)
	}
	return im
}

// wtWriteFile runs fn into a new file at path and returns the bytes written.
func wtWriteFile(t testing.TB, path string, fn func(w *os.File) (int64, error)) []byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	n, err := fn(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("writing %s: %v", path, err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != n {
		t.Fatalf("%s: reported %d bytes, file has %d", path, n, len(b))
	}
	return b
}

func TestNormalizeQemuDeltas(t *testing.T) {
	const size = 8 << 20
	baseCmds := []string{"write -P 0x11 0 8M"}
	deltaCmds := []string{
		"write -P 0x22 0 128k",
		"write -P 0x33 1M 4k", // a piece smaller than our default cluster
		"write -z 2M 256k",
		"discard 3M 128k",
		"write -P 0 4M 64k", // data that is all zeros
		"write -c -P 0x44 5M 64k",
		"write -P 0x55 8380416 8192", // the last 8 KiB
	}
	tests := []struct {
		name      string
		baseOpts  string
		deltaOpts string
		deltaCmds []string
		opts      WriteOptions
	}{
		{"v3-64k", "", "", deltaCmds, WriteOptions{}},
		{"v3-64k-zstd-out", "", "", deltaCmds, WriteOptions{Compress: true}},
		{"v3-4k", "cluster_size=4096", "cluster_size=4096", deltaCmds, WriteOptions{}},
		{"v3-2m-zstd-in", "", "cluster_size=2097152,compression_type=zstd", []string{
			"write -P 0x22 0 128k", "write -z 2M 2M", "write -c -P 0x44 4M 2M", "write -P 0x55 8380416 8192",
		}, WriteOptions{}},
		{"v2-512", "compat=0.10", "compat=0.10,cluster_size=512", deltaCmds[:2], WriteOptions{}},
		{"v3-512-out", "", "cluster_size=512", deltaCmds, WriteOptions{ClusterBits: 9}},
		{"empty", "", "", nil, WriteOptions{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			delta := filepath.Join(dir, "delta.qcow2")
			qemutest.Create(t, base, size, tc.baseOpts)
			qemutest.IO(t, base, baseCmds...)
			qemutest.Create(t, delta, size, tc.deltaOpts, "-b", "base.qcow2", "-F", "qcow2")
			if len(tc.deltaCmds) > 0 {
				qemutest.IO(t, delta, tc.deltaCmds...)
			}
			src := wtOpen(t, delta)
			out := filepath.Join(dir, "ours.qcow2")
			opts := tc.opts
			opts.BackingFile = "base.qcow2"
			first := wtWriteFile(t, out, func(f *os.File) (int64, error) {
				return Normalize(context.Background(), f, src, opts)
			})
			qemutest.Check(t, out)
			qemutest.Compare(t, delta, out)
			if got, want := qemutest.ConvertRaw(t, out), qemutest.ConvertRaw(t, delta); got != want {
				t.Errorf("chain through our layer %s, through qemu's %s", got, want)
			}
			// Our layer allocates nothing the source left to the parent.
			srcExt, _ := src.Extents()
			for _, e := range qemutest.Map(t, out) {
				if e.Kind == "unallocated" {
					continue
				}
				for _, s := range srcExt {
					if s.Kind == Unallocated && s.Offset < e.Offset+e.Length && s.End() > e.Offset {
						t.Errorf("our %v overlaps source's unallocated %v", e, s)
					}
				}
			}
			again := wtWriteFile(t, filepath.Join(dir, "again.qcow2"), func(f *os.File) (int64, error) {
				return Normalize(context.Background(), f, src, opts)
			})
			if !bytes.Equal(first, again) {
				t.Error("normalizing twice gave different bytes")
			}
		})
	}
}

// TestNormalizeCanonical: two hosts that wrote the same content in different
// ways yield the same layer, byte for byte.
func TestNormalizeCanonical(t *testing.T) {
	dir := t.TempDir()
	const size = 4 << 20
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, size, "")
	variants := [][]string{
		{"write -P 0x22 0 192k", "write -z 1M 64k", "write -P 0x77 2M 64k"},
		{"write -P 0x22 128k 64k", "write -P 0x22 0 128k", "write -P 0 1M 64k", "write -c -P 0x77 2M 64k"},
		{"write -P 0x22 0 64k", "write -P 0x22 64k 128k", "write -P 0 1M 32k", "write -z 1056k 32k", "write -P 0x77 2M 64k"},
	}
	var digests []string
	for i, cmds := range variants {
		delta := filepath.Join(dir, fmt.Sprintf("d%d.qcow2", i))
		qemutest.Create(t, delta, size, "cluster_size=65536", "-b", "base.qcow2", "-F", "qcow2")
		qemutest.IO(t, delta, cmds...)
		var buf bytes.Buffer
		if _, err := Normalize(context.Background(), &buf, wtOpen(t, delta), WriteOptions{BackingFile: "base.qcow2"}); err != nil {
			t.Fatal(err)
		}
		digests = append(digests, wtDigest(buf.Bytes()).String())
	}
	for i := 1; i < len(digests); i++ {
		if digests[i] != digests[0] {
			t.Errorf("variant %d digest %s, variant 0 %s", i, digests[i], digests[0])
		}
	}
}

func TestNormalizeBase(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	qemutest.Create(t, src, 4<<20, "cluster_size=4096")
	qemutest.IO(t, src, "write -P 0x5a 4k 12k", "write -z 64k 64k", "write -P 0 1M 4k", "write -P 0x6b 2M 1M")
	out := filepath.Join(dir, "ours.qcow2")
	wtWriteFile(t, out, func(f *os.File) (int64, error) {
		return Normalize(context.Background(), f, wtOpen(t, src), WriteOptions{})
	})
	qemutest.Check(t, out)
	qemutest.Compare(t, src, out)
	want := []qemutest.Extent{
		{Offset: 0, Length: 64 << 10, Kind: "data"},
		{Offset: 64 << 10, Length: 2<<20 - 64<<10, Kind: "unallocated"},
		{Offset: 2 << 20, Length: 1 << 20, Kind: "data"},
		{Offset: 3 << 20, Length: 1 << 20, Kind: "unallocated"},
	}
	if got := qemutest.Map(t, out); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("map %v, want %v", got, want)
	}
}

func TestWrAligned(t *testing.T) {
	tests := []struct {
		ext  []Extent
		want bool
	}{
		{nil, true},
		{[]Extent{{0, 4096, Data}, {4096, 61440, Unallocated}}, false},
		{[]Extent{{0, 4096, Data}, {4096, 61440, Zero}}, true},
		{[]Extent{{0, 65536, Unallocated}, {65536, 4096, Data}}, false},
		{[]Extent{{65536, 65536, Data}}, true},
		{[]Extent{{65536, 4096, Data}}, false},
		{[]Extent{{65536, 4096, Data}}, true}, // ends at vsize
	}
	for i, tc := range tests {
		vsize := int64(1 << 20)
		if i == len(tests)-1 {
			vsize = 65536 + 4096
		}
		if got := wrAligned(tc.ext, 65536, vsize); got != tc.want {
			t.Errorf("%d: wrAligned(%v) = %v, want %v", i, tc.ext, got, tc.want)
		}
	}
}

package qcow2

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/qcow2/qemutest"
)

// recorder records the reads made on an image file once armed.
type recorder struct {
	f     io.ReaderAt
	layer int
	mu    *sync.Mutex
	armed *bool
	log   *[]LayerRange
}

func (r *recorder) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	if *r.armed {
		*r.log = append(*r.log, LayerRange{Layer: r.layer, HostRange: HostRange{Offset: off, Length: int64(len(p))}})
	}
	r.mu.Unlock()
	return r.f.ReadAt(p, off)
}

// TestReadPlan: reading a chain's guest view front to back (a compressed
// zstd base and a plain 4 KiB-cluster delta over it) touches only the
// plan's ranges, in the plan's order, and the plan covers no more than
// the layers' files.
func TestReadPlan(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	b := make([]byte, 8<<20)
	x := uint32(7)
	for i := range b {
		if (i>>16)%3 == 0 { // every third 64 KiB: noise; else text-like, compressible
			x = x*1664525 + 1013904223
			b[i] = byte(x >> 24)
		} else {
			b[i] = "log line 0123456789\n"[i%20]
		}
	}
	if err := os.WriteFile(raw, b, 0o644); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Convert(t, "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", raw, base)
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, 8<<20, "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.IO(t, top, "write -P 0x61 4k 8k", "write -z 1M 64k", "write -P 0x62 3M 200k", "write -P 0x63 8188k 4k")

	var (
		mu    sync.Mutex
		armed bool
		log   []LayerRange
	)
	var layers []*Image
	for i, p := range []string{top, base} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		st, _ := f.Stat()
		im, err := Open(&recorder{f: f, layer: i, mu: &mu, armed: &armed, log: &log}, st.Size())
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, im)
	}
	c, err := NewChain(layers...)
	if err != nil {
		t.Fatal(err)
	}
	plan := c.ReadPlan()
	if len(plan) == 0 {
		t.Fatal("empty plan")
	}
	seen := map[int]int{}
	for _, r := range plan {
		seen[r.Layer]++
		if r.Offset < 0 || r.Length <= 0 || r.Offset+r.Length > layers[r.Layer].size {
			t.Fatalf("plan range %+v outside layer %d (%d bytes)", r, r.Layer, layers[r.Layer].size)
		}
	}
	if seen[0] < 3 || seen[1] < 3 {
		t.Fatalf("plan does not interleave the layers: %v", plan)
	}
	armed = true
	var got bytes.Buffer
	buf := make([]byte, 1<<20)
	for off := int64(0); off < c.VirtualSize(); off += int64(len(buf)) {
		n, err := c.ReadAt(buf, off)
		if n != len(buf) || (err != nil && err != io.EOF) {
			t.Fatalf("read at %d: %d, %v", off, n, err)
		}
		got.Write(buf[:n])
	}
	if want := qemutest.ConvertRaw(t, top); want != digest.FromBytes(got.Bytes()) {
		t.Fatalf("guest view differs from qemu-img convert")
	}
	cur := 0
	for _, r := range log {
		j := cur
		for ; j < len(plan); j++ {
			p := plan[j]
			if p.Layer == r.Layer && r.Offset >= p.Offset && r.Offset+r.Length <= p.Offset+p.Length {
				break
			}
		}
		if j == len(plan) {
			t.Fatalf("read %+v is not in the plan at or after entry %d (%+v)", r, cur, plan[cur])
		}
		cur = j
	}
}

package oci_test

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/transfer/faultproxy"
	"imagestore/transfer/oci"
)

// TestBlobReaderAt: ranges of a stored blob read back exactly, also
// through a proxy that cuts every connection after 300 KiB (each read
// continues from the bytes it got); past the end is io.EOF; a missing blob
// is a definite error, not retried forever.
func TestBlobReaderAt(t *testing.T) {
	st, addr := streamStore(t)
	data := make([]byte, 3<<20+5)
	rng := rand.New(rand.NewPCG(8, 9))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	d, _, err := st.Put(t.Context(), bytes.NewReader(data), int64(len(data)), "")
	if err != nil {
		t.Fatal(err)
	}
	p := faultproxy.New(t, addr)
	p.CutAfter(300 << 10)
	p.CutNext(-1)
	for _, a := range []string{addr, p.Addr()} {
		c, err := oci.New(oci.Options{Addr: a})
		if err != nil {
			t.Fatal(err)
		}
		r := c.BlobReaderAt(t.Context(), "vols", d, int64(len(data)))
		for _, rg := range [][2]int{{0, 1}, {0, 1 << 20}, {5, 700 << 10}, {2 << 20, 1<<20 + 5}, {len(data) - 1, 1}} {
			b := make([]byte, rg[1])
			if n, err := r.ReadAt(b, int64(rg[0])); n != len(b) || (err != nil && !errors.Is(err, io.EOF)) {
				t.Fatalf("%s: read %v: %d, %v", a, rg, n, err)
			}
			if !bytes.Equal(b, data[rg[0]:rg[0]+rg[1]]) {
				t.Fatalf("%s: read %v: wrong bytes", a, rg)
			}
		}
		b := make([]byte, 10)
		if n, err := r.ReadAt(b, int64(len(data))-4); n != 4 || !errors.Is(err, io.EOF) {
			t.Fatalf("%s: read over the end: %d, %v", a, n, err)
		}
	}
	if p.Cuts() == 0 {
		t.Fatal("proxy never cut a read")
	}
	c, _ := oci.New(oci.Options{Addr: addr})
	missing := c.BlobReaderAt(t.Context(), "vols", digest.FromString("nope"), 100)
	if _, err := missing.ReadAt(make([]byte, 10), 0); !errors.Is(err, oci.ErrNotFound) {
		t.Fatalf("missing blob: %v", err)
	}
}

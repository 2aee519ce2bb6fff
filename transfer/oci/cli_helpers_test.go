package oci_test

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/faultproxy"
	"imagestore/transfer/oci"
	"imagestore/transfer/registry/registrytest"
)

func streamStore(t *testing.T) (*blobstore.Store, string) {
	t.Helper()
	n := registrytest.Start(t, registrytest.Options{})
	return n.Store, n.Addr()
}

// failAfter returns an error once n bytes have been read.
type failAfter struct {
	r io.Reader
	n int
}

func (f *failAfter) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, errors.New("source broke")
	}
	if len(p) > f.n {
		p = p[:f.n]
	}
	n, err := f.r.Read(p)
	f.n -= n
	return n, err
}

func TestPushStream(t *testing.T) {
	data := make([]byte, 5<<20+123)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	want := digest.FromBytes(data)
	cases := []struct {
		name    string
		src     func() io.Reader
		cutAt   int64
		cuts    int
		wantErr bool
	}{
		{"plain", func() io.Reader { return bytes.NewReader(data) }, 0, 0, false},
		{"empty", func() io.Reader { return bytes.NewReader(nil) }, 0, 0, false},
		{"cut mid-chunk three times", func() io.Reader { return bytes.NewReader(data) }, 700 << 10, 3, false},
		{"source error", func() io.Reader { return &failAfter{r: bytes.NewReader(data), n: 3 << 20} }, 0, 0, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st, addr := streamStore(t)
			p := faultproxy.New(t, addr)
			if tc.cutAt > 0 {
				p.CutAfter(tc.cutAt)
				p.CutNext(tc.cuts)
			}
			c, err := oci.New(oci.Options{Addr: p.Addr()})
			if err != nil {
				t.Fatal(err)
			}
			var progressed atomic.Int64
			d, n, err := c.PushStream(t.Context(), "dbs", tc.src(), oci.StreamOptions{ChunkSize: 1 << 20, Progress: func(n int64) { progressed.Add(n) }})
			if tc.wantErr {
				if err == nil {
					t.Fatal("no error")
				}
				var found int
				_ = st.WalkBlobs(t.Context(), func(blobstore.BlobInfo) error { found++; return nil })
				if found != 0 {
					t.Fatalf("a failed stream committed %d blobs", found)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			exp, expN := want, int64(len(data))
			if tc.name == "empty" {
				exp, expN = digest.FromBytes(nil), 0
			}
			if d != exp || n != expN || progressed.Load() != expN {
				t.Fatalf("got %s %d (progress %d), want %s %d", d, n, progressed.Load(), exp, expN)
			}
			if p.Cuts() < tc.cuts {
				t.Fatalf("proxy cut %d times, want %d", p.Cuts(), tc.cuts)
			}
			if err := st.VerifyBlob(t.Context(), d); err != nil {
				t.Fatal(err)
			}
		})
	}
}

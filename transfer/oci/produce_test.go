package oci_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/faultproxy"
	"imagestore/transfer/oci"
)

// TestPushProduced: a produced blob arrives whole and verified, also when
// the connection is cut (the producer runs again and the upload resumes at
// the store's durable offset); a failing producer commits nothing; a
// producer whose rerun differs is refused by the digest check.
func TestPushProduced(t *testing.T) {
	data := make([]byte, 9<<20+77)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	boom := errors.New("source broke")
	var runs atomic.Int64
	same := func(ctx context.Context, w io.Writer) (int64, error) {
		runs.Add(1)
		// Small writes, as an encoder's buffered output would be.
		var n int64
		for off := 0; off < len(data); off += 64 << 10 {
			m, err := w.Write(data[off:min(off+64<<10, len(data))])
			n += int64(m)
			if err != nil {
				return n, err
			}
		}
		return n, nil
	}
	cases := []struct {
		name    string
		produce oci.Producer
		cutAt   int64
		cuts    int
		wantErr error
	}{
		{"plain", same, 0, 0, nil},
		{"empty", func(ctx context.Context, w io.Writer) (int64, error) { return 0, nil }, 0, 0, nil},
		{"cut three times", same, 2 << 20, 3, nil},
		{"producer fails", func(ctx context.Context, w io.Writer) (int64, error) {
			n, _ := w.Write(data[:3<<20])
			return int64(n), boom
		}, 0, 0, boom},
		{"rerun differs", func(ctx context.Context, w io.Writer) (int64, error) {
			b := bytes.Clone(data)
			b[0] ^= byte(runs.Add(1)) // every run starts differently: the store holds the first run's start
			n, err := w.Write(b)
			return int64(n), err
		}, 2 << 20, 1, oci.ErrDigestInvalid},
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
			runs.Store(0)
			var progressed atomic.Int64
			d, n, err := c.PushProduced(t.Context(), "vols", tc.produce, oci.StreamOptions{Progress: func(n int64) { progressed.Add(n) }})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err %v, want %v", err, tc.wantErr)
				}
				var found int
				_ = st.WalkBlobs(t.Context(), func(blobstore.BlobInfo) error { found++; return nil })
				if found != 0 {
					t.Fatalf("a failed upload committed %d blobs", found)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			exp, expN := digest.FromBytes(data), int64(len(data))
			if tc.name == "empty" {
				exp, expN = digest.FromBytes(nil), 0
			}
			if d != exp || n != expN || progressed.Load() != expN {
				t.Fatalf("got %s %d (progress %d), want %s %d", d, n, progressed.Load(), exp, expN)
			}
			if p.Cuts() < tc.cuts || (tc.cuts > 0 && runs.Load() < 2) {
				t.Fatalf("proxy cut %d times, producer ran %d times", p.Cuts(), runs.Load())
			}
			if err := st.VerifyBlob(t.Context(), d); err != nil {
				t.Fatal(err)
			}
		})
	}
}

package oci_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/crcframe"
	"imagestore/transfer/faultproxy"
	"imagestore/transfer/oci"
)

// observer is a reverse proxy in front of a registry that records how
// uploads went (PATCH encodings, how PUTs completed) and, for a registry
// as a standard one would answer, hides the checked-upload offer.
type observer struct {
	mu        sync.Mutex
	encodings map[string]int // PATCH Content-Encoding ("" = identity) -> count
	puts      []string       // the completing PUTs' queries
}

func observe(t *testing.T, target string, standard bool) (string, *observer) {
	t.Helper()
	o := &observer{encodings: map[string]int{}}
	u, err := url.Parse("http://" + target)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1
	rp.ErrorLog = log.New(io.Discard, "", 0) // the cuts' "proxy error" lines
	rp.ModifyResponse = func(resp *http.Response) error {
		if standard {
			resp.Header.Del(oci.HeaderUploadExtensions)
		}
		return nil
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.mu.Lock()
		switch r.Method {
		case http.MethodPatch:
			o.encodings[r.Header.Get("Content-Encoding")]++
		case http.MethodPut:
			if strings.Contains(r.URL.Path, "/blobs/uploads/") {
				o.puts = append(o.puts, r.URL.RawQuery)
			}
		}
		o.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), o
}

// TestPushProduced: a produced blob arrives whole and verified, also when
// the connection is cut (the producer runs again and the upload resumes at
// the store's durable offset), both as a checked upload (crc32c frames,
// the store's digest; our store offers it) and by the distribution
// protocol (a store that does not offer it); a failing producer commits
// nothing; a producer whose rerun differs is refused by the client's rerun
// check; a byte corrupted on the wire fails the push, by its frame's
// crc32c or (standard) by the digest, and nothing is committed.
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
		flipAt  int64
		wantErr map[bool]error // by mode (standard?); nil: success
	}{
		{"plain", same, 0, 0, 0, nil},
		{"empty", func(ctx context.Context, w io.Writer) (int64, error) { return 0, nil }, 0, 0, 0, nil},
		{"cut three times", same, 2 << 20, 3, 0, nil},
		{"producer fails", func(ctx context.Context, w io.Writer) (int64, error) {
			n, _ := w.Write(data[:3<<20])
			return int64(n), boom
		}, 0, 0, 0, map[bool]error{false: boom, true: boom}},
		{"rerun differs", func(ctx context.Context, w io.Writer) (int64, error) {
			b := bytes.Clone(data)
			b[0] ^= byte(runs.Add(1)) // every run starts differently: the store holds the first run's start
			n, err := w.Write(b)
			return int64(n), err
		}, 2 << 20, 1, 0, map[bool]error{false: oci.ErrSourceChanged, true: oci.ErrSourceChanged}},
		{"rerun shorter", func(ctx context.Context, w io.Writer) (int64, error) {
			b := data
			if runs.Add(1) > 1 {
				b = data[:1<<20] // the store holds more than this run writes
			}
			n, err := w.Write(b)
			return int64(n), err
		}, 4 << 20, 1, 0, map[bool]error{false: oci.ErrSourceChanged, true: oci.ErrSourceChanged}},
		{"only the second run differs", func(ctx context.Context, w io.Writer) (int64, error) {
			b := data
			if runs.Add(1) == 2 {
				// Past what the first run reached, sent by the second
				// (the third resumes after it): its bytes must match too.
				b = bytes.Clone(data)
				b[3<<20] ^= 1
			}
			n, err := w.Write(b)
			return int64(n), err
		}, 2 << 20, 2, 0, map[bool]error{false: oci.ErrSourceChanged, true: oci.ErrSourceChanged}},
		{"a byte flipped on the wire", same, 0, 0, 5 << 20, map[bool]error{false: oci.ErrChecksum, true: oci.ErrDigestInvalid}},
	}
	for _, standard := range []bool{false, true} {
		for _, tc := range cases {
			mode := "checked"
			if standard {
				mode = "standard"
			}
			t.Run(mode+"/"+tc.name, func(t *testing.T) {
				st, addr := streamStore(t)
				front, obs := observe(t, addr, standard)
				p := faultproxy.New(t, front)
				if tc.cutAt > 0 {
					p.CutAfter(tc.cutAt)
					p.CutNext(tc.cuts)
				}
				if tc.flipAt > 0 {
					p.FlipAt(tc.flipAt)
				}
				c, err := oci.New(oci.Options{Addr: p.Addr()})
				if err != nil {
					t.Fatal(err)
				}
				runs.Store(0)
				var progressed atomic.Int64
				d, n, err := c.PushProduced(t.Context(), "vols", tc.produce, oci.StreamOptions{Progress: func(n int64) { progressed.Add(n) }})
				if want := tc.wantErr[standard]; want != nil {
					if !errors.Is(err, want) {
						t.Fatalf("err %v, want %v", err, want)
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
				// The mode was the one asked for: frames and a PUT by size
				// when the store offers it, identity and a PUT by digest else.
				obs.mu.Lock()
				defer obs.mu.Unlock()
				wantEnc, wantPut := crcframe.Encoding, fmt.Sprintf("size=%d", expN)
				if standard {
					wantEnc, wantPut = "", "digest="+url.QueryEscape(exp.String())
				}
				if len(obs.puts) != 1 || obs.puts[0] != wantPut || obs.encodings[wantEnc] == 0 || len(obs.encodings) != 1 && expN > 0 {
					t.Fatalf("PATCH encodings %v, PUTs %v; want %q and %q", obs.encodings, obs.puts, wantEnc, wantPut)
				}
			})
		}
	}
}

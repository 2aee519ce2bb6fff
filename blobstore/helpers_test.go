package blobstore

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"io"
	"log/slog"
	"math/rand/v2"
	"testing"

	"github.com/opencontainers/go-digest"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func openStore(t testing.TB, root string, mod ...func(*Options)) *Store {
	t.Helper()
	opts := Options{Root: root, Logger: testLogger(t)}
	for _, m := range mod {
		m(&opts)
	}
	s, err := Open(context.Background(), opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newStore(t testing.TB, mod ...func(*Options)) *Store {
	return openStore(t, t.TempDir(), mod...)
}

// content returns n deterministic pseudo-random bytes for seed.
func content(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n - n%8; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

func digestOf(b []byte) digest.Digest {
	return digest.NewDigestFromBytes(digest.SHA256, sha256Sum(b))
}

func sha256Sum(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

func countBlobs(t testing.TB, s *Store) int {
	t.Helper()
	n := 0
	if err := s.WalkBlobs(context.Background(), func(BlobInfo) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

func mustPut(t testing.TB, s *Store, b []byte) digest.Digest {
	t.Helper()
	d, _, err := s.Put(context.Background(), bytesReader(b), int64(len(b)), "")
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	return d
}

type bytesR struct {
	b []byte
	i int
}

func (r *bytesR) Read(p []byte) (int, error) {
	if r.i >= len(r.b) {
		return 0, io.EOF
	}
	n := copy(p, r.b[r.i:])
	r.i += n
	return n, nil
}

func bytesReader(b []byte) io.Reader { return &bytesR{b: b} }

func marshalJSON(v any) ([]byte, error) { return json.Marshal(v) }

// localOf returns the store's local backend, for the tests about its layout.
func localOf(s *Store) *Local { return s.backend.(*Local) }

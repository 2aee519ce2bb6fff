package blobstoretest

import (
	"context"
	"crypto/sha256"
	"io"
	"log/slog"
	"math/rand/v2"
	"testing"

	"imagestore/blobstore"

	"github.com/opencontainers/go-digest"
)

// Harness is what the suite needs of a backend under test.
type Harness struct {
	// NewBackend opens the backend over the state that belongs to root (a
	// fresh t.TempDir per test case): the same root must reach the same
	// stored state (the suite calls it again to restart a store), and
	// different roots disjoint states (an S3 harness can derive its key
	// prefix from root). The suite passes root as Options.Root too.
	NewBackend func(t *testing.T, root string) blobstore.Backend
	// Corrupt flips one bit at offset off of stored blob d behind the
	// store's back (bit rot, a tampering operator), keeping its length.
	Corrupt func(t *testing.T, root string, d digest.Digest, off int64)
}

// Run runs every conformance test against the backend of h. Each case is
// a subtest with its own root; restart cases open a second Store over the
// same root.
func Run(t *testing.T, h Harness) {
	if h.NewBackend == nil || h.Corrupt == nil {
		t.Fatal("blobstoretest: Harness needs NewBackend and Corrupt")
	}
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T, e *env)
	}{
		{"Commit", testCommit},
		{"DuplicateConcurrentIngest", testDuplicateConcurrentIngest},
		{"Resume", testResume},
		{"Cancel", testCancel},
		{"EmptyIngest", testEmptyIngest},
		{"Quota", testQuota},
		{"ExpiredIngests", testExpiredIngests},
		{"PutImageValidation", testPutImageValidation},
		{"PutImageRace", testPutImageRace},
		{"ChainLimits", testChainLimits},
		{"ImagesListChildrenDelete", testImagesListChildrenDelete},
		{"Reads", testReads},
		{"BadNames", testBadNames},
		{"GC", testGC},
		{"GCGrace", testGCGrace},
		{"GCRacesIngest", testGCRacesIngest},
		{"DiscardNotCreated", testDiscardNotCreated},
		{"Verify", testVerify},
		{"Capacity", testCapacity},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, &env{h: h, root: t.TempDir()})
		})
	}
}

// env is one test's backend state.
type env struct {
	h    Harness
	root string
}

// open opens a Store over the test's state; mod adjusts the options.
func (e *env) open(t *testing.T, mod ...func(*blobstore.Options)) *blobstore.Store {
	t.Helper()
	opts := blobstore.Options{
		Root:    e.root,
		Backend: e.h.NewBackend(t, e.root),
		Logger:  slog.New(slog.DiscardHandler),
	}
	for _, m := range mod {
		m(&opts)
	}
	s, err := blobstore.Open(context.Background(), opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// sub returns an env for a subtest with a root of its own.
func (e *env) sub(t *testing.T) *env { return &env{h: e.h, root: t.TempDir()} }

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
	s := sha256.Sum256(b)
	return digest.NewDigestFromBytes(digest.SHA256, s[:])
}

func countBlobs(t testing.TB, s *blobstore.Store) int {
	t.Helper()
	n := 0
	if err := s.WalkBlobs(context.Background(), func(blobstore.BlobInfo) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

func mustPut(t testing.TB, s *blobstore.Store, b []byte) digest.Digest {
	t.Helper()
	d, _, err := s.Put(context.Background(), bytesReader(b), int64(len(b)), "")
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	return d
}

// readBlob reads a whole blob through OpenBlob.
func readBlob(t testing.TB, s *blobstore.Store, d digest.Digest) []byte {
	t.Helper()
	b, err := s.OpenBlob(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	out, err := io.ReadAll(io.NewSectionReader(b, 0, b.Size()))
	if err != nil {
		t.Fatal(err)
	}
	return out
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

func ref(s string) blobstore.Ref {
	r, err := blobstore.ParseRef(s)
	if err != nil {
		panic(err)
	}
	return r
}

func digestFromString(s string) digest.Digest { return digest.Digest(s) }

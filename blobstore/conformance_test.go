package blobstore_test

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/blobstore"
	"imagestore/blobstore/blobstoretest"

	"github.com/opencontainers/go-digest"
)

// localHarness runs the conformance suite on the local backend, with a
// small checkpoint interval so resumes land between checkpoints too;
// noPaths hides its paths as a backend without files would.
func localHarness(noPaths bool) blobstoretest.Harness {
	return blobstoretest.Harness{
		NewBackend: func(t *testing.T, root string) blobstore.Backend {
			l, err := blobstore.NewLocal(blobstore.LocalOptions{Root: root, CheckpointEvery: 256 << 10, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			if noPaths {
				return blobstoretest.NoPaths(l)
			}
			return l
		},
		Corrupt: func(t *testing.T, root string, d digest.Digest, off int64) {
			p := filepath.Join(root, "blobs", "sha256", d.Encoded()[:2], d.Encoded())
			if err := os.Chmod(p, 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			b := []byte{0}
			if _, err := f.ReadAt(b, off); err != nil {
				t.Fatal(err)
			}
			b[0] ^= 0x01
			if _, err := f.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
		},
	}
}

func TestConformanceLocal(t *testing.T) { blobstoretest.Run(t, localHarness(false)) }

func TestConformanceLocalNoPaths(t *testing.T) { blobstoretest.Run(t, localHarness(true)) }

// TestNoPaths checks the wrapper the callers' no-path tests rely on.
func TestNoPaths(t *testing.T) {
	root := t.TempDir()
	s, err := blobstore.Open(t.Context(), blobstore.Options{Root: root, Backend: localHarness(true).NewBackend(t, root)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d, _, err := s.Put(t.Context(), strings.NewReader("no path"), -1, "")
	if err != nil {
		t.Fatal(err)
	}
	if p, err := s.BlobPath(d); !errors.Is(err, blobstore.ErrNoLocalPath) {
		t.Fatalf("BlobPath = %q, %v; want ErrNoLocalPath", p, err)
	}
	if err := s.VerifyBlob(t.Context(), d); err != nil {
		t.Fatal(err)
	}
}

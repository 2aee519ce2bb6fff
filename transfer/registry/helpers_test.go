package registry_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/registry/registrytest"
	"imagestore/transfer/replicate"
)

// newNode is a registry with a replication engine, and token if not "".
func newNode(t testing.TB, token string) *registrytest.Node {
	t.Helper()
	return registrytest.Start(t, registrytest.Options{Token: token, Engine: &replicate.Options{RetryDelay: 100 * time.Millisecond}})
}

func randBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// compressible returns n bytes zstd shrinks a lot but not trivially.
func compressible(n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %d of a compressible layer\n", i)
	}
	return b.Bytes()[:n]
}

// makeChain stores a chain name:l0 <- name:l1 ... with blobs of the given sizes.
func makeChain(t testing.TB, st *blobstore.Store, name string, sizes ...int) []blobstore.Image {
	t.Helper()
	ctx := context.Background()
	var out []blobstore.Image
	parent := ""
	base := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	for i, sz := range sizes {
		data := randBytes(t, sz)
		d, n, err := st.Put(ctx, bytes.NewReader(data), int64(sz), "")
		if err != nil {
			t.Fatal(err)
		}
		img := blobstore.Image{Ref: blobstore.Ref{Name: name, ID: fmt.Sprintf("l%d", i)}, Blob: d, Parent: parent,
			Created: base.Add(time.Duration(i) * time.Minute), Size: n, VirtualSize: 1 << 30, Format: "raw", Desc: "test layer"}
		if err := st.PutImage(ctx, img); err != nil {
			t.Fatal(err)
		}
		out = append(out, img)
		parent = img.Ref.String()
	}
	return out
}

func readBlob(t testing.TB, st *blobstore.Store, d digest.Digest) []byte {
	t.Helper()
	b, err := st.OpenBlob(context.Background(), d)
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

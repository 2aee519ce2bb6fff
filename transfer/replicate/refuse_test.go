package replicate_test

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/registry/registrytest"
	"imagestore/transfer/replicate"
)

// leftovers counts the blobs and ingests a store holds.
func leftovers(t *testing.T, st *blobstore.Store) (blobs, ingests int) {
	t.Helper()
	if err := st.WalkBlobs(context.Background(), func(blobstore.BlobInfo) error { blobs++; return nil }); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Join(st.Root(), "ingest"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return blobs, len(ents)
}

// TestRefusedPullLeavesNothing: a pull the puller refuses (a qcow2 a
// hostile peer records as raw) and a pull whose peer streams more than it
// declared both fail, leaving no blob and no ingest behind.
func TestRefusedPullLeavesNothing(t *testing.T) {
	ctx := context.Background()
	var evil bytes.Buffer
	if _, err := qcow2.Write(ctx, &evil, 1<<20, nil, bytes.NewReader(nil), qcow2.WriteOptions{BackingFile: "/etc/passwd"}); err != nil {
		t.Fatal(err)
	}
	var long string // the blob whose GET the peer pads
	pad := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if long != "" && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+long) {
				w.WriteHeader(http.StatusOK)
				_, _ = w.Write(bytes.Repeat([]byte{7}, 256<<10)) // more than declared
				return
			}
			h.ServeHTTP(w, r)
		})
	}
	src := newNode(t, pad)
	d, n, err := src.Store.Put(ctx, bytes.NewReader(evil.Bytes()), int64(evil.Len()), "")
	if err != nil {
		t.Fatal(err)
	}
	// The peer is compromised: its record bypasses every check.
	if err := src.Store.PutImage(ctx, blobstore.Image{Ref: blobstore.Ref{Name: "vol", ID: "raw"}, Blob: d, Size: n, Format: "raw", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	chain := makeChain(t, src.Store, "big", 1, 64<<10)
	long = chain[0].Blob.String()

	for _, ref := range []blobstore.Ref{{Name: "vol", ID: "raw"}, chain[0].Ref} {
		t.Run(ref.String(), func(t *testing.T) {
			dst := registrytest.Start(t, registrytest.Options{Engine: &replicate.Options{Retries: 1, RetryDelay: 10 * time.Millisecond}})
			_, task := run(t, dst.Engine.Pull, dst.Engine, replicate.Request{Name: ref.Name, ID: ref.ID, Addr: src.Addr()})
			if task.Status != replicate.StatusFailed {
				t.Fatalf("pull of %s: %+v", ref, task)
			}
			t.Logf("refused: %s", task.Error)
			if b, i := leftovers(t, dst.Store); b != 0 || i != 0 {
				t.Fatalf("refused pull left %d blobs and %d ingests", b, i)
			}
			if imgs, _ := dst.Store.ListImages(ctx, ""); len(imgs) != 0 {
				t.Fatalf("refused pull recorded %v", imgs)
			}
		})
	}
}

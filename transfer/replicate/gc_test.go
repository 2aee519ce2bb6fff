package replicate_test

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"imagestore/blobstore"
	"imagestore/transfer/replicate"
)

// TestPullHoldsLayersFoundLocally: a layer the puller already has (no
// record names it, so GC may free it) stays held while the other layers
// download; a GC run meanwhile frees nothing the pull relies on.
func TestPullHoldsLayersFoundLocally(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	dst, err := blobstore.Open(ctx, blobstore.Options{Root: root, CommitGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	eng, err := replicate.New(replicate.Options{Store: dst, Dir: root + "/registry/tasks", Metrics: replicate.NewMetrics(nil), Retries: 1, RetryDelay: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })

	var gcRuns, freed atomic.Int64
	var gcErr, layer atomic.Value
	layer.Store("unset")
	src := newNode(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// While the top layer downloads, collect garbage on the puller.
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+layer.Load().(string)) && gcRuns.Add(1) == 1 {
				res, err := dst.GC(context.Background(), nil)
				if err != nil {
					gcErr.Store(err)
				}
				freed.Store(int64(res.BlobsFreed))
			}
			h.ServeHTTP(w, r)
		})
	})
	chain := makeChain(t, src.st, "vol", 2, 64<<10)
	layer.Store(chain[1].Blob.String())
	// The base blob is already here, unreferenced.
	b, err := src.st.OpenBlob(ctx, chain[0].Blob)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, b.Size())
	_, _ = b.ReadAt(data, 0)
	b.Close()
	if _, _, err := dst.Put(ctx, bytes.NewReader(data), int64(len(data)), chain[0].Blob); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Millisecond) // past CommitGrace

	top := chain[1].Ref
	_, task := run(t, eng.Pull, eng, replicate.Request{Name: top.Name, ID: top.ID, Addr: src.addr()})
	if task.Status != replicate.StatusSuccess || task.Skipped != 1 {
		t.Fatalf("pull: %+v", task)
	}
	if err, _ := gcErr.Load().(error); err != nil {
		t.Fatal(err)
	}
	if gcRuns.Load() == 0 {
		t.Fatal("the top layer was not downloaded")
	}
	if n := freed.Load(); n != 0 {
		t.Fatalf("GC during the pull freed %d blobs (the layer found locally was not held)", n)
	}
	sameChain(t, src.st, dst, top)
}

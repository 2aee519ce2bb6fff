package replicate_test

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"imagestore/transfer/registry/registrytest"
	"imagestore/transfer/replicate"
)

// TestPullHoldsLayersFoundLocally: a layer the puller already has (no
// record names it, so GC may free it) stays held while the other layers
// download; a GC run meanwhile frees nothing the pull relies on.
func TestPullHoldsLayersFoundLocally(t *testing.T) {
	ctx := context.Background()
	dstNode := registrytest.Start(t, registrytest.Options{CommitGrace: time.Nanosecond, Engine: &replicate.Options{
		Retries: 1, RetryDelay: 50 * time.Millisecond,
	}})
	dst, eng := dstNode.Store, dstNode.Engine

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
	chain := makeChain(t, src.Store, "vol", 2, 64<<10)
	layer.Store(chain[1].Blob.String())
	// The base blob is already here, unreferenced.
	b, err := src.Store.OpenBlob(ctx, chain[0].Blob)
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
	_, task := run(t, eng.Pull, eng, replicate.Request{Name: top.Name, ID: top.ID, Addr: src.Addr()})
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
	sameChain(t, src.Store, dst, top)
}

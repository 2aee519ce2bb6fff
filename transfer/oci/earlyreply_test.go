package oci

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// endlessReaderAt serves any offset without holding the data.
type endlessReaderAt struct{}

func (endlessReaderAt) ReadAt(p []byte, off int64) (int, error) {
	for i := range p {
		p[i] = byte(off + int64(i))
	}
	return len(p), nil
}

// A server that refuses an upload before taking its body (a full store
// answering 507) makes net/http return from Do while its transport may
// still be reading the body. PushBlob must not call Progress (or feed its
// hasher) after it returned: the caller's own bookkeeping races with it
// otherwise (seen as a data race in transfer/replicate's quota test).
func TestPushBlobNoProgressAfterReturn(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodPost:
			w.Header().Set("Location", "/v2/x/blobs/uploads/u1")
			w.WriteHeader(http.StatusAccepted)
		case http.MethodPatch:
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusInsufficientStorage)
			_, _ = w.Write([]byte(`{"errors":[{"code":"DENIED","message":"quota exceeded"}]}`))
		default:
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	t.Cleanup(srv.Close)
	c, err := New(Options{Addr: srv.URL, ResumeAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	const size = 1 << 30
	for range 5 {
		var returned atomic.Bool
		var late atomic.Int64
		var sent int64 // plain, as callers keep it: the race detector watches it
		err := c.PushBlob(context.Background(), "x", digest.Digest("sha256:"+strings.Repeat("0", 64)), size,
			endlessReaderAt{}, PushOptions{NoCompress: true, Progress: func(n int64) {
				sent += n
				if returned.Load() {
					late.Add(1)
				}
			}})
		returned.Store(true)
		if err == nil {
			t.Fatal("PushBlob to a server answering 507 succeeded")
		}
		_ = sent // read after return, as sendBlob does
		time.Sleep(50 * time.Millisecond)
		if n := late.Load(); n != 0 {
			t.Fatalf("%d progress calls after PushBlob returned (%v)", n, err)
		}
	}
}

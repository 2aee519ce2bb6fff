package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"imagestore/agent/registry"
	"imagestore/blobstore"
	"imagestore/transfer/replicate"
)

// store is a registry port serving a temp store.
type store struct {
	url   string
	addr  string
	token string
	st    *blobstore.Store
	m     *replicate.Metrics
}

// startStore serves a fresh store's registry on 127.0.0.1:0.
func startStore(t *testing.T, token string) *store {
	t.Helper()
	st, err := blobstore.Open(context.Background(), blobstore.Options{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	m := replicate.NewMetrics(nil)
	srv, err := registry.New(registry.Options{Store: st, Token: token, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(func() {
		hs.CloseClientConnections()
		hs.Close()
		st.Close()
	})
	return &store{url: hs.URL, addr: strings.TrimPrefix(hs.URL, "http://"), token: token, st: st, m: m}
}

// received is the blob bytes the store took in through uploads.
func (s *store) received() int64 { return int64(testutil.ToFloat64(s.m.ReceivedBytes)) }

// syncBuffer is a bytes.Buffer safe for the progress goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// cli runs the command in-process and returns stdout, stderr and the exit code.
func cli(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errb syncBuffer
	code := run(ctx, args, &out, &errb)
	return out.String(), errb.String(), code
}

// cliOK runs the command and fails the test unless it exits 0.
func cliOK(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, code := cli(t, args...)
	if code != 0 {
		t.Fatalf("imagestore %q: exit %d\nstdout: %s\nstderr: %s", args, code, out, errs)
	}
	return out
}

func cliJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	out := cliOK(t, args...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("imagestore %q: bad JSON %v: %s", args, err, out)
	}
}

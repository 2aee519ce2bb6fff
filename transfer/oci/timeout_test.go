package oci

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// hangingServer takes every request and answers none until the client
// gives up or the test ends, except a manifest PUT, which answers 201 once
// release is closed. entered gets a value when a manifest PUT has arrived.
func hangingServer(t *testing.T) (srv *httptest.Server, entered chan struct{}, release chan struct{}) {
	entered, release = make(chan struct{}, 1), make(chan struct{})
	end := make(chan struct{})
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/") {
			entered <- struct{}{}
			select {
			case <-release:
				w.WriteHeader(http.StatusCreated)
			case <-r.Context().Done():
			case <-end:
			}
			return
		}
		select {
		case <-r.Context().Done():
		case <-end:
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(end) }) // runs first: handlers return, Close does not wait
	return srv, entered, release
}

// TestTimeouts: a peer that takes the connection and never answers costs
// QuickTimeout for a HEAD or an upload status, HeaderTimeout for any other
// request, while a manifest PUT waits up to ManifestTimeout.
func TestTimeouts(t *testing.T) {
	const short = 50 * time.Millisecond
	srv, entered, release := hangingServer(t)
	// Quick and header timeouts short (the quick one shorter, so it is the
	// one that fires where it applies); the manifest's far away (the test
	// ends its wait by releasing it).
	c, err := New(Options{Addr: srv.URL, QuickTimeout: short, HeaderTimeout: 5 * short, ManifestTimeout: time.Hour, ResumeAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	d := digest.FromString("x")
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		call func() error
		want string // in the error
	}{
		{"HEAD manifest", func() error { _, err := c.HeadManifest(ctx, "v", "i"); return err }, "no answer within"},
		{"HEAD blob", func() error { _, err := c.StatBlob(ctx, "v", d); return err }, "no answer within"},
		{"upload status", func() error { _, _, err := c.uploadStatus(ctx, "/v2/v/blobs/uploads/u"); return err }, "no answer within"},
		{"ping", func() error { return c.Ping(ctx) }, "no answer within"},
		{"GET manifest", func() error { _, _, err := c.GetManifest(ctx, "v", "i"); return err }, "timeout awaiting response headers"},
		{"GET blob", func() error { _, err := c.GetBlob(ctx, "v", d, 0, 1); return err }, "timeout awaiting response headers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one saying %q", err, tc.want)
			}
		})
	}

	// The manifest PUT outlives a header timeout: while it waits, a GET
	// that started after it gives up; then the server answers the PUT.
	type result struct {
		d   digest.Digest
		err error
	}
	done := make(chan result, 1)
	body := []byte(`{}`)
	go func() {
		d, err := c.PutManifest(ctx, "v", "i", MediaTypeManifest, body)
		done <- result{d, err}
	}()
	<-entered
	if _, _, err := c.GetManifest(ctx, "v", "i"); err == nil || !strings.Contains(err.Error(), "timeout awaiting response headers") {
		t.Fatalf("GET while the PUT waits: %v", err)
	}
	close(release)
	if r := <-done; r.err != nil || r.d != digest.FromBytes(body) {
		t.Fatalf("manifest PUT: %v %v", r.d, r.err)
	}

	// ManifestTimeout itself ends a manifest PUT that gets no answer.
	srv2, entered2, _ := hangingServer(t)
	c2, err := New(Options{Addr: srv2.URL, ManifestTimeout: short})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.CloseIdleConnections()
	_, err = c2.PutManifest(ctx, "v", "i", MediaTypeManifest, body)
	<-entered2
	if err == nil || !strings.Contains(err.Error(), "timeout awaiting response headers") {
		t.Fatalf("manifest PUT to a hanging server: %v", err)
	}

	// A caller's own cancellation is reported as such, not as our timeout.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.HeadManifest(cctx, "v", "i"); !errors.Is(err, context.Canceled) || strings.Contains(err.Error(), "no answer within") {
		t.Fatalf("cancelled HEAD: %v", err)
	}
}

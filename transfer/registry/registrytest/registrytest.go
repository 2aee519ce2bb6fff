// Package registrytest runs the registry (transfer/registry) over a temp
// store on a loopback httptest server, for the tests of the registry and of
// its peers (transfer/oci, transfer/replicate). Everything it starts is
// stopped by t.Cleanup.
package registrytest

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"imagestore/blobstore"
	"imagestore/transfer/oci"
	"imagestore/transfer/registry"
	"imagestore/transfer/replicate"
)

// Options shape a Node. The zero value is a plain-HTTP registry without
// a token or a replication engine.
type Options struct {
	Token string
	// Engine, if set, gives the node a replication engine (the /v1 API)
	// with these options; Store, Dir (<root>/registry/tasks) and Metrics
	// are filled in.
	Engine *replicate.Options
	// CommitGrace is the store's (0: blobstore's default); a test that
	// checks what GC frees sets it to a nanosecond.
	CommitGrace time.Duration
	// TLS serves HTTPS with httptest's certificate (Node.CA is its PEM).
	TLS bool
	// Cert, if set, is the certificate HTTPS is served with instead
	// (implies TLS; Node.CA is its leaf's PEM), e.g. ZStack's kind: one
	// self-signed certificate named store.zstack.org on every store.
	Cert *tls.Certificate
	// Wrap, if set, wraps the registry's handler (fault injection).
	Wrap func(http.Handler) http.Handler
	// BodyReadIdle is the registry's (0: its default).
	BodyReadIdle time.Duration
}

// Node is one running registry and what it serves.
type Node struct {
	Root    string // the store's root
	Store   *blobstore.Store
	Engine  *replicate.Engine // nil without Options.Engine
	Metrics *replicate.Metrics
	Server  *registry.Server
	HTTP    *httptest.Server
}

// Start runs a registry over a fresh store in t.TempDir().
func Start(t testing.TB, opts Options) *Node {
	t.Helper()
	n := &Node{Root: t.TempDir(), Metrics: replicate.NewMetrics(nil)}
	st, err := blobstore.Open(context.Background(), blobstore.Options{
		Root: n.Root, CommitGrace: opts.CommitGrace, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	n.Store = st
	t.Cleanup(func() { st.Close() })
	if opts.Engine != nil {
		eo := *opts.Engine
		eo.Store, eo.Dir, eo.Metrics = st, n.Root+"/registry/tasks", n.Metrics
		if n.Engine, err = replicate.New(eo); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Engine.Close() })
	}
	n.Server, err = registry.New(registry.Options{Store: st, Engine: n.Engine, Token: opts.Token, Metrics: n.Metrics, BodyReadIdle: opts.BodyReadIdle})
	if err != nil {
		t.Fatal(err)
	}
	h := n.Server.Handler()
	if opts.Wrap != nil {
		h = opts.Wrap(h)
	}
	switch {
	case opts.Cert != nil:
		n.HTTP = httptest.NewUnstartedServer(h)
		n.HTTP.TLS = &tls.Config{Certificates: []tls.Certificate{*opts.Cert}}
		n.HTTP.StartTLS()
	case opts.TLS:
		n.HTTP = httptest.NewTLSServer(h)
	default:
		n.HTTP = httptest.NewServer(h)
	}
	// Registered last, so it runs first: no request is in flight when the
	// engine and the store close.
	t.Cleanup(func() { n.HTTP.CloseClientConnections(); n.HTTP.Close() })
	return n
}

// URL is the registry's base URL (http:// or https://).
func (n *Node) URL() string { return n.HTTP.URL }

// Addr is the registry's host:port.
func (n *Node) Addr() string {
	return strings.TrimPrefix(strings.TrimPrefix(n.HTTP.URL, "http://"), "https://")
}

// CA is the PEM of the certificate a TLS node serves ("" without TLS).
func (n *Node) CA() string {
	if n.HTTP.Certificate() == nil {
		return ""
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: n.HTTP.Certificate().Raw}))
}

// Client is an OCI client of the node (plain HTTP nodes only).
func (n *Node) Client(t testing.TB, token string, compress bool) *oci.Client {
	t.Helper()
	c, err := oci.New(oci.Options{Addr: n.HTTP.URL, Token: token, Compress: compress})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

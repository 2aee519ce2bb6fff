package hostxfer

import (
	"context"
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent/images"
	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/transfer/sshfs"
)

func newOptions(t *testing.T) Options {
	t.Helper()
	store, err := blobstore.Open(context.Background(), blobstore.Options{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	layers, err := layer.New(layer.Options{Blobs: store})
	if err != nil {
		t.Fatal(err)
	}
	imgs, err := images.New(images.Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	return Options{Layers: layers, Images: imgs}
}

// Two services are independent; each registers its counters on its own
// registry, a second on the same registry is refused, and Close
// unregisters them.
func TestServicesAreIndependent(t *testing.T) {
	opts := newOptions(t)
	reg := prometheus.NewRegistry()
	opts.Registerer = reg
	a, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(opts); err == nil {
		t.Fatal("a second service registered the same counters on the same registry")
	}
	other := opts
	other.Registerer = prometheus.NewRegistry()
	b, err := New(other)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.Pool() == b.Pool() {
		t.Fatal("two services share one pool")
	}
	h := sshfs.Host{Addr: "kvm1:22", User: "root"}
	a.laneRefused(h)
	if a.lanes(h) != 1 || b.lanes(h) != MaxLanes {
		t.Fatalf("lanes after a refusal: %d here, %d in the other service; want 1 and %d", a.lanes(h), b.lanes(h), MaxLanes)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	c, err := New(opts)
	if err != nil {
		t.Fatalf("after Close, the counters are still registered: %v", err)
	}
	_ = c.Close()
}

// A host key is checked against the pin or known_hosts; with neither the
// request is refused before anything is dialled.
func TestHostKeyPolicy(t *testing.T) {
	s, err := New(newOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.host(Login{Hostname: "kvm1", Username: "root", Password: "pw"}); !errors.Is(err, sshfs.ErrHostKey) {
		t.Fatalf("no pin, no known_hosts: %v, want ErrHostKey", err)
	}
	_, err = s.Pull(context.Background(), PullRequest{Login: Login{Hostname: "kvm1", Username: "root", Password: "pw"}, Path: "/x", Name: "x"}, nil)
	if !errors.Is(err, sshfs.ErrHostKey) {
		t.Fatalf("Pull: %v, want ErrHostKey", err)
	}
	h, err := s.host(Login{Hostname: "kvm1", Username: "root", Password: "pw", HostKeyFingerprint: "SHA256:x"})
	if err != nil || h.Addr != "kvm1:22" || h.Fingerprint != "SHA256:x" {
		t.Fatalf("pinned: %+v, %v", h, err)
	}
	if _, err := New(Options{}); err == nil {
		t.Fatal("New without Layers and Images succeeded")
	}
}

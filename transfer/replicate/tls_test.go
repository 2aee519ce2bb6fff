package replicate_test

import (
	"context"
	"testing"
	"time"

	"imagestore/blobstore"
	"imagestore/internal/testcert"
	"imagestore/transfer/registry/registrytest"
	"imagestore/transfer/replicate"
)

// TestPushOverTLSWithToken pushes to a peer serving HTTPS with a token,
// trusting only the CA given in the request; a wrong CA or token fails.
func TestPushOverTLSWithToken(t *testing.T) {
	a := newNode(t, nil)
	peer := registrytest.Start(t, registrytest.Options{Token: "peer-token", TLS: true})
	st, ca, addr := peer.Store, peer.CA(), peer.Addr()
	img := addImage(t, a.Store, blobstore.Ref{Name: "v", ID: "tls"}, "", 128<<10)

	otherCA := string(testcert.NewCA(t).CertPEM()) // httptest servers all share one certificate: a CA of our own
	ctx := context.Background()
	for _, c := range []struct {
		name, ca, token string
		ok              bool
	}{
		{"untrusted CA", otherCA, "peer-token", false},
		{"wrong token", ca, "nope", false},
		{"right CA and token", ca, "peer-token", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			id, err := a.Engine.Push(ctx, replicate.Request{Name: "v", ID: "tls", Addr: addr, CA: c.ca, Token: c.token})
			if err == nil && id != replicate.Existed {
				task, werr := a.Engine.Wait(ctx, id)
				if werr != nil {
					t.Fatal(werr)
				}
				if task.Status != replicate.StatusSuccess {
					err = errString(task.Error)
				}
			}
			if (err == nil) != c.ok {
				t.Fatalf("push: %v, want ok=%v", err, c.ok)
			}
		})
	}
	if !st.Exists(img.Blob) {
		t.Fatal("blob not on the TLS peer")
	}
}

type errString string

func (e errString) Error() string { return string(e) }

// TestBandwidthLimit: a task's budget holds for the whole push (lower bound only).
func TestBandwidthLimit(t *testing.T) {
	a, b := newNode(t, nil), newNode(t, nil)
	chain := makeChain(t, a.Store, "v", 2, 2<<20) // 4 MiB in two parallel streams
	start := time.Now()
	_, task := run(t, a.Engine.Push, a.Engine, replicate.Request{Name: "v", ID: chain[1].ID, Addr: b.Addr(), NetworkWriteBandwidth: 4 << 20})
	if task.Status != replicate.StatusSuccess {
		t.Fatalf("%+v", task)
	}
	if el := time.Since(start); el < 800*time.Millisecond {
		t.Fatalf("4 MiB at 4 MiB/s took %v", el)
	}
}

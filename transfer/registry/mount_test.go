package registry_test

import (
	"bytes"
	"context"
	"net/http"
	"testing"
	"time"
)

// TestMountHoldsBlob: a blob answered to ?mount= (which no record names
// yet) is held from GC until the client's manifest can record it.
func TestMountHoldsBlob(t *testing.T) {
	ctx := context.Background()
	st, hs := graceNode(t)
	d, _, err := st.Put(ctx, bytes.NewReader(randBytes(t, 4096)), 4096, "")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Millisecond) // past CommitGrace

	missing := "sha256:" + string(bytes.Repeat([]byte("ab"), 32))
	resp, body := do(t, http.MethodPost, hs.URL+"/v2/vol/blobs/uploads/?mount="+missing+"&from=other", nil, nil)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("mount of a missing blob: %d %s, want 202 (an upload session)", resp.StatusCode, body)
	}
	resp, body = do(t, http.MethodPost, hs.URL+"/v2/vol/blobs/uploads/?mount="+d.String()+"&from=other", nil, nil)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("mount: %d %s", resp.StatusCode, body)
	}
	res, err := st.GC(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.BlobsFreed != 0 || !st.Exists(d) {
		t.Fatalf("GC freed %d blobs right after a mount answered for %s", res.BlobsFreed, d)
	}
}

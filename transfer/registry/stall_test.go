package registry_test

import (
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/transfer/crcframe"
	"imagestore/transfer/oci"
	"imagestore/transfer/registry/registrytest"
)

// TestStalledBodyReleasesUpload: a PATCH or PUT whose body stops arriving
// mid-way (the client alive, its connection open) fails after
// BodyReadIdle; the upload is then free again (its status answers, not
// 503), keeps the bytes that arrived, and completes when the client
// resumes from its offset.
func TestStalledBodyReleasesUpload(t *testing.T) {
	const idle = 300 * time.Millisecond
	for _, tc := range []struct {
		name, method, query string
		framed              bool
	}{
		{"PATCH identity", http.MethodPatch, "", false},
		{"PATCH crc32c frames", http.MethodPatch, "", true},
		{"PUT ?size identity", http.MethodPut, "?size=" + strconv.Itoa(1<<20), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := registrytest.Start(t, registrytest.Options{BodyReadIdle: idle})
			u := startUpload(t, n.HTTP.URL)
			data := randBytes(t, 1<<20)
			sent := data[:64<<10]
			var hdr map[string]string
			if tc.framed {
				hdr = map[string]string{"Content-Encoding": crcframe.Encoding}
				sent = frames(t, sent, 16<<10)
			}
			pr, pw := io.Pipe()
			defer pw.Close()
			req, err := http.NewRequest(tc.method, u+tc.query, pr)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range hdr {
				req.Header.Set(k, v)
			}
			answered := make(chan struct{})
			go func() {
				defer close(answered)
				if resp, err := http.DefaultClient.Do(req); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}()
			if _, err := pw.Write(sent); err != nil {
				t.Fatal(err)
			}
			// The body stalls here. Once BodyReadIdle passes, the request
			// fails and the upload's status answers again.
			start := time.Now()
			var off int64
			for {
				resp, b := do(t, http.MethodGet, u, nil, nil)
				if resp.StatusCode == http.StatusNoContent {
					if off, err = strconv.ParseInt(resp.Header.Get(oci.HeaderUploadOffset), 10, 64); err != nil {
						t.Fatal(err)
					}
					if off > 0 {
						break
					}
				} else if resp.StatusCode != http.StatusServiceUnavailable {
					t.Fatalf("upload status while a body stalls: %d %s", resp.StatusCode, b)
				}
				if time.Since(start) > 20*idle {
					t.Fatalf("the upload is still held %s after its body stalled (BodyReadIdle %s)", time.Since(start).Round(time.Millisecond), idle)
				}
				time.Sleep(idle / 10)
			}
			if off != 64<<10 {
				t.Fatalf("after the stalled request the upload holds %d bytes, want the %d that arrived", off, 64<<10)
			}
			select {
			case <-answered:
			case <-time.After(10 * time.Second):
				t.Fatal("the stalled request was never ended")
			}
			// The client resumes from the offset and completes.
			if resp, b := do(t, http.MethodPatch, u, data[off:], nil); resp.StatusCode != http.StatusAccepted {
				t.Fatalf("resumed PATCH: %d %s", resp.StatusCode, b)
			}
			want := digest.FromBytes(data)
			if resp, b := do(t, http.MethodPut, u+"?digest="+want.String(), nil, nil); resp.StatusCode != http.StatusCreated {
				t.Fatalf("PUT after the resume: %d %s", resp.StatusCode, b)
			}
		})
	}
}

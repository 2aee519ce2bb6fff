package registry_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/transfer/oci"
)

// startUpload opens an upload session and returns its URL.
func startUpload(t *testing.T, base string) string {
	t.Helper()
	resp, b := do(t, http.MethodPost, base+"/v2/vol/blobs/uploads/", nil, nil)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("POST upload: %d %s", resp.StatusCode, b)
	}
	if got := resp.Header.Get("Range"); got != "0-0" {
		t.Errorf("empty upload Range %q, want 0-0", got)
	}
	if got := resp.Header.Get(oci.HeaderUploadOffset); got != "0" {
		t.Errorf("empty upload offset %q", got)
	}
	return base + resp.Header.Get("Location")
}

// TestUploadProtocolEdges: a PATCH body must match its Content-Range (400,
// never truncated, no overflow), the empty upload's status says 0-0, and
// only sha256 digests are valid.
func TestUploadProtocolEdges(t *testing.T) {
	n := newNode(t, "")
	base := n.HTTP.URL

	u := startUpload(t, base)
	resp, b := do(t, http.MethodGet, u, nil, nil)
	if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Range") != "0-0" {
		t.Fatalf("status of an empty upload: %d Range %q %s", resp.StatusCode, resp.Header.Get("Range"), b)
	}
	for _, tc := range []struct {
		name, cr string
		body     []byte
		code     string
	}{
		{"body shorter than Content-Range", "0-9", []byte("12345"), oci.CodeBlobUploadInvalid},
		{"body longer than Content-Range", "0-1", []byte("12345"), oci.CodeBlobUploadInvalid},
		{"Content-Range end 2^63-1", "0-9223372036854775807", []byte("12345"), oci.CodeBlobUploadInvalid},
		{"Content-Range end before start", "5-3", []byte("1"), oci.CodeBlobUploadInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := startUpload(t, base)
			resp, b := do(t, http.MethodPatch, u, tc.body, map[string]string{"Content-Range": tc.cr})
			if resp.StatusCode != http.StatusBadRequest || errCode(t, b) != tc.code {
				t.Fatalf("PATCH %s with %d bytes: %d %s", tc.cr, len(tc.body), resp.StatusCode, b)
			}
			t.Logf("%s", b)
		})
	}
	// A chunked body (no Content-Length) longer than its Content-Range.
	u = startUpload(t, base)
	req, _ := http.NewRequest(http.MethodPatch, u, struct{ *strings.Reader }{strings.NewReader("0123456789")})
	req.Header.Set("Content-Range", "0-3")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("chunked body longer than its range: %d", resp.StatusCode)
	}

	sha512 := digest.SHA512.FromBytes([]byte("x")).String()
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/v2/vol/blobs/" + sha512},
		{http.MethodGet, "/v2/vol/manifests/" + sha512},
		{http.MethodPost, "/v2/vol/blobs/uploads/?digest=" + sha512},
	} {
		resp, b := do(t, tc.method, base+tc.path, []byte("x"), nil)
		if resp.StatusCode != http.StatusBadRequest || errCode(t, b) != oci.CodeDigestInvalid {
			t.Errorf("%s %s: %d %s, want 400 DIGEST_INVALID", tc.method, tc.path, resp.StatusCode, b)
		}
	}
}

// TestRepositoryNamesAndTags: names follow the distribution grammar ("/"
// included): a grammatical multi-component name is unknown to reads and
// invalid for writes, an ungrammatical one invalid; a malformed tag is
// an unknown manifest.
func TestRepositoryNamesAndTags(t *testing.T) {
	n := newNode(t, "")
	base := n.HTTP.URL
	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{http.MethodGet, "/v2/library/vol/manifests/l0", http.StatusNotFound, oci.CodeNameUnknown},
		{http.MethodGet, "/v2/a/b/c/tags/list", http.StatusNotFound, oci.CodeNameUnknown},
		{http.MethodPost, "/v2/library/vol/blobs/uploads/", http.StatusBadRequest, oci.CodeNameInvalid},
		{http.MethodGet, "/v2/Library/Vol/manifests/l0", http.StatusBadRequest, oci.CodeNameInvalid},
		{http.MethodGet, "/v2/vol/manifests/-bad!tag", http.StatusNotFound, oci.CodeManifestUnknown},
		{http.MethodHead, "/v2/vol/manifests/" + strings.Repeat("t", 300), http.StatusNotFound, ""},
	} {
		resp, b := do(t, tc.method, base+tc.path, nil, nil)
		if resp.StatusCode != tc.status || (tc.code != "" && errCode(t, b) != tc.code) {
			t.Errorf("%s %s: %d %s, want %d %s", tc.method, tc.path, resp.StatusCode, b, tc.status, tc.code)
		}
	}
}

// TestManifestDigestGetsBack: the digest a manifest PUT answers is the one
// a GET returns, whether the client pushed the bytes we serve or the same
// manifest formatted otherwise (under a tag); under a digest, only the
// bytes we serve are accepted, and a refusal records nothing.
func TestManifestDigestGetsBack(t *testing.T) {
	n := newNode(t, "")
	base := n.HTTP.URL
	makeChain(t, n.Store, "vol", 1000, 2000)
	resp, mb := do(t, http.MethodGet, base+"/v2/vol/manifests/l1", nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET: %d %s", resp.StatusCode, mb)
	}
	canon := digest.FromBytes(mb)
	m, err := oci.ParseManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	cfgURL := base + "/v2/vol/blobs/" + m.Config.Digest.String()
	resp, cfg := do(t, http.MethodGet, cfgURL, nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET config: %d", resp.StatusCode)
	}
	// The client uploads the config with the manifest (a DELETE forgets
	// the rendered one).
	putConfig := func() {
		if resp, b := do(t, http.MethodPost, base+"/v2/vol/blobs/uploads/?digest="+m.Config.Digest.String(), cfg, nil); resp.StatusCode != http.StatusCreated {
			t.Fatalf("config upload: %d %s", resp.StatusCode, b)
		}
	}
	var indented bytes.Buffer
	if err := json.Indent(&indented, mb, "", "  "); err != nil {
		t.Fatal(err)
	}
	ct := map[string]string{"Content-Type": oci.MediaTypeManifest}
	for _, tc := range []struct {
		name, ref string
		body      []byte
		status    int
	}{
		{"served bytes under the tag", "l1", mb, http.StatusCreated},
		{"reformatted under the tag", "l1", indented.Bytes(), http.StatusCreated},
		{"served bytes under their digest", canon.String(), mb, http.StatusCreated},
		{"reformatted under its own digest", digest.FromBytes(indented.Bytes()).String(), indented.Bytes(), http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if resp, b := do(t, http.MethodDelete, base+"/v2/vol/manifests/l1", nil, nil); resp.StatusCode != http.StatusAccepted {
				t.Fatalf("DELETE: %d %s", resp.StatusCode, b)
			}
			putConfig()
			resp, b := do(t, http.MethodPut, base+"/v2/vol/manifests/"+tc.ref, tc.body, ct)
			if resp.StatusCode != tc.status {
				t.Fatalf("PUT: %d %s", resp.StatusCode, b)
			}
			if tc.status != http.StatusCreated {
				if imgs, _ := n.Store.ListImages(t.Context(), "vol"); len(imgs) != 1 {
					t.Fatalf("refused PUT left records %v", imgs)
				}
				makeBack(t, base, mb) // restore l1 for a next case
				return
			}
			got := resp.Header.Get(oci.HeaderContentDigest)
			if got != canon.String() || !strings.HasSuffix(resp.Header.Get("Location"), got) {
				t.Fatalf("PUT answered %s (Location %s), GET serves %s", got, resp.Header.Get("Location"), canon)
			}
			r2, b2 := do(t, http.MethodGet, base+"/v2/vol/manifests/"+got, nil, nil)
			if r2.StatusCode != http.StatusOK || digest.FromBytes(b2).String() != got {
				t.Fatalf("GET of the answered digest: %d", r2.StatusCode)
			}
		})
	}
}

func makeBack(t *testing.T, base string, mb []byte) {
	t.Helper()
	resp, b := do(t, http.MethodPut, base+"/v2/vol/manifests/l1", mb, map[string]string{"Content-Type": oci.MediaTypeManifest})
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("re-PUT: %d %s", resp.StatusCode, b)
	}
}

// TestDigestLookupDeepChain: manifests of a 200-deep chain are found by
// digest (one in-memory pass over the repository's records, then a hint
// per digest), the same manifest as by tag.
func TestDigestLookupDeepChain(t *testing.T) {
	n := newNode(t, "")
	base := n.HTTP.URL
	sizes := make([]int, 200)
	for i := range sizes {
		sizes[i] = 16
	}
	chain := makeChain(t, n.Store, "deep", sizes...)
	for _, img := range []int{199, 100, 0, 199} {
		resp, mb := do(t, http.MethodGet, base+"/v2/deep/manifests/"+chain[img].ID, nil, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("by tag: %d", resp.StatusCode)
		}
		start := time.Now()
		r2, b2 := do(t, http.MethodGet, base+"/v2/deep/manifests/"+digest.FromBytes(mb).String(), nil, nil)
		t.Logf("%s by digest: %v", chain[img].Ref, time.Since(start))
		if r2.StatusCode != http.StatusOK || !bytes.Equal(b2, mb) {
			t.Fatalf("%s by digest: %d", chain[img].Ref, r2.StatusCode)
		}
	}
}

// TestV1BodyTooLarge: a /v1 body over the limit is refused as too large,
// not as a JSON error about where it was cut.
func TestV1BodyTooLarge(t *testing.T) {
	n := newNode(t, "")
	body := []byte(`{"name":"` + strings.Repeat("x", 2<<20) + `"}`)
	resp, b := do(t, http.MethodPost, n.HTTP.URL+"/v1/push", body, map[string]string{"Content-Type": "application/json"})
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(b), "too large") {
		t.Fatalf("2 MiB /v1/push body: %d %s", resp.StatusCode, b)
	}
}

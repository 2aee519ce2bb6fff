package registry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"imagestore/transfer/faultproxy"
	"imagestore/transfer/oci"
	"imagestore/transfer/registry/registrytest"
	"imagestore/transfer/replicate"
)

func do(t *testing.T, method, url string, body []byte, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func errCode(t *testing.T, b []byte) string {
	t.Helper()
	var eb oci.ErrorBody
	if err := json.Unmarshal(b, &eb); err != nil || len(eb.Errors) == 0 {
		t.Fatalf("not an OCI error body: %q", b)
	}
	return eb.Errors[0].Code
}

func TestAuth(t *testing.T) {
	n := newNode(t, "s3cret")
	open := newNode(t, "")
	cases := []struct {
		name   string
		url    string
		hdr    map[string]string
		status int
	}{
		{"no token configured", open.HTTP.URL + "/v2/", nil, 200},
		{"missing credentials", n.HTTP.URL + "/v2/", nil, 401},
		{"wrong bearer", n.HTTP.URL + "/v2/", map[string]string{"Authorization": "Bearer nope"}, 401},
		{"bearer", n.HTTP.URL + "/v2/", map[string]string{"Authorization": "Bearer s3cret"}, 200},
		{"basic with token as password", n.HTTP.URL + "/v2/", map[string]string{"Authorization": "Basic eDpzM2NyZXQ="}, 200}, // x:s3cret
		{"basic wrong password", n.HTTP.URL + "/v2/", map[string]string{"Authorization": "Basic eDp4"}, 401},
		{"v1 needs auth too", n.HTTP.URL + "/v1/tasks/x", nil, 401},
		{"blobs need auth too", n.HTTP.URL + "/v2/a/blobs/sha256:" + strings.Repeat("0", 64), nil, 401},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, b := do(t, "GET", c.url, nil, c.hdr)
			if resp.StatusCode != c.status {
				t.Fatalf("status %d, want %d (%s)", resp.StatusCode, c.status, b)
			}
			if c.status == 401 {
				if resp.Header.Get("WWW-Authenticate") == "" {
					t.Fatal("401 without WWW-Authenticate")
				}
				if errCode(t, b) != oci.CodeUnauthorized {
					t.Fatalf("code %s", errCode(t, b))
				}
			}
		})
	}
	if err := n.Client(t, "nope", false).Ping(context.Background()); !errors.Is(err, oci.ErrUnauthorized) {
		t.Fatalf("client with wrong token: %v", err)
	}
	if err := n.Client(t, "s3cret", false).Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestChunkedUploadAndReads(t *testing.T) {
	n := newNode(t, "")
	data := randBytes(t, 300<<10)
	d := digest.FromBytes(data)
	base := n.HTTP.URL + "/v2/vol1/blobs/"

	resp, b := do(t, "POST", base+"uploads/", nil, nil)
	if resp.StatusCode != 202 {
		t.Fatalf("POST: %d %s", resp.StatusCode, b)
	}
	loc := n.HTTP.URL + resp.Header.Get("Location")
	// Two chunks, the second starting where the first ended.
	resp, b = do(t, "PATCH", loc, data[:100<<10], map[string]string{"Content-Range": fmt.Sprintf("0-%d", 100<<10-1)})
	if resp.StatusCode != 202 || resp.Header.Get("Range") != fmt.Sprintf("0-%d", 100<<10-1) {
		t.Fatalf("PATCH 1: %d range %q %s", resp.StatusCode, resp.Header.Get("Range"), b)
	}
	// A chunk at the wrong offset is refused with the current offset.
	resp, b = do(t, "PATCH", loc, data[:10], map[string]string{"Content-Range": "5-14"})
	if resp.StatusCode != 416 || errCode(t, b) != oci.CodeRangeInvalid {
		t.Fatalf("misplaced PATCH: %d %s", resp.StatusCode, b)
	}
	resp, _ = do(t, "GET", loc, nil, nil)
	if resp.StatusCode != 204 || resp.Header.Get("Range") != fmt.Sprintf("0-%d", 100<<10-1) {
		t.Fatalf("status: %d %q", resp.StatusCode, resp.Header.Get("Range"))
	}
	resp, b = do(t, "PATCH", loc, data[100<<10:], map[string]string{"Content-Range": fmt.Sprintf("%d-%d", 100<<10, len(data)-1)})
	if resp.StatusCode != 202 {
		t.Fatalf("PATCH 2: %d %s", resp.StatusCode, b)
	}
	resp, b = do(t, "PUT", loc+"?digest="+d.String(), nil, nil)
	if resp.StatusCode != 201 || resp.Header.Get(oci.HeaderContentDigest) != d.String() {
		t.Fatalf("PUT: %d %s", resp.StatusCode, b)
	}
	if got := readBlob(t, n.Store, d); !bytes.Equal(got, data) {
		t.Fatal("stored blob differs")
	}
	// Reads.
	resp, _ = do(t, "HEAD", base+d.String(), nil, nil)
	if resp.StatusCode != 200 || resp.ContentLength != int64(len(data)) {
		t.Fatalf("HEAD: %d len %d", resp.StatusCode, resp.ContentLength)
	}
	resp, b = do(t, "GET", base+d.String(), nil, map[string]string{"Range": "bytes=10-19"})
	if resp.StatusCode != 206 || !bytes.Equal(b, data[10:20]) {
		t.Fatalf("Range GET: %d %d bytes", resp.StatusCode, len(b))
	}
	resp, b = do(t, "GET", base+"sha256:"+strings.Repeat("1", 64), nil, nil)
	if resp.StatusCode != 404 || errCode(t, b) != oci.CodeBlobUnknown {
		t.Fatalf("unknown blob: %d %s", resp.StatusCode, b)
	}
	resp, b = do(t, "GET", base+"nonsense", nil, nil)
	if resp.StatusCode != 400 || errCode(t, b) != oci.CodeDigestInvalid {
		t.Fatalf("bad digest: %d %s", resp.StatusCode, b)
	}
	// Cross-mount of a held blob, and monolithic upload.
	resp, _ = do(t, "POST", n.HTTP.URL+"/v2/other/blobs/uploads/?mount="+d.String()+"&from=vol1", nil, nil)
	if resp.StatusCode != 201 {
		t.Fatalf("mount: %d", resp.StatusCode)
	}
	small := []byte("monolithic")
	resp, b = do(t, "POST", base+"uploads/?digest="+digest.FromBytes(small).String(), small, nil)
	if resp.StatusCode != 201 || !n.Store.Exists(digest.FromBytes(small)) {
		t.Fatalf("monolithic: %d %s", resp.StatusCode, b)
	}
	// DELETE cancels an upload.
	resp, _ = do(t, "POST", base+"uploads/", nil, nil)
	loc = n.HTTP.URL + resp.Header.Get("Location")
	if resp, _ = do(t, "DELETE", loc, nil, nil); resp.StatusCode != 204 {
		t.Fatalf("DELETE: %d", resp.StatusCode)
	}
	if resp, b = do(t, "GET", loc, nil, nil); resp.StatusCode != 404 || errCode(t, b) != oci.CodeBlobUploadUnknown {
		t.Fatalf("cancelled upload: %d %s", resp.StatusCode, b)
	}
}

func TestDigestMismatchStoresNothing(t *testing.T) {
	n := newNode(t, "")
	data := randBytes(t, 64<<10)
	wrong := digest.FromBytes([]byte("something else"))
	resp, _ := do(t, "POST", n.HTTP.URL+"/v2/v/blobs/uploads/", nil, nil)
	loc := n.HTTP.URL + resp.Header.Get("Location")
	do(t, "PATCH", loc, data, nil)
	resp, b := do(t, "PUT", loc+"?digest="+wrong.String(), nil, nil)
	if resp.StatusCode != 400 || errCode(t, b) != oci.CodeDigestInvalid {
		t.Fatalf("PUT wrong digest: %d %s", resp.StatusCode, b)
	}
	if n.Store.Exists(wrong) || n.Store.Exists(digest.FromBytes(data)) {
		t.Fatal("a blob was stored despite the mismatch")
	}
	if resp, _ = do(t, "GET", loc, nil, nil); resp.StatusCode != 404 {
		t.Fatalf("upload survived a failed commit: %d", resp.StatusCode)
	}
	// Monolithic too.
	resp, b = do(t, "POST", n.HTTP.URL+"/v2/v/blobs/uploads/?digest="+wrong.String(), data, nil)
	if resp.StatusCode != 400 || errCode(t, b) != oci.CodeDigestInvalid {
		t.Fatalf("monolithic wrong digest: %d %s", resp.StatusCode, b)
	}
}

func TestZstd(t *testing.T) {
	n := newNode(t, "")
	ctx := context.Background()
	c := n.Client(t, "", true)
	data := compressible(3 << 20)
	d := digest.FromBytes(data)
	if err := c.PushBlob(ctx, "z", d, int64(len(data)), bytes.NewReader(data), oci.PushOptions{}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readBlob(t, n.Store, d), data) {
		t.Fatal("zstd upload stored different bytes")
	}
	// Download negotiates zstd and decodes to the same bytes.
	resp, raw := do(t, "GET", n.HTTP.URL+"/v2/z/blobs/"+d.String(), nil, map[string]string{"Accept-Encoding": "zstd"})
	if resp.Header.Get("Content-Encoding") != "zstd" || len(raw) >= len(data)/2 {
		t.Fatalf("GET with zstd: encoding %q, %d bytes", resp.Header.Get("Content-Encoding"), len(raw))
	}
	rc, err := c.GetBlob(ctx, "z", d, 0, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("client zstd download: %v, equal=%v", err, bytes.Equal(got, data))
	}
	// A declared size smaller than what the stream decodes to is a bomb.
	rc, err = c.GetBlob(ctx, "z", d, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(rc)
	rc.Close()
	if !errors.Is(err, oci.ErrTooLarge) {
		t.Fatalf("oversized download: %v", err)
	}
	// Server side: a zstd PATCH decoding past its Content-Range is refused.
	enc, _ := zstd.NewWriter(nil)
	bomb := enc.EncodeAll(make([]byte, 8<<20), nil)
	resp, _ = do(t, "POST", n.HTTP.URL+"/v2/z/blobs/uploads/", nil, nil)
	loc := n.HTTP.URL + resp.Header.Get("Location")
	resp, b := do(t, "PATCH", loc, bomb, map[string]string{"Content-Encoding": "zstd", "Content-Range": "0-1023"})
	if resp.StatusCode != 400 || errCode(t, b) != oci.CodeSizeInvalid {
		t.Fatalf("zstd bomb: %d %s", resp.StatusCode, b)
	}
	// Incompressible data goes out as is.
	rnd := randBytes(t, 2<<20)
	rd := digest.FromBytes(rnd)
	if err := c.PushBlob(ctx, "z", rd, int64(len(rnd)), bytes.NewReader(rnd), oci.PushOptions{}); err != nil {
		t.Fatal(err)
	}
	resp, _ = do(t, "GET", n.HTTP.URL+"/v2/z/blobs/"+rd.String(), nil, map[string]string{"Accept-Encoding": "zstd"})
	if resp.Header.Get("Content-Encoding") != "" {
		t.Fatalf("incompressible blob sent with %q", resp.Header.Get("Content-Encoding"))
	}
}

func TestUploadResumesAfterCut(t *testing.T) {
	for _, compress := range []bool{false, true} {
		t.Run(fmt.Sprintf("zstd=%v", compress), func(t *testing.T) {
			n := newNode(t, "")
			p := faultproxy.New(t, n.Addr())
			p.CutAfter(5 << 20)
			p.CutNext(2)
			c, err := oci.New(oci.Options{Addr: p.Addr(), Compress: compress})
			if err != nil {
				t.Fatal(err)
			}
			defer c.CloseIdleConnections()
			var data []byte
			if compress {
				data = append(compressible(8<<20), randBytes(t, 12<<20)...)
			} else {
				data = randBytes(t, 20<<20)
			}
			d := digest.FromBytes(data)
			var sent int64
			err = c.PushBlob(context.Background(), "cut", d, int64(len(data)), bytes.NewReader(data), oci.PushOptions{Progress: func(n int64) { sent += n }})
			if err != nil {
				t.Fatal(err)
			}
			if p.Cuts() == 0 {
				t.Fatal("the proxy never cut; the test proves nothing")
			}
			if !bytes.Equal(readBlob(t, n.Store, d), data) {
				t.Fatal("resumed upload stored different bytes")
			}
			if sent != int64(len(data)) {
				t.Fatalf("progress ends at %d, want %d", sent, len(data))
			}
		})
	}
}

func TestCorruptSourceNeverCommitted(t *testing.T) {
	n := newNode(t, "")
	c := n.Client(t, "", false)
	data := randBytes(t, 1<<20)
	d := digest.FromBytes(data)
	bad := bytes.Clone(data)
	bad[12345] ^= 0xff
	err := c.PushBlob(context.Background(), "x", d, int64(len(bad)), bytes.NewReader(bad), oci.PushOptions{})
	if !errors.Is(err, oci.ErrSourceDigest) {
		t.Fatalf("push of corrupt source: %v", err)
	}
	if n.Store.Exists(d) {
		t.Fatal("corrupt source committed")
	}
}

func TestManifestsAndTags(t *testing.T) {
	n := newNode(t, "")
	ctx := context.Background()
	chain := makeChain(t, n.Store, "vol", 1000, 2000, 3000)
	c := n.Client(t, "", false)
	mb, desc, err := c.GetManifest(ctx, "vol", "l2")
	if err != nil {
		t.Fatal(err)
	}
	m, err := oci.ParseManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != 3 || m.Layers[0].Digest != chain[0].Blob || m.Layers[2].Digest != chain[2].Blob {
		t.Fatalf("layers not base first: %+v", m.Layers)
	}
	// Stable and addressable by digest.
	mb2, _, err := c.GetManifest(ctx, "vol", desc.Digest.String())
	if err != nil || !bytes.Equal(mb, mb2) {
		t.Fatalf("by digest: %v", err)
	}
	hd, err := c.HeadManifest(ctx, "vol", "l2")
	if err != nil || hd.Digest != desc.Digest {
		t.Fatalf("HEAD: %v %v", hd, err)
	}
	cb, err := c.FetchSmallBlob(ctx, "vol", m.Config.Digest, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := replicate.ParseConfig(cb)
	if err != nil || len(cfg.Chain) != 3 || cfg.Chain[2].Ref != chain[2].Ref {
		t.Fatalf("config: %v %+v", err, cfg)
	}
	tags, err := c.Tags(ctx, "vol")
	if err != nil || strings.Join(tags, ",") != "l0,l1,l2" {
		t.Fatalf("tags %v %v", tags, err)
	}
	resp, b := do(t, "GET", n.HTTP.URL+"/v2/vol/tags/list?n=1&last=l0", nil, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(b), `["l1"]`) {
		t.Fatalf("paged tags: %s", b)
	}
	if _, _, err := c.GetManifest(ctx, "vol", "nope"); !errors.Is(err, oci.ErrNotFound) {
		t.Fatalf("unknown tag: %v", err)
	}

	// PUT onto a second store: refused until blobs arrive, then records appear.
	n2 := newNode(t, "")
	c2 := n2.Client(t, "", false)
	if _, err := c2.PutManifest(ctx, "vol", "l2", oci.MediaTypeManifest, mb); err == nil {
		t.Fatal("manifest accepted without its blobs")
	}
	if err := c2.PutBlob(ctx, "vol", m.Config.Digest, cb); err != nil {
		t.Fatal(err)
	}
	for _, img := range chain {
		data := readBlob(t, n.Store, img.Blob)
		if err := c2.PutBlob(ctx, "vol", img.Blob, data); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c2.PutManifest(ctx, "vol", "l1", oci.MediaTypeManifest, mb); !errors.Is(err, oci.ErrManifestInvalid) {
		t.Fatalf("manifest under the wrong tag: %v", err)
	}
	if imgs, _ := n2.Store.ListImages(ctx, "vol"); len(imgs) != 0 {
		t.Fatalf("refused manifest left records: %v", imgs)
	}
	if _, err := c2.PutManifest(ctx, "vol", "l2", oci.MediaTypeManifest, mb); err != nil {
		t.Fatal(err)
	}
	hd2, err := c2.HeadManifest(ctx, "vol", "l2")
	if err != nil || hd2.Digest != desc.Digest {
		t.Fatalf("digest on receiver %v, source %v (%v)", hd2.Digest, desc.Digest, err)
	}
	got, err := n2.Store.Chain(ctx, chain[2].Ref)
	if err != nil || len(got) != 3 {
		t.Fatalf("receiver chain: %v %v", got, err)
	}
}

// TestUploadResumesFromZeroAfterServerLoss: the first PATCH dies after the
// server read part of it but before anything became durable (as with a
// kill -9), so the upload resumes from offset 0; the source hash must be
// recomputed, not carried over from the lost attempt.
func TestUploadResumesFromZeroAfterServerLoss(t *testing.T) {
	var patches atomic.Int32
	n := registrytest.Start(t, registrytest.Options{Wrap: func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPatch && patches.Add(1) == 1 {
				_, _ = io.CopyN(io.Discard, r.Body, 1<<20) // read, never store
				conn, _, err := w.(http.Hijacker).Hijack()
				if err == nil {
					conn.Close()
				}
				return
			}
			h.ServeHTTP(w, r)
		})
	}})
	st, hs := n.Store, n.HTTP
	c, err := oci.New(oci.Options{Addr: hs.URL})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	data := randBytes(t, 4<<20)
	d := digest.FromBytes(data)
	if err := c.PushBlob(context.Background(), "v", d, int64(len(data)), bytes.NewReader(data), oci.PushOptions{}); err != nil {
		t.Fatal(err)
	}
	if patches.Load() < 2 || !st.Exists(d) {
		t.Fatalf("%d PATCHes, blob stored: %v", patches.Load(), st.Exists(d))
	}
}

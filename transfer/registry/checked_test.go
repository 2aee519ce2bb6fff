package registry_test

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/transfer/crcframe"
	"imagestore/transfer/oci"
)

// frames encodes b as crc32c frames of at most size bytes.
func frames(t *testing.T, b []byte, size int) []byte {
	t.Helper()
	var out bytes.Buffer
	if _, err := crcframe.NewWriter(&out, size).Write(b); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// uploadOffset is the upload's durable offset (its status).
func uploadOffset(t *testing.T, u string) int64 {
	t.Helper()
	resp, b := do(t, http.MethodGet, u, nil, nil)
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("upload status: %d %s", resp.StatusCode, b)
	}
	n, err := strconv.ParseInt(resp.Header.Get(oci.HeaderUploadOffset), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestCheckedUpload: a session offers the checked upload; framed chunks
// (streamed or with a Content-Range) are accepted frame by frame, a frame
// that fails its crc32c is refused with none of its bytes taken (the
// upload stays at the frame before it and goes on from there), and a PUT
// by size commits under the digest the store computed; the standard forms
// keep working beside it, and a wrong size stores nothing.
func TestCheckedUpload(t *testing.T) {
	n := newNode(t, "")
	base := n.HTTP.URL
	data := randBytes(t, 3<<20+100)
	want := digest.FromBytes(data)
	framed := map[string]string{"Content-Encoding": crcframe.Encoding}

	// The offer is on the answer that starts a session.
	resp, b := do(t, http.MethodPost, base+"/v2/vol/blobs/uploads/", nil, nil)
	if resp.StatusCode != http.StatusAccepted || resp.Header.Get(oci.HeaderUploadExtensions) != oci.ExtCRC32CFrames {
		t.Fatalf("POST upload: %d, %s %q %s", resp.StatusCode, oci.HeaderUploadExtensions, resp.Header.Get(oci.HeaderUploadExtensions), b)
	}
	u := base + resp.Header.Get("Location")

	// 1 MiB as a streamed framed PATCH, the next 1 MiB with a Content-Range.
	if resp, b := do(t, http.MethodPatch, u, frames(t, data[:1<<20], 256<<10), framed); resp.StatusCode != http.StatusAccepted {
		t.Fatalf("framed PATCH: %d %s", resp.StatusCode, b)
	}
	hdr := map[string]string{"Content-Encoding": crcframe.Encoding, "Content-Range": fmt.Sprintf("%d-%d", 1<<20, 2<<20-1)}
	if resp, b := do(t, http.MethodPatch, u, frames(t, data[1<<20:2<<20], 1<<20), hdr); resp.StatusCode != http.StatusAccepted {
		t.Fatalf("framed PATCH with Content-Range: %d %s", resp.StatusCode, b)
	}

	// The rest in 4 frames of which the third has a flipped byte: the
	// first two are taken, nothing of the third.
	rest := data[2<<20:]
	body := frames(t, rest, 300<<10)
	bad := 2*(crcframe.HeaderSize+300<<10) + crcframe.HeaderSize + 1000
	body[bad] ^= 0x40
	resp, b = do(t, http.MethodPatch, u, body, framed)
	if resp.StatusCode != http.StatusBadRequest || errCode(t, b) != oci.CodeChecksumInvalid {
		t.Fatalf("PATCH with a corrupted frame: %d %s, want 400 %s", resp.StatusCode, b, oci.CodeChecksumInvalid)
	}
	t.Logf("%s", b)
	at := int64(2<<20 + 600<<10)
	if got := uploadOffset(t, u); got != at {
		t.Fatalf("after the corrupted frame the upload holds %d bytes, want %d (the frames before it)", got, at)
	}

	// A PUT by the wrong size removes the upload and stores nothing
	// (on a second session with the same bytes).
	u2 := startUpload(t, base)
	if resp, b := do(t, http.MethodPatch, u2, frames(t, data, 1<<20), framed); resp.StatusCode != http.StatusAccepted {
		t.Fatalf("framed PATCH: %d %s", resp.StatusCode, b)
	}
	resp, b = do(t, http.MethodPut, u2+"?size="+strconv.Itoa(len(data)-1), nil, nil)
	if resp.StatusCode != http.StatusBadRequest || errCode(t, b) != oci.CodeSizeInvalid {
		t.Fatalf("PUT by a wrong size: %d %s", resp.StatusCode, b)
	}
	if n.Store.Exists(want) {
		t.Fatal("a PUT by a wrong size stored the blob")
	}
	if resp, _ := do(t, http.MethodGet, u2, nil, nil); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("the upload of a refused PUT is still there: %d", resp.StatusCode)
	}

	// The remaining bytes go in the completing PUT (framed), by size.
	resp, b = do(t, http.MethodPut, u+"?size="+strconv.Itoa(len(data)), frames(t, data[at:], 1<<20), framed)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT by size: %d %s", resp.StatusCode, b)
	}
	if got := resp.Header.Get(oci.HeaderContentDigest); got != want.String() {
		t.Fatalf("the store answered %s, the bytes are %s", got, want)
	}
	if got := readBlob(t, n.Store, want); !bytes.Equal(got, data) {
		t.Fatal("stored blob differs from the bytes sent")
	}

	// Refusals that stay as they were: a PUT with neither digest nor size,
	// a bad size, a malformed frame.
	u3 := startUpload(t, base)
	for _, tc := range []struct {
		method, query string
		body          []byte
		code          string
	}{
		{http.MethodPut, "", nil, oci.CodeDigestInvalid},
		{http.MethodPut, "?size=-1", nil, oci.CodeSizeInvalid},
		{http.MethodPut, "?size=x", nil, oci.CodeSizeInvalid},
		{http.MethodPatch, "", []byte{0, 0, 0, 0, 0, 0, 0, 0}, oci.CodeBlobUploadInvalid},
		{http.MethodPatch, "", []byte{0, 0, 0, 5, 0, 0}, oci.CodeBlobUploadInvalid},
	} {
		resp, b := do(t, tc.method, u3+tc.query, tc.body, framed)
		if resp.StatusCode != http.StatusBadRequest || errCode(t, b) != tc.code {
			t.Errorf("%s %s: %d %s, want 400 %s", tc.method, tc.query, resp.StatusCode, b, tc.code)
		}
	}
}

// TestCheckedUploadQuota: framed bytes count against the quota as any
// others: a framed PATCH past it is refused (507) and the upload keeps
// only what fitted.
func TestCheckedUploadQuota(t *testing.T) {
	n := newNode(t, "")
	if err := n.Store.SetQuota(1 << 20); err != nil {
		t.Fatal(err)
	}
	u := startUpload(t, n.HTTP.URL)
	resp, b := do(t, http.MethodPatch, u, frames(t, randBytes(t, 3<<20), 512<<10), map[string]string{"Content-Encoding": crcframe.Encoding})
	if resp.StatusCode != http.StatusInsufficientStorage || errCode(t, b) != oci.CodeQuotaExceeded {
		t.Fatalf("framed PATCH past the quota: %d %s", resp.StatusCode, b)
	}
	if got := uploadOffset(t, u); got > 1<<20 {
		t.Fatalf("the upload holds %d bytes, past the quota", got)
	}
}

// TestUploadStatusWhileWritten: the status GET of an upload that a
// request is still writing (a PATCH whose client is gone but whose
// handler has not yet seen the cut) must not answer the last checkpoint:
// that request is about to add its bytes, and a client that resumed from
// the stale offset with a PATCH (which has no Content-Range) would have
// its bytes appended after them. In a checked upload nothing would catch
// the shifted bytes: the PUT names only the size, which a second cut can
// make right. It answers 503 with Retry-After instead, and the offset
// once the request is over.
func TestUploadStatusWhileWritten(t *testing.T) {
	for _, tc := range []struct {
		name string
		hdr  map[string]string
		body func([]byte) []byte
	}{
		{"identity", nil, func(b []byte) []byte { return b }},
		{"crc32c frames", map[string]string{"Content-Encoding": crcframe.Encoding}, func(b []byte) []byte { return frames(t, b, 64<<10) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t, "")
			u := startUpload(t, n.HTTP.URL)
			data := randBytes(t, 1<<20)
			if resp, b := do(t, http.MethodPatch, u, tc.body(data[:256<<10]), tc.hdr); resp.StatusCode != http.StatusAccepted {
				t.Fatalf("first PATCH: %d %s", resp.StatusCode, b)
			}

			// A PATCH whose body is still arriving holds the upload.
			pr, pw := io.Pipe()
			req, err := http.NewRequest(http.MethodPatch, u, pr)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tc.hdr {
				req.Header.Set(k, v)
			}
			answered := make(chan error, 1)
			go func() {
				resp, err := http.DefaultClient.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusAccepted {
						err = fmt.Errorf("held PATCH: %d", resp.StatusCode)
					}
				}
				answered <- err
			}()
			rest := tc.body(data[256<<10:])
			if _, err := pw.Write(rest[:len(rest)/2]); err != nil {
				t.Fatal(err)
			}
			// The handler runs once the ingest grows past the first PATCH.
			data0 := filepath.Join(n.Root, "ingest", "upload-"+path.Base(u), "data")
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
				if fi, err := os.Stat(data0); err == nil && fi.Size() > 256<<10 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the held PATCH wrote nothing")
				}
			}
			resp, b := do(t, http.MethodGet, u, nil, nil)
			if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
				t.Fatalf("status of an upload being written: %d (offset %s) %s, want 503 with Retry-After",
					resp.StatusCode, resp.Header.Get(oci.HeaderUploadOffset), b)
			}
			if _, err := pw.Write(rest[len(rest)/2:]); err != nil {
				t.Fatal(err)
			}
			pw.Close()
			if err := <-answered; err != nil {
				t.Fatal(err)
			}
			if got := uploadOffset(t, u); got != int64(len(data)) {
				t.Fatalf("after the PATCH the upload holds %d bytes, want %d", got, len(data))
			}
		})
	}
}

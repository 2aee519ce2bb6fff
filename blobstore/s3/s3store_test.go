package s3store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/blobstore"
	"imagestore/blobstore/s3/rgwtest"
	"imagestore/internal/redact"
	"imagestore/internal/retry"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/opencontainers/go-digest"
)

var rgw rgwtest.Shared

func TestMain(m *testing.M) {
	if spec := os.Getenv(envCrashChild); spec != "" {
		crashChild(spec)
		os.Exit(0)
	}
	os.Exit(rgw.Run(m))
}

const testPart = 5 << 20 // S3's minimum part size keeps test objects small

// newBackend opens a Backend on a fresh bucket of the test cluster.
func newBackend(t testing.TB, mod ...func(*Options)) (*Backend, *rgwtest.Cluster, string) {
	t.Helper()
	c := rgw.Get(t)
	bucket := c.TestBucket(t)
	b := openBackend(t, c, bucket, mod...)
	return b, c, bucket
}

func openBackend(t testing.TB, c *rgwtest.Cluster, bucket string, mod ...func(*Options)) *Backend {
	t.Helper()
	o := Options{
		Endpoint: c.Endpoint, Bucket: bucket, Prefix: "store1", Region: c.Region, PathStyle: true,
		AccessKey: redact.Secret(c.AccessKey), SecretKey: redact.Secret(c.SecretKey),
		PartSize: testPart, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Retry: retry.Policy{Attempts: 60, Initial: 100 * time.Millisecond, Max: 2 * time.Second},
	}
	for _, f := range mod {
		f(&o)
	}
	b, err := New(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	p := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			p[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		p[i] = byte(r.Uint32())
	}
	return p
}

// ingestCommit ingests data under ref and commits it under the digest
// the ingest computed.
func ingestCommit(t testing.TB, b *Backend, ref string, data []byte) Committed {
	t.Helper()
	w, err := b.Writer(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	res, err := w.commit(t.Context(), -1, "")
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// uploads lists the multipart uploads left in the bucket.
func uploads(t testing.TB, b *Backend) []string {
	t.Helper()
	out, err := b.cli.ListMultipartUploads(t.Context(), &s3.ListMultipartUploadsInput{Bucket: &b.bucket})
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, u := range out.Uploads {
		keys = append(keys, aws.ToString(u.Key))
	}
	return keys
}

// keys lists every object key under the backend's prefix, without it.
func keys(t testing.TB, b *Backend, under string) []string {
	t.Helper()
	var ks []string
	if err := b.list(t.Context(), b.prefix+under, "", func(k string, _ object) error {
		ks = append(ks, strings.TrimPrefix(k, b.prefix))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return ks
}

func readAll(t testing.TB, b *Backend, d digest.Digest) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := b.ReadBlob(t.Context(), d, &buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestNewSaysWhatIsWrong(t *testing.T) {
	c := rgw.Get(t)
	bucket := c.TestBucket(t)
	base := func(o *Options) { o.Retry = retry.Policy{Attempts: 2, Initial: 10 * time.Millisecond} }
	for _, tc := range []struct {
		name string
		mod  func(*Options)
		want error
	}{
		{"closed port", func(o *Options) { o.Endpoint = "http://127.0.0.1:1" }, ErrUnreachable},
		{"bad secret", func(o *Options) { o.SecretKey = "wrong-secret-value" }, ErrCredentials},
		{"bad access key", func(o *Options) { o.AccessKey = "NOSUCHKEY" }, ErrCredentials},
		{"missing bucket", func(o *Options) { o.Bucket = bucket + "-missing" }, ErrNoBucket},
		{"not a URL", func(o *Options) { o.Endpoint = "127.0.0.1:7480" }, ErrConfig},
		{"tiny parts", func(o *Options) { o.PartSize = 1 << 20 }, ErrConfig},
		{"prefix escapes", func(o *Options) { o.Prefix = "a/../b" }, ErrConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := Options{Endpoint: c.Endpoint, Bucket: bucket, Region: c.Region, PathStyle: true,
				AccessKey: redact.Secret(c.AccessKey), SecretKey: redact.Secret(c.SecretKey)}
			base(&o)
			tc.mod(&o)
			_, err := New(t.Context(), o)
			if !errors.Is(err, tc.want) {
				t.Fatalf("New: %v, want %v", err, tc.want)
			}
			for _, s := range []string{fmt.Sprint(err), fmt.Sprintf("%+v %#v", o, o)} {
				if strings.Contains(s, c.SecretKey) || strings.Contains(s, "wrong-secret-value") {
					t.Fatalf("secret printed: %s", s)
				}
			}
		})
	}
}

func TestRecordsAndSettings(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	key := "images/vol1/1.json"
	if err := b.PutRecord(ctx, key, []byte(`{"a":1}`)); err != nil {
		t.Fatal(err)
	}
	if err := b.PutRecord(ctx, key, []byte(`{"a":2}`)); !errors.Is(err, blobstore.ErrExists) {
		t.Fatalf("second PutRecord: %v, want ErrExists", err)
	}
	if got, err := b.GetRecord(ctx, key); err != nil || string(got) != `{"a":1}` {
		t.Fatalf("GetRecord = %q, %v (the first write must stay)", got, err)
	}
	if _, err := b.GetRecord(ctx, "images/vol1/2.json"); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("missing record: %v", err)
	}
	if err := b.PutRecord(ctx, "images/../x", nil); !errors.Is(err, blobstore.ErrInvalidName) {
		t.Fatalf("bad key: %v", err)
	}
	if err := b.PutRecord(ctx, "images/vol2/1.json", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	ls, err := b.ListRecords(ctx, "images/")
	if err != nil || len(ls) != 2 || ls[0].Key != key || ls[1].Key != "images/vol2/1.json" || ls[0].ModTime.IsZero() {
		t.Fatalf("ListRecords = %+v, %v", ls, err)
	}
	if ls, _ := b.ListRecords(ctx, "images/vol2/"); len(ls) != 1 {
		t.Fatalf("ListRecords(vol2) = %+v", ls)
	}
	if err := b.DeleteRecord(ctx, key); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteRecord(ctx, key); err != nil {
		t.Fatalf("deleting an absent record: %v", err)
	}
	if _, err := b.ReadSettings(ctx); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("ReadSettings before any write: %v", err)
	}
	for _, s := range []string{`{"quota":1}`, `{"quota":2}`} {
		if err := b.WriteSettings(ctx, []byte(s)); err != nil {
			t.Fatal(err)
		}
		if got, err := b.ReadSettings(ctx); err != nil || string(got) != s {
			t.Fatalf("ReadSettings = %q, %v, want %s", got, err, s)
		}
	}
}

func TestIngestSmallAndRead(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	data := randBytes(1, 100_000)
	w, err := b.Writer(ctx, "small")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Writer(ctx, "small"); !errors.Is(err, blobstore.ErrLocked) {
		t.Fatalf("second Writer: %v, want ErrLocked", err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	want := digest.FromBytes(data)
	if w.Digest() != want {
		t.Fatal("Digest differs")
	}
	res, err := w.commit(ctx, int64(len(data)), want)
	if err != nil || res.Digest != want || res.Existed {
		t.Fatalf("commit = %+v, %v", res, err)
	}
	if ks := keys(t, b, "ingest/"); len(ks) != 0 {
		t.Fatalf("ingest objects left: %v", ks)
	}
	bi, err := b.StatBlob(ctx, want)
	if err != nil || bi.Size != int64(len(data)) {
		t.Fatalf("StatBlob = %+v, %v", bi, err)
	}
	bl, err := b.OpenBlob(ctx, want)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1000)
	if n, err := bl.ReadAt(p, 5000); err != nil || n != 1000 || !bytes.Equal(p, data[5000:6000]) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if n, err := bl.ReadAt(p, int64(len(data))-10); err != io.EOF || n != 10 || !bytes.Equal(p[:10], data[len(data)-10:]) {
		t.Fatalf("ReadAt at the end = %d, %v", n, err)
	}
	// A Blob outlives the ctx that opened it, like an open file.
	octx, cancel := context.WithCancel(ctx)
	bl2, err := b.OpenBlob(octx, want)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if n, err := bl2.ReadAt(p, 70_000); err != nil || n != len(p) || !bytes.Equal(p, data[70_000:71_000]) {
		t.Fatalf("ReadAt after the opening ctx ended = %d, %v", n, err)
	}
	bl2.Close()
	if _, err := bl2.ReadAt(p, 80_000); err == nil {
		t.Fatal("ReadAt after Close succeeded")
	}
	var seen []digest.Digest
	if err := b.WalkBlobs(ctx, func(bi blobstore.BlobInfo) error { seen = append(seen, bi.Digest); return nil }); err != nil || len(seen) != 1 || seen[0] != want {
		t.Fatalf("WalkBlobs = %v, %v", seen, err)
	}
	if _, err := b.Writer(ctx, "small"); err != nil {
		t.Fatalf("the ref is free again after commit: %v", err)
	}
}

// TestIngestResumeMultipart: parts and a closed tail survive the Writer;
// a new Writer resumes at the exact offset without re-sending a part, and
// the committed blob is byte-exact.
func TestIngestResumeMultipart(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	data := randBytes(2, 3*testPart+12345)
	w, err := b.Writer(ctx, "big")
	if err != nil {
		t.Fatal(err)
	}
	cut := 2*testPart + 777 // two parts and a tail
	if _, err := w.Write(data[:cut]); err != nil {
		t.Fatal(err)
	}
	if k := len(w.parts) + len(w.pending); k != 2 {
		t.Fatalf("%d parts uploaded or uploading, want 2", k)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if off, err := b.IngestOffset(ctx, "big"); err != nil || off != int64(cut) {
		t.Fatalf("IngestOffset = %d, %v, want %d", off, err, cut)
	}
	w, err = b.Writer(ctx, "big")
	if err != nil {
		t.Fatal(err)
	}
	if w.Offset() != int64(cut) || w.Resumed() != int64(cut) || len(w.parts) != 2 {
		t.Fatalf("resumed at %d with %d parts, want %d and 2", w.Offset(), len(w.parts), cut)
	}
	if _, err := w.Write(data[cut:]); err != nil {
		t.Fatal(err)
	}
	want := digest.FromBytes(data)
	res, err := w.commit(ctx, int64(len(data)), want)
	if err != nil || res.Digest != want {
		t.Fatalf("commit = %+v, %v", res, err)
	}
	if !bytes.Equal(readAll(t, b, want), data) {
		t.Fatal("blob differs from what was written")
	}
	if u := uploads(t, b); len(u) != 0 {
		t.Fatalf("uploads left: %v", u)
	}
	if ks := keys(t, b, "ingest/"); len(ks) != 0 {
		t.Fatalf("ingest objects left: %v", ks)
	}
}

// TestWrongDigestLeavesNothing: a mismatch aborts the upload and nothing
// becomes visible.
func TestWrongDigestLeavesNothing(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	for _, n := range []int{1000, 2*testPart + 5} {
		data := randBytes(uint64(n), n)
		w, err := b.Writer(ctx, "wrong")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(data); err != nil {
			t.Fatal(err)
		}
		wrong := digest.FromBytes([]byte("something else"))
		if _, err := w.commit(ctx, int64(n), wrong); !errors.Is(err, blobstore.ErrDigestMismatch) {
			t.Fatalf("commit with a wrong digest: %v", err)
		}
		if _, err := b.StatBlob(ctx, digest.FromBytes(data)); !errors.Is(err, blobstore.ErrNotFound) {
			t.Fatalf("blob of the real digest visible: %v", err)
		}
		if _, err := b.StatBlob(ctx, wrong); !errors.Is(err, blobstore.ErrNotFound) {
			t.Fatalf("blob of the wrong digest visible: %v", err)
		}
		if u := uploads(t, b); len(u) != 0 {
			t.Fatalf("uploads left: %v", u)
		}
		if ks := keys(t, b, ""); len(ks) != 0 {
			t.Fatalf("objects left: %v", ks)
		}
	}
}

// TestResumeUploadGone: a state whose upload was aborted (by a sweeper, an
// operator, or RGW's NoSuchKey for it) restarts the ingest from zero.
func TestResumeUploadGone(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	data := randBytes(3, testPart+10)
	w, err := b.Writer(ctx, "gone")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	id := w.uploadID
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.abort(ctx, b.ingestKey("gone", ingestData), id); err != nil {
		t.Fatal(err)
	}
	w, err = b.Writer(ctx, "gone")
	if err != nil {
		t.Fatal(err)
	}
	if w.Offset() != 0 {
		t.Fatalf("resumed at %d over an aborted upload, want 0", w.Offset())
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if _, err := w.commit(ctx, -1, digest.FromBytes(data)); err != nil {
		t.Fatal(err)
	}
}

// TestCommitExistingRenews: committing stored content keeps one copy and
// renews LastModified (what the GC grace counts from); a self-CopyObject
// with MetadataDirective=REPLACE does that on RGW. Also through the
// UploadPartCopy path that blobs over 5 GiB take.
func TestCommitExistingRenews(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	for _, multipartCopy := range []bool{false, true} {
		if multipartCopy {
			b.copyLimit, b.copyPart = testPart, testPart
		}
		data := randBytes(uint64(4+len(fmt.Sprint(multipartCopy))), 2*testPart+99)
		want := digest.FromBytes(data)
		put := func() Committed {
			w, err := b.Writer(ctx, "dup")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(data); err != nil {
				t.Fatal(err)
			}
			res, err := w.commit(ctx, -1, want)
			if err != nil {
				t.Fatal(err)
			}
			return res
		}
		if res := put(); res.Existed {
			t.Fatal("first commit reported an existing blob")
		}
		first, err := b.StatBlob(ctx, want)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(1100 * time.Millisecond) // LastModified has 1 s resolution in listings
		if res := put(); !res.Existed {
			t.Fatal("second commit did not find the blob")
		}
		second, err := b.StatBlob(ctx, want)
		if err != nil {
			t.Fatal(err)
		}
		if !second.ModTime.After(first.ModTime) {
			t.Fatalf("LastModified not renewed: %v then %v", first.ModTime, second.ModTime)
		}
		if !bytes.Equal(readAll(t, b, want), data) {
			t.Fatal("renewed blob differs")
		}
		if u := uploads(t, b); len(u) != 0 {
			t.Fatalf("uploads left: %v", u)
		}
	}
}

// TestSweepAbortsAbandoned: an ingest idle past the expiry loses its
// multipart upload and objects; a young one and an open one stay.
func TestSweepAbortsAbandoned(t *testing.T) {
	now := time.Now()
	clock := func() time.Time { return now }
	b, _, _ := newBackend(t, func(o *Options) { o.Now = func() time.Time { return clock() }; o.IngestExpiry = time.Hour })
	ctx := t.Context()
	for _, ref := range []string{"old", "open"} {
		w, err := b.Writer(ctx, ref)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(randBytes(5, testPart+1)); err != nil {
			t.Fatal(err)
		}
		if ref == "old" {
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
		} else {
			defer w.Cancel()
		}
	}
	// An upload with no state at all (a crash before the first state),
	// and the multipart copy of a blob over CopyObject's limit that a
	// crash interrupted (an upload at the blob's own key).
	key := b.ingestKey("nostate", ingestData)
	if _, err := b.cli.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &b.bucket, Key: &key}); err != nil {
		t.Fatal(err)
	}
	copyKey := b.blobKey(strings.Repeat("ab", 32))
	if _, err := b.cli.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &b.bucket, Key: &copyKey}); err != nil {
		t.Fatal(err)
	}
	if n, _, err := b.Sweep(ctx); err != nil || n != 0 {
		t.Fatalf("Sweep of young ingests removed %d, %v", n, err)
	}
	if u := uploads(t, b); len(u) != 4 {
		t.Fatalf("uploads after a no-op sweep: %v", u)
	}
	clock = func() time.Time { return now.Add(2 * time.Hour) }
	n, freed, err := b.Sweep(ctx)
	if err != nil || n != 2 || freed != testPart+1 {
		t.Fatalf("Sweep = %d, %d, %v; want 2 ingests, %d bytes", n, freed, err, testPart+1)
	}
	if u := uploads(t, b); len(u) != 1 || !strings.Contains(u[0], "/open/") {
		t.Fatalf("uploads after the sweep: %v (want only the open one)", u)
	}
	if ks := keys(t, b, "ingest/"); len(ks) != 1 || !strings.HasPrefix(ks[0], "ingest/open/") {
		t.Fatalf("ingest objects after the sweep: %v", ks)
	}
}

// TestRGWRestartMidUpload: RGW dies between parts and comes back; the
// Writer's retries carry the upload through and the blob is exact.
func TestRGWRestartMidUpload(t *testing.T) {
	b, c, _ := newBackend(t)
	ctx := t.Context()
	data := randBytes(6, 4*testPart+3)
	w, err := b.Writer(ctx, "restart")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data[:2*testPart]); err != nil {
		t.Fatal(err)
	}
	if err := c.KillRGW(); err != nil {
		t.Fatal(err)
	}
	back := make(chan error, 1)
	go func() {
		time.Sleep(2 * time.Second)
		back <- c.StartRGW(context.Background())
	}()
	if _, err := w.Write(data[2*testPart:]); err != nil {
		t.Fatalf("Write across the RGW restart: %v", err)
	}
	if err := <-back; err != nil {
		t.Fatal(err)
	}
	want := digest.FromBytes(data)
	if _, err := w.commit(ctx, -1, want); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, b, want), data) {
		t.Fatal("blob differs")
	}
}

// TestReadCache: repeated small reads are served from the cache, its size
// stays under the cap, and the bytes are right.
func TestReadCache(t *testing.T) {
	b, _, _ := newBackend(t, func(o *Options) { o.CacheBytes = 3 << 20; o.CacheChunk = 1 << 20 })
	ctx := t.Context()
	data := randBytes(7, 6<<20+5)
	w, err := b.Writer(ctx, "cache")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	d := digest.FromBytes(data)
	if _, err := w.commit(ctx, -1, d); err != nil {
		t.Fatal(err)
	}
	bl, err := b.OpenBlob(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 64<<10)
	for range 3 {
		for _, off := range []int64{0, 1<<20 - 100, 3 << 20} { // the second spans two chunks
			if n, err := bl.ReadAt(p, off); err != nil || n != len(p) || !bytes.Equal(p, data[off:off+int64(n)]) {
				t.Fatalf("ReadAt(%d) = %d, %v", off, n, err)
			}
		}
	}
	size, hits, misses := b.cache.stats()
	if misses != 3 || hits != 9 {
		t.Fatalf("cache: %d hits, %d misses; want 9 and 3", hits, misses)
	}
	if size > 3<<20 {
		t.Fatalf("cache holds %d bytes over its cap", size)
	}
	// Small reads over the whole blob: the cap still holds.
	for off := int64(0); off < int64(len(data)); off += int64(len(p)) {
		n, err := bl.ReadAt(p, off)
		if (err != nil && err != io.EOF) || !bytes.Equal(p[:n], data[off:off+int64(n)]) {
			t.Fatalf("ReadAt(%d) = %d, %v", off, n, err)
		}
	}
	if size, _, _ := b.cache.stats(); size > 3<<20 {
		t.Fatalf("cache holds %d bytes over its cap", size)
	}
	// A read of a chunk or more bypasses the cache.
	_, _, missesBefore := b.cache.stats()
	all := make([]byte, len(data))
	if n, err := bl.ReadAt(all, 0); err != nil || n != len(data) || !bytes.Equal(all, data) {
		t.Fatalf("full ReadAt = %d, %v", n, err)
	}
	if _, _, m := b.cache.stats(); m != missesBefore {
		t.Fatalf("a large read went through the cache (%d misses, was %d)", m, missesBefore)
	}
}

// TestIngestMemoryBounded: a 40 MiB ingest allocates its part buffers
// (PartsInFlight+1), not the blob.
func TestIngestMemoryBounded(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	chunk := randBytes(8, 1<<20)
	w, err := b.Writer(ctx, "mem")
	if err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 40 {
		if _, err := w.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.commit(ctx, 40<<20, ""); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("40 MiB ingest with %d-byte parts allocated %.1f MiB", testPart, float64(alloc)/(1<<20))
	// PartsInFlight uploading and one filling, and slack for one more.
	if limit := uint64(b.opts.PartsInFlight+2) * testPart; alloc > limit {
		t.Fatalf("allocated %d bytes for a 40 MiB ingest: more than %d part buffers", alloc, b.opts.PartsInFlight+2)
	}
}

func TestNewBadCAFile(t *testing.T) {
	c := rgw.Get(t)
	bad := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(bad, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{bad, filepath.Join(t.TempDir(), "missing.pem")} {
		_, err := New(t.Context(), Options{Endpoint: "https://127.0.0.1:1", Bucket: "b", CAFile: f,
			AccessKey: redact.Secret(c.AccessKey), SecretKey: redact.Secret(c.SecretKey)})
		if !errors.Is(err, ErrConfig) {
			t.Fatalf("CA file %s: %v, want ErrConfig", f, err)
		}
	}
}

// TestTailSurvivesTornClose: a Close that died after writing its new tail
// but before the state named it leaves the previous tail usable: the
// resume keeps every byte the state claims.
func TestTailSurvivesTornClose(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	data := randBytes(9, testPart+3000)
	w, err := b.Writer(ctx, "torn")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data[:testPart+1000])
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	// The torn second Close: a longer tail object, no new state.
	if _, err := b.putCond(ctx, b.tailKey("torn", testPart+2000), data[testPart:testPart+2000], false, ""); err != nil {
		t.Fatal(err)
	}
	w, err = b.Writer(ctx, "torn")
	if err != nil {
		t.Fatal(err)
	}
	if w.Offset() != testPart+1000 {
		t.Fatalf("resumed at %d, want %d", w.Offset(), testPart+1000)
	}
	w.Write(data[testPart+1000:])
	if _, err := w.commit(ctx, -1, digest.FromBytes(data)); err != nil {
		t.Fatal(err)
	}
	if ks := keys(t, b, "ingest/"); len(ks) != 0 {
		t.Fatalf("ingest objects left: %v", ks)
	}
}

// TestReadRange: a long range is one stream, shorter sequential ranges
// (a client pulling by 1 MiB ranges, four at a time) come from readahead
// chunks each fetched once, by one readahead stream (one GET); neither
// touches the read cache, and a deleted blob's readahead chunks are
// dropped.
func TestReadRange(t *testing.T) {
	b, _, _ := newBackend(t)
	ctx := t.Context()
	data := randBytes(11, streamMin+4<<20+5)
	w, err := b.Writer(ctx, "ranges")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	d := digest.FromBytes(data)
	if _, err := w.commit(ctx, -1, d); err != nil {
		t.Fatal(err)
	}
	bl, err := b.OpenBlob(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	defer bl.Close()
	rr := bl.(blobstore.RangeReader)
	read := func(off, n int64) []byte {
		t.Helper()
		body, err := rr.ReadRange(ctx, off, n)
		if err != nil {
			t.Fatal(err)
		}
		defer body.Close()
		got, err := io.ReadAll(body)
		if err != nil {
			t.Fatalf("ReadRange(%d, %d): %v", off, n, err)
		}
		return got
	}
	size := int64(len(data))
	for _, c := range []struct{ off, n int64 }{
		{0, size},            // the whole blob: one stream
		{3, size},            // clamped to the end
		{size - 10, 100},     // clamped, readahead
		{raChunk - 7, 20},    // across two readahead chunks
		{size, 5},            // nothing
		{1 << 20, streamMin}, // a long range inside
	} {
		got := read(c.off, c.n)
		want := data[min(c.off, size):min(c.off+c.n, size)]
		if !bytes.Equal(got, want) {
			t.Fatalf("ReadRange(%d, %d): %d bytes, not the blob's %d", c.off, c.n, len(got), len(want))
		}
	}
	b.ra.halt("", false) // the streams of the reads above end
	b.ra.chunks.reset()
	_, _, raMisses := b.ra.chunks.stats()
	streams, _ := b.ra.streamStats()

	const rng = 1 << 20
	got := make([]byte, size)
	for off := int64(0); off < size; off += 4 * rng {
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i := range int64(4) {
			o := off + i*rng
			if o >= size {
				break
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				body, err := rr.ReadRange(ctx, o, rng)
				if err != nil {
					errs[i] = err
					return
				}
				defer body.Close()
				p := got[o:min(o+rng, size)]
				if i%2 == 0 {
					_, errs[i] = io.ReadFull(body, p)
					return
				}
				// As the registry sends a range: straight from the chunks.
				n, err := body.(io.WriterTo).WriteTo(&sliceWriter{p: p})
				if err == nil && n != int64(len(p)) {
					err = fmt.Errorf("WriteTo of %d bytes at %d wrote %d", len(p), o, n)
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("1 MiB ranges read back differ from the blob")
	}
	held, _, misses := b.ra.chunks.stats()
	if chunks := (size + raChunk - 1) / raChunk; misses-raMisses != chunks {
		t.Fatalf("readahead fetched %d chunks for a blob of %d", misses-raMisses, chunks)
	}
	if held > raCap {
		t.Fatalf("readahead holds %d bytes over its cap %d", held, raCap)
	}
	if opened, _ := b.ra.streamStats(); opened-streams != 1 {
		t.Fatalf("%d readahead streams (GETs) for one sequential read, want 1", opened-streams)
	}
	if _, _, m := b.cache.stats(); m != 0 {
		t.Fatalf("ranged reads went through the read cache (%d misses)", m)
	}
	if err := b.DeleteBlob(ctx, d); err != nil {
		t.Fatal(err)
	}
	if held, _, _ := b.ra.chunks.stats(); held != 0 {
		t.Fatalf("a deleted blob's readahead chunks are kept (%d bytes)", held)
	}
	if _, out := b.ra.bufs.stats(); out != 0 {
		t.Fatalf("%d readahead buffers still referenced after every read ended and the chunks were dropped", out)
	}
}

// sliceWriter writes into p, refusing more than fits.
type sliceWriter struct{ p []byte }

func (w *sliceWriter) Write(b []byte) (int, error) {
	if len(b) > len(w.p) {
		return 0, errors.New("sliceWriter: write past the end")
	}
	n := copy(w.p, b)
	w.p = w.p[n:]
	return n, nil
}

// TestOpenReusesStat: OpenBlob reuses a blob's size and ETag for
// statTTL, so a client's range requests cost one HEAD. A blob another
// agent deleted meanwhile still opens, but every read of it fails with
// ErrNotFound, never other bytes, and the next open says it is gone;
// StatBlob always asks the bucket, and the entry expires after statTTL.
func TestOpenReusesStat(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	b, c, bucket := newBackend(t, func(o *Options) { o.Now = clock })
	other := openBackend(t, c, bucket) // another agent on the bucket
	ctx := t.Context()
	put := func(seed uint64) digest.Digest {
		return ingestCommit(t, b, fmt.Sprint("stat", seed), randBytes(seed, 3<<20)).Digest
	}
	reads := []struct {
		name string
		read func(bl blobstore.Blob) error
	}{
		{"readahead", func(bl blobstore.Blob) error {
			body, err := bl.(blobstore.RangeReader).ReadRange(ctx, 0, 1<<20)
			if err != nil {
				return err
			}
			defer body.Close()
			_, err = io.ReadAll(body)
			return err
		}},
		{"ReadAt large", func(bl blobstore.Blob) error { _, err := bl.ReadAt(make([]byte, 2<<20), 0); return err }},
		{"ReadAt cached", func(bl blobstore.Blob) error { _, err := bl.ReadAt(make([]byte, 512), 4096); return err }},
	}
	for i, rd := range reads {
		t.Run(rd.name, func(t *testing.T) {
			d := put(uint64(30 + i))
			bl, err := b.OpenBlob(ctx, d) // a HEAD, remembered
			if err != nil {
				t.Fatal(err)
			}
			bl.Close()
			if err := other.DeleteBlob(ctx, d); err != nil {
				t.Fatal(err)
			}
			if _, err := b.StatBlob(ctx, d); !errors.Is(err, blobstore.ErrNotFound) {
				t.Fatalf("StatBlob of a deleted blob: %v", err)
			}
			bl, err = b.OpenBlob(ctx, d)
			if err != nil {
				t.Fatalf("OpenBlob within statTTL of the last did not reuse its stat: %v", err)
			}
			defer bl.Close()
			if err := rd.read(bl); !errors.Is(err, blobstore.ErrNotFound) {
				t.Fatalf("read of a blob deleted after it was opened: %v, want ErrNotFound", err)
			}
			if _, err := b.OpenBlob(ctx, d); !errors.Is(err, blobstore.ErrNotFound) {
				t.Fatalf("OpenBlob after a read found the blob gone: %v", err)
			}
		})
	}
	t.Run("expiry", func(t *testing.T) {
		d := put(40)
		bl, err := b.OpenBlob(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		bl.Close()
		if err := other.DeleteBlob(ctx, d); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		now = now.Add(statTTL)
		mu.Unlock()
		if _, err := b.OpenBlob(ctx, d); !errors.Is(err, blobstore.ErrNotFound) {
			t.Fatalf("OpenBlob %s after the last: %v, want ErrNotFound", statTTL, err)
		}
	})
}

// TestStateClaimsPartsInOrder: parts upload concurrently, but the state
// lists part N+1 only once part N is acknowledged too, and a failed part N
// leaves the state before it even when N+1 is stored.
func TestStateClaimsPartsInOrder(t *testing.T) {
	for _, failFirst := range []bool{false, true} {
		t.Run(fmt.Sprintf("failFirst=%v", failFirst), func(t *testing.T) {
			b, _, _ := newBackend(t)
			ctx := t.Context()
			data := randBytes(21, 2*testPart+99)
			w, err := b.Writer(ctx, "order")
			if err != nil {
				t.Fatal(err)
			}
			if err := w.startUpload(ctx); err != nil {
				t.Fatal(err)
			}
			key := b.ingestKey(w.ref, ingestData)
			jobs := make([]*partJob, 2)
			for i := range jobs {
				p := data[i*testPart : (i+1)*testPart]
				w.h.Write(p)
				hb, err := blobstore.MarshalHashState(w.h)
				if err != nil {
					t.Fatal(err)
				}
				jobs[i] = &partJob{num: int32(i + 1), buf: p, hash: hb, done: make(chan struct{})}
				w.pending = append(w.pending, jobs[i])
				w.pendingSize += testPart
			}
			// Part 2 is stored first.
			jobs[1].etag, jobs[1].err = b.putPart(ctx, w.ref, key, w.uploadID, 2, jobs[1].buf)
			close(jobs[1].done)
			if jobs[1].err != nil {
				t.Fatal(jobs[1].err)
			}
			if err := w.settle(ctx, 2); err != nil {
				t.Fatal(err)
			}
			if off, err := b.IngestOffset(ctx, "order"); err != nil || off != 0 || len(w.parts) != 0 {
				t.Fatalf("with part 1 uploading, the state claims %d bytes (%v), the Writer %d parts", off, err, len(w.parts))
			}
			if failFirst {
				jobs[0].err = errors.New("part 1 failed")
			} else {
				jobs[0].etag, jobs[0].err = b.putPart(ctx, w.ref, key, w.uploadID, 1, jobs[0].buf)
			}
			close(jobs[0].done)
			err = w.settle(ctx, 0)
			want := int64(2 * testPart)
			if failFirst {
				if err == nil {
					t.Fatal("a failed part 1 settled")
				}
				want = 0
			} else if err != nil {
				t.Fatal(err)
			}
			if off, err := b.IngestOffset(ctx, "order"); err != nil || off != want {
				t.Fatalf("IngestOffset = %d, %v; want %d", off, err, want)
			}
			w.err = err
			w.Close()
			w, err = b.Writer(ctx, "order")
			if err != nil {
				t.Fatal(err)
			}
			if w.Offset() != want {
				t.Fatalf("resumed at %d, want %d", w.Offset(), want)
			}
			if _, err := w.Write(data[want:]); err != nil {
				t.Fatal(err)
			}
			d := digest.FromBytes(data)
			if _, err := w.commit(ctx, int64(len(data)), d); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readAll(t, b, d), data) {
				t.Fatal("blob differs from what was written")
			}
		})
	}
}

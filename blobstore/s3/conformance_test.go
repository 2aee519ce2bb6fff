package s3store

import (
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"sync"
	"testing"

	"imagestore/blobstore"
	"imagestore/blobstore/blobstoretest"
	"imagestore/internal/redact"

	"github.com/opencontainers/go-digest"
)

// TestConformanceS3 runs the blobstore conformance suite against this
// backend on RGW: one bucket, one key prefix per test root.
func TestConformanceS3(t *testing.T) {
	c := rgw.Get(t)
	bucket := c.TestBucket(t)
	prefixOf := func(root string) string {
		s := sha256.Sum256([]byte(root))
		return "conf-" + hex.EncodeToString(s[:6])
	}
	var mu sync.Mutex
	open := map[string]*Backend{} // the latest backend per root, for Corrupt
	blobstoretest.Run(t, blobstoretest.Harness{
		NewBackend: func(t *testing.T, root string) blobstore.Backend {
			b, err := New(t.Context(), Options{
				Endpoint: c.Endpoint, Bucket: bucket, Prefix: prefixOf(root), Region: c.Region, PathStyle: true,
				AccessKey: redact.Secret(c.AccessKey), SecretKey: redact.Secret(c.SecretKey),
				PartSize: testPart, Logger: slog.New(slog.DiscardHandler),
			})
			if err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			open[root] = b
			mu.Unlock()
			return b
		},
		Corrupt: func(t *testing.T, root string, d digest.Digest, off int64) {
			mu.Lock()
			b := open[root]
			mu.Unlock()
			key := b.blobKey(d.Encoded())
			data, _, err := b.getLimited(t.Context(), key, 64<<20)
			if err != nil {
				t.Fatal(err)
			}
			data[off] ^= 0x01
			if _, err := b.putCond(t.Context(), key, data, false, ""); err != nil {
				t.Fatal(err)
			}
		},
	})
}

package s3store

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/blobstore"
	"imagestore/internal/redact"
	"imagestore/internal/testcert"
)

// TestTLS: the backend works end to end against RGW over https, trusting
// the gateway's CA from CAFile (a multipart ingest, a commit by
// server-side copy, ranged and streamed reads, listing, delete), and
// refuses a gateway its CAs do not vouch for with ErrCertificate, naming
// the CA file, at once (a certificate is not retried).
func TestTLS(t *testing.T) {
	c := rgw.Get(t)
	bucket := c.TestBucket(t)
	ca := testcert.NewCA(t)
	srv := ca.Issue(t, "127.0.0.1")
	ep, err := c.StartTLS(t.Context(), srv.ChainPEM(), srv.KeyPEM())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(ep, "https://") {
		t.Fatalf("TLS endpoint %q", ep)
	}
	dir := t.TempDir()
	caFile, otherCA := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "other-ca.pem")
	testcert.Write(t, caFile, ca.CertPEM())
	testcert.Write(t, otherCA, testcert.NewCA(t).CertPEM())

	t.Run("trusted", func(t *testing.T) {
		b := openBackend(t, c, bucket, func(o *Options) { o.Endpoint, o.CAFile = ep, caFile })
		ctx := t.Context()
		data := randBytes(50, 2*testPart+777) // three parts
		res := ingestCommit(t, b, "tls", data)
		var whole bytes.Buffer
		if _, err := b.ReadBlob(ctx, res.Digest, &whole); err != nil || !bytes.Equal(whole.Bytes(), data) {
			t.Fatalf("ReadBlob over https: %v (equal %v)", err, bytes.Equal(whole.Bytes(), data))
		}
		bl, err := b.OpenBlob(ctx, res.Digest)
		if err != nil {
			t.Fatal(err)
		}
		defer bl.Close()
		p := make([]byte, 4096)
		if _, err := bl.ReadAt(p, testPart-100); err != nil || !bytes.Equal(p, data[testPart-100:testPart-100+4096]) {
			t.Fatalf("ReadAt over https: %v", err)
		}
		body, err := bl.(blobstore.RangeReader).ReadRange(ctx, 0, int64(len(data)))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(body)
		body.Close()
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("ReadRange over https: %v (equal %v)", err, bytes.Equal(got, data))
		}
		n := 0
		if err := b.WalkBlobs(ctx, func(blobstore.BlobInfo) error { n++; return nil }); err != nil || n != 1 {
			t.Fatalf("WalkBlobs over https: %d blobs, %v", n, err)
		}
		if err := b.DeleteBlob(ctx, res.Digest); err != nil {
			t.Fatal(err)
		}
	})
	for _, tc := range []struct{ name, caFile, names string }{
		{"another CA", otherCA, otherCA},
		{"system CAs", "", "the system's CAs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var log bytes.Buffer
			o := Options{Endpoint: ep, CAFile: tc.caFile, Bucket: bucket, Region: c.Region, PathStyle: true,
				AccessKey: redact.Secret(c.AccessKey), SecretKey: redact.Secret(c.SecretKey),
				Logger: slog.New(slog.NewTextHandler(&log, nil))}
			_, err := New(t.Context(), o)
			if !errors.Is(err, ErrCertificate) {
				t.Fatalf("New against an untrusted gateway: %v, want ErrCertificate", err)
			}
			t.Logf("New: %v", err)
			if msg := err.Error(); !strings.Contains(msg, tc.names) || !strings.Contains(msg, "certificate signed by unknown authority") {
				t.Fatalf("the error does not say whose CAs refused which certificate: %v", err)
			}
			if strings.Contains(log.String(), "retrying") {
				t.Fatalf("a certificate error was retried:\n%s", log.String())
			}
		})
	}
}

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/blobstore/s3/rgwtest"
	"imagestore/internal/testcert"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// rgw is this test process's one Ceph RGW cluster, started by the first
// test that keeps a store on S3 (TestMain closes it).
var rgw rgwtest.Shared

// Where a test daemon keeps its store: the e2e flows run once per kind.
type storageKind string

const (
	onDisk storageKind = "local"
	onS3   storageKind = "s3"
)

// bucketStore is a bucket and prefix of the test cluster a daemon (or
// several: they then share one store) keeps its blobs and records in.
type bucketStore struct {
	c      *rgwtest.Cluster
	bucket string
	prefix string
}

// newBucketStore makes a fresh bucket for t on the process's cluster.
func newBucketStore(t *testing.T) *bucketStore {
	t.Helper()
	c := rgw.Get(t)
	return &bucketStore{c: c, bucket: c.TestBucket(t), prefix: "store"}
}

// storeFor returns a bucket for kind s3, nil for local disk.
func storeFor(t *testing.T, kind storageKind) *bucketStore {
	t.Helper()
	if kind == onS3 {
		return newBucketStore(t)
	}
	return nil
}

// yaml is the daemon's storage section.
func (s *bucketStore) yaml() string {
	return fmt.Sprintf("storage:\n  type: s3\n  endpoint: %s\n  bucket: %s\n  prefix: %s\n  region: %s\n  pathStyle: true\n",
		s.c.Endpoint, s.bucket, s.prefix, s.c.Region)
}

// env gives the daemon the cluster's keys the way an operator would.
func (s *bucketStore) env() []string {
	return []string{config.EnvS3AccessKey + "=" + s.c.AccessKey, config.EnvS3SecretKey + "=" + s.c.SecretKey}
}

// blobKey is where the S3 backend keeps committed blob sum
// ("sha256:<hex>"): <prefix>/blobs/sha256/<hh>/<hex>.
func (s *bucketStore) blobKey(sum string) string {
	h := strings.TrimPrefix(sum, "sha256:")
	return s.prefix + "/blobs/sha256/" + h[:2] + "/" + h
}

func (s *bucketStore) get(t *testing.T, key string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	out, err := s.c.Client().GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if err != nil {
		t.Fatalf("GET s3://%s/%s: %v", s.bucket, key, err)
	}
	defer out.Body.Close()
	b, err := io.ReadAll(out.Body)
	if err != nil {
		t.Fatalf("GET s3://%s/%s: %v", s.bucket, key, err)
	}
	return b
}

func (s *bucketStore) put(t *testing.T, key string, b []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	if _, err := s.c.Client().PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key), Body: bytes.NewReader(b)}); err != nil {
		t.Fatalf("PUT s3://%s/%s: %v", s.bucket, key, err)
	}
}

// keys lists the bucket's keys under the store's prefix plus sub.
func (s *bucketStore) keys(t *testing.T, sub string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	var out []string
	p := s3.NewListObjectsV2Paginator(s.c.Client(), &s3.ListObjectsV2Input{Bucket: aws.String(s.bucket), Prefix: aws.String(s.prefix + "/" + sub)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			t.Fatalf("list s3://%s/%s/%s: %v", s.bucket, s.prefix, sub, err)
		}
		for _, o := range page.Contents {
			out = append(out, aws.ToString(o.Key))
		}
	}
	return out
}

// blobBytes reads the stored bytes of blob sum where the daemon keeps
// them: its blob file, or its object in the bucket (not through the
// daemon, so what is checked is what is stored).
func (d *daemon) blobBytes(t *testing.T, sum string) []byte {
	t.Helper()
	if d.s3 != nil {
		return d.s3.get(t, d.s3.blobKey(sum))
	}
	b, err := os.ReadFile(blobFile(d.root, sum))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// blobSHA hashes a stored blob.
func (d *daemon) blobSHA(t *testing.T, sum string) string {
	t.Helper()
	h := sha256.Sum256(d.blobBytes(t, sum))
	return "sha256:" + hex.EncodeToString(h[:])
}

// blobCopy is a file holding a stored blob, for qemu-img: the blob file
// itself on local disk; on S3, a download of every blob object into the
// local layout (blobs/sha256/<hh>/<hex>), so the layer's backing file
// name ("../<hh>/<hex>") opens its parent as it does in place.
func (d *daemon) blobCopy(t *testing.T, sum string) string {
	t.Helper()
	if d.s3 == nil {
		return blobFile(d.root, sum)
	}
	dir := t.TempDir()
	for _, k := range d.s3.keys(t, "blobs/") {
		p := filepath.Join(dir, strings.TrimPrefix(k, d.s3.prefix+"/"))
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, d.s3.get(t, k), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return blobFile(dir, sum)
}

// corruptBlob flips the stored byte at off of blob sum, behind the
// daemon's back (bit rot on disk, a damaged object in the bucket).
func (d *daemon) corruptBlob(t *testing.T, sum string, off int) {
	t.Helper()
	if d.s3 != nil {
		b := d.blobBytes(t, sum)
		b[off] ^= 0xff
		d.s3.put(t, d.s3.blobKey(sum), b)
		return
	}
	p := blobFile(d.root, sum)
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var one [1]byte
	if _, err := f.ReadAt(one[:], int64(off)); err != nil {
		t.Fatal(err)
	}
	one[0] ^= 0xff
	if _, err := f.WriteAt(one[:], int64(off)); err != nil {
		t.Fatal(err)
	}
}

// TestE2ES3Start: a daemon configured for a bucket it cannot use stops at
// start with exit 2 and a message naming the problem; the secret key
// appears nowhere in what it prints.
func TestE2ES3Start(t *testing.T) {
	bs := newBucketStore(t)
	closed := freePortClosed(t)
	// An https gateway whose certificate the configured CA file did not issue.
	srv := testcert.NewCA(t).Issue(t, "127.0.0.1")
	tlsEndpoint, err := bs.c.StartTLS(t.Context(), srv.ChainPEM(), srv.KeyPEM())
	if err != nil {
		t.Fatal(err)
	}
	otherCA := filepath.Join(t.TempDir(), "other-ca.pem")
	testcert.Write(t, otherCA, testcert.NewCA(t).CertPEM())
	for _, tc := range []struct {
		name string
		yaml string
		env  []string
		want []string
	}{
		{"wrong secret", bs.yaml(), []string{config.EnvS3AccessKey + "=" + bs.c.AccessKey, config.EnvS3SecretKey + "=" + "wrong-" + bs.c.SecretKey}, []string{"credentials rejected"}},
		{"unknown access key", bs.yaml(), []string{config.EnvS3AccessKey + "=NOSUCHKEY0000", config.EnvS3SecretKey + "=" + bs.c.SecretKey}, []string{"credentials rejected"}},
		{"missing bucket", strings.Replace(bs.yaml(), "bucket: "+bs.bucket, "bucket: no-such-bucket-"+hex32(t)[:8], 1), bs.env(), []string{"bucket does not exist"}},
		{"unreachable endpoint", strings.Replace(bs.yaml(), bs.c.Endpoint, "http://"+closed, 1), bs.env(), []string{"endpoint unreachable"}},
		{"untrusted certificate", strings.Replace(bs.yaml(), bs.c.Endpoint, tlsEndpoint, 1) + "  caFile: " + otherCA + "\n", bs.env(),
			[]string{"certificate not trusted", "checked against the CAs in " + otherCA}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := filepath.Join(dir, "agent.yaml")
			body := fmt.Sprintf("profile: imagestore\nroot: %s\nlisten: 127.0.0.1:0\nregistryListen: 127.0.0.1:0\n%s", filepath.Join(dir, "store"), tc.yaml)
			if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*waitLong)
			defer cancel()
			cmd := exec.CommandContext(ctx, agentBin, "-config", cfg)
			cmd.Env = append(os.Environ(), tc.env...)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 {
				t.Fatalf("exit %v, want 2:\n%s", err, out)
			}
			for _, w := range append(tc.want, "storage") {
				if !strings.Contains(string(out), w) {
					t.Fatalf("output lacks %q:\n%s", w, out)
				}
			}
			if strings.Contains(string(out), bs.c.SecretKey) {
				t.Fatalf("the secret key is printed:\n%s", out)
			}
		})
	}
}

// TestE2ES3TwoAgentsOneBucket: two daemons on one bucket and prefix share
// one store: what one imports the other lists, exports and deletes; their
// logs never show the keys.
func TestE2ES3TwoAgentsOneBucket(t *testing.T) {
	bs := newBucketStore(t)
	a := startDaemon(t, daemonOpts{s3: bs})
	b := startDaemon(t, daemonOpts{s3: bs})
	m := newMgmt(t)
	work := t.TempDir()
	base := filepath.Join(work, "base.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
	runTool(t, "qemu-io", "-c", "write -P 0x5a 0 1M", base)
	up := a.sync(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1})["uploadDir"].(string)
	copyInto(t, base, filepath.Join(up, "base.qcow2"))
	res := a.async(t, m, "/imagestore/import-backup/", map[string]any{"imgurl": filepath.Join(up, "base.qcow2"), "name": "shared"})
	mustSucceed(t, "import on A", res)
	ip := fmt.Sprintf("zstore://shared/%s", res["id"])

	info := b.async(t, m, "/imagestore/imginfo/", map[string]any{"installPath": ip})
	mustSucceed(t, "imginfo on B", info)
	if got := b.blobSHA(t, info["blobsum"].(string)); got != info["blobsum"] {
		t.Fatalf("the stored object hashes to %s, record says %s", got, info["blobsum"])
	}
	exp := b.async(t, m, "/imagestore/export/", map[string]any{"installPath": ip, "extFmt": "qcow2"})
	mustSucceed(t, "export on B", exp)
	out := filepath.Join(work, "exported.qcow2")
	if err := os.WriteFile(out, download(t, b.url+exp["imgUrl"].(string), ""), 0o600); err != nil {
		t.Fatal(err)
	}
	runTool(t, "qemu-img", "compare", "-q", base, out)

	mustSucceed(t, "delete on B", b.async(t, m, "/imagestore/delete/", map[string]any{"installPath": ip}))
	if r := a.async(t, m, "/imagestore/imginfo/", map[string]any{"installPath": ip}); r["success"] != false {
		t.Fatalf("A still sees the image B deleted: %v", r)
	}
	// The keys reach neither log (debug level), which names where they came from.
	for _, d := range []*daemon{a, b} {
		if l := d.log(); strings.Contains(l, bs.c.SecretKey) || strings.Contains(l, bs.c.AccessKey) ||
			!strings.Contains(l, `"keys":"environment `+config.EnvS3AccessKey+"/"+config.EnvS3SecretKey+`"`) {
			t.Fatalf("daemon log shows a key, or not where the keys came from:\n%s", l)
		}
	}
	mustSucceed(t, "gc on A", a.async(t, m, "/imagestore/gc/", map[string]any{"imagesToKeep": []string{}}))
	deadline := time.Now().Add(waitLong)
	for len(bs.keys(t, "blobs/")) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("blobs left in the bucket after delete and gc: %v", bs.keys(t, "blobs/"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkWhereBlobsAre checks that a daemon's n blobs are where its storage
// says: files under <root>/blobs on local disk; objects in the bucket, and
// none under root, on S3.
func checkWhereBlobsAre(t *testing.T, d *daemon, n int) {
	t.Helper()
	var files []string
	_ = filepath.WalkDir(filepath.Join(d.root, "blobs"), func(p string, e os.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() {
			files = append(files, p)
		}
		return nil
	})
	if d.s3 == nil {
		if len(files) != n {
			t.Fatalf("%d blob files under %s, want %d", len(files), d.root, n)
		}
		return
	}
	if len(files) != 0 {
		t.Fatalf("a store on S3 wrote blob files under its root: %v", files)
	}
	if keys := d.s3.keys(t, "blobs/"); len(keys) != n {
		t.Fatalf("%d blob objects in the bucket, want %d: %v", len(keys), n, keys)
	}
}

package rgwtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

var rgw Shared

func TestMain(m *testing.M) { os.Exit(rgw.Run(m)) }

func put(t *testing.T, c *Cluster, bucket, key string, data []byte) {
	t.Helper()
	_, err := c.Client().PutObject(t.Context(), &s3.PutObjectInput{
		Bucket: aws.String(bucket), Key: aws.String(key), Body: bytes.NewReader(data),
	})
	if err != nil {
		t.Fatalf("PutObject %s/%s: %v", bucket, key, err)
	}
}

func get(t *testing.T, c *Cluster, bucket, key string) []byte {
	t.Helper()
	out, err := c.Client().GetObject(t.Context(), &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		t.Fatalf("GetObject %s/%s: %v", bucket, key, err)
	}
	defer out.Body.Close()
	b, err := io.ReadAll(out.Body)
	if err != nil {
		t.Fatalf("reading %s/%s: %v", bucket, key, err)
	}
	return b
}

// rss is the resident memory of the cluster's daemons, for the log.
func rss(c *Cluster) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var parts []string
	var total int64
	for name, d := range c.daemons {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				total += kb
				parts = append(parts, fmt.Sprintf("%s %d MiB", name, kb>>10))
			}
		}
	}
	return fmt.Sprintf("%d MiB (%s)", total>>10, strings.Join(parts, ", "))
}

func TestPutGetRestart(t *testing.T) {
	c := rgw.Get(t)
	t.Logf("RSS after bring-up: %s", rss(c))
	bucket := c.TestBucket(t)
	data := make([]byte, 6<<20+17)
	rand.Read(data)
	put(t, c, bucket, "blob", data)
	if got := get(t, c, bucket, "blob"); !bytes.Equal(got, data) {
		t.Fatalf("GetObject returned %d bytes, not the %d put", len(got), len(data))
	}

	start := time.Now()
	if err := c.RestartRGW(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Logf("RestartRGW took %s", time.Since(start).Round(100*time.Millisecond))
	if got := get(t, c, bucket, "blob"); !bytes.Equal(got, data) {
		t.Fatal("object changed across an RGW restart")
	}

	start = time.Now()
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Logf("Restart (OSD and RGW) took %s", time.Since(start).Round(100*time.Millisecond))
	if got := get(t, c, bucket, "blob"); !bytes.Equal(got, data) {
		t.Fatal("object changed across an OSD restart")
	}
	t.Logf("RSS at the end: %s", rss(c))
}

func TestKillRGWThenStart(t *testing.T) {
	c := rgw.Get(t)
	bucket := c.TestBucket(t)
	if err := c.KillRGW(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := c.Client().ListBuckets(ctx, &s3.ListBucketsInput{}); err == nil {
		t.Fatal("S3 answered with radosgw killed")
	}
	if err := c.StartRGW(t.Context()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c.TestBucket(t)
	t.Logf("a new bucket after a SIGKILL of radosgw took %s", time.Since(start).Round(100*time.Millisecond))
	put(t, c, bucket, "after", []byte("back"))
	if got := get(t, c, bucket, "after"); string(got) != "back" {
		t.Fatalf("got %q", got)
	}
}

func TestDeleteThenGC(t *testing.T) {
	c := rgw.Get(t)
	bucket := c.TestBucket(t)
	put(t, c, bucket, "gone", bytes.Repeat([]byte{1}, 5<<20))
	if _, err := c.Client().DeleteObject(t.Context(), &s3.DeleteObjectInput{Bucket: aws.String(bucket), Key: aws.String("gone")}); err != nil {
		t.Fatal(err)
	}
	if err := c.GC(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client().HeadObject(t.Context(), &s3.HeadObjectInput{Bucket: aws.String(bucket), Key: aws.String("gone")}); err == nil {
		t.Fatal("deleted object still there")
	}
}

func TestUnknownStore(t *testing.T) {
	_, err := Start(t.Context(), t.TempDir(), Options{Store: "nosuchstore"})
	if err == nil || !strings.Contains(err.Error(), "nosuchstore") {
		t.Fatalf("Start with an unknown object store: %v", err)
	}
}

// TestRGWFailsClearly: a radosgw that cannot start (its port taken) must
// fail StartRGW at once, saying why (from its exit status 98 or its log)
// and where its log is, not after a time-out; the
// cluster serves again once the port is free.
func TestRGWFailsClearly(t *testing.T) {
	c := rgw.Get(t)
	if err := c.KillRGW(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", c.rgwAddr)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = c.StartRGW(t.Context())
	ln.Close()
	if err == nil {
		t.Fatal("StartRGW succeeded with its port taken")
	}
	t.Logf("failed after %s: %v", time.Since(start).Round(100*time.Millisecond), err)
	for _, want := range []string{"client.rgw.a exited", "client.rgw.a.log", "bind"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q", want)
		}
	}
	if err := c.StartRGW(t.Context()); err != nil {
		t.Fatal(err)
	}
	bucket := c.TestBucket(t)
	put(t, c, bucket, "k", []byte("v"))
}

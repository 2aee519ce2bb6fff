// Command s3bench is bench/s3.sh's helper: it brings up a single-node Ceph
// RGW (the tests' harness, blobstore/s3/rgwtest) and moves a file through
// S3 with the client alone, configured as the agent's S3 backend configures
// it (aws-sdk-go-v2; path style; checksums only when required, as RGW 16.2
// needs; UNSIGNED-PAYLOAD; multipart parts of 16 MiB sent one after the
// other, seekable bodies), so the agent's figures have a baseline measured
// in the same run.
//
//	s3bench up -dir DIR            # starts the cluster, creates bucket "bench", writes DIR/s3.env, runs until SIGTERM
//	s3bench put -env DIR/s3.env -file F -key K   # prints: bytes seconds
//	s3bench get -env DIR/s3.env -key K -o F      # prints: bytes seconds (F written and fsynced)
//	s3bench gc -env DIR/s3.env                   # RGW's garbage collector now (frees deleted objects' space)
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"imagestore/blobstore/s3/rgwtest"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go/middleware"
)

// partSize is the agent's default part size (storage.partSize).
const partSize = 16 << 20

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: s3bench up|put|get|gc [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "up":
		err = up(os.Args[2:])
	case "put":
		err = put(os.Args[2:])
	case "get":
		err = get(os.Args[2:])
	case "gc":
		err = gc(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "s3bench:", err)
		os.Exit(1)
	}
}

const bucket = "bench"

// up runs a cluster until SIGTERM or SIGINT. DIR/s3.env (written once S3
// answers and the bucket exists) names the endpoint, keys and the Ceph
// configuration.
func up(args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", "", "cluster directory (short: admin socket paths are limited to 107 bytes)")
	storeBytes := fs.Int64("store-bytes", 8<<30, "OSD memstore size")
	_ = fs.Parse(args)
	if *dir == "" {
		return errors.New("up: -dir is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	begin := time.Now()
	c, err := rgwtest.Start(ctx, filepath.Join(*dir, "ceph"), rgwtest.Options{StoreBytes: *storeBytes})
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.NewBucket(ctx, bucket); err != nil {
		return err
	}
	env := fmt.Sprintf("ENDPOINT=%s\nBUCKET=%s\nREGION=%s\nAK=%s\nSK=%s\nCEPH_CONF=%s\n",
		c.Endpoint, bucket, c.Region, c.AccessKey, c.SecretKey, filepath.Join(c.Dir, "ceph.conf"))
	tmp := filepath.Join(*dir, ".s3.env.tmp")
	if err := os.WriteFile(tmp, []byte(env), 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(*dir, "s3.env")); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "s3bench: RGW up at %s in %.1f s\n", c.Endpoint, time.Since(begin).Seconds())
	<-ctx.Done()
	return nil
}

// conf is s3.env.
type conf struct{ endpoint, bucket, region, ak, sk, cephConf string }

func readEnv(path string) (conf, error) {
	f, err := os.Open(path)
	if err != nil {
		return conf{}, err
	}
	defer f.Close()
	m := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			m[k] = v
		}
	}
	return conf{m["ENDPOINT"], m["BUCKET"], m["REGION"], m["AK"], m["SK"], m["CEPH_CONF"]}, sc.Err()
}

// client is the agent backend's client configuration (blobstore/s3).
func client(c conf) *s3.Client {
	return s3.New(s3.Options{
		BaseEndpoint:               aws.String(c.endpoint),
		Region:                     c.region,
		UsePathStyle:               true,
		Credentials:                credentials.NewStaticCredentialsProvider(c.ak, c.sk, ""),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
		APIOptions:                 []func(*middleware.Stack) error{v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware},
	})
}

func put(args []string) error {
	fs := flag.NewFlagSet("put", flag.ExitOnError)
	envFile := fs.String("env", "", "s3.env written by up")
	file := fs.String("file", "", "file to upload")
	key := fs.String("key", "client-alone", "object key")
	_ = fs.Parse(args)
	c, err := readEnv(*envFile)
	if err != nil {
		return err
	}
	f, err := os.Open(*file)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	ctx := context.Background()
	cli := client(c)
	begin := time.Now()
	mu, err := cli.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &c.bucket, Key: key})
	if err != nil {
		return err
	}
	buf := make([]byte, partSize)
	var parts []types.CompletedPart
	for n := int32(1); ; n++ {
		k, rerr := io.ReadFull(f, buf)
		if k > 0 {
			out, err := cli.UploadPart(ctx, &s3.UploadPartInput{Bucket: &c.bucket, Key: key, UploadId: mu.UploadId,
				PartNumber: aws.Int32(n), Body: bytes.NewReader(buf[:k]), ContentLength: aws.Int64(int64(k))})
			if err != nil {
				return err
			}
			parts = append(parts, types.CompletedPart{PartNumber: aws.Int32(n), ETag: out.ETag})
		}
		if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	if _, err := cli.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{Bucket: &c.bucket, Key: key, UploadId: mu.UploadId,
		MultipartUpload: &types.CompletedMultipartUpload{Parts: parts}}); err != nil {
		return err
	}
	fmt.Printf("%d %.3f\n", fi.Size(), time.Since(begin).Seconds())
	return nil
}

func get(args []string) error {
	fs := flag.NewFlagSet("get", flag.ExitOnError)
	envFile := fs.String("env", "", "s3.env written by up")
	key := fs.String("key", "client-alone", "object key")
	out := fs.String("o", "", "file to write")
	_ = fs.Parse(args)
	c, err := readEnv(*envFile)
	if err != nil {
		return err
	}
	ctx := context.Background()
	begin := time.Now()
	res, err := client(c).GetObject(ctx, &s3.GetObjectInput{Bucket: &c.bucket, Key: key})
	if err != nil {
		return err
	}
	defer res.Body.Close()
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	n, err := io.Copy(f, res.Body)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	fmt.Printf("%d %.3f\n", n, time.Since(begin).Seconds())
	return nil
}

func gc(args []string) error {
	fs := flag.NewFlagSet("gc", flag.ExitOnError)
	envFile := fs.String("env", "", "s3.env written by up")
	_ = fs.Parse(args)
	c, err := readEnv(*envFile)
	if err != nil {
		return err
	}
	out, err := exec.Command("radosgw-admin", "-c", c.cephConf, "gc", "process", "--include-all").CombinedOutput()
	if err != nil {
		return fmt.Errorf("radosgw-admin gc process: %w: %s", err, out)
	}
	return nil
}

package s3store

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"time"

	"imagestore/blobstore"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
)

// Layout under the prefix (docs/blobstore.md, "S3 backend").
const (
	dirBlobs      = "blobs/sha256/"
	dirIngest     = "ingest/"
	dirImages     = "images/"
	dirQuarantine = "quarantine/"
	keySettings   = "store.json"

	// maxSmall bounds what getSmall reads: records, settings and ingest
	// states are a few KiB; a state of 10,000 parts is about 1 MiB.
	maxSmall = 4 << 20
)

func (b *Backend) blobKey(h string) string { return b.prefix + dirBlobs + h[:2] + "/" + h }

func (b *Backend) quarantineKey(h string) string { return b.prefix + dirQuarantine + h }

func (b *Backend) ingestKey(ref, name string) string { return b.prefix + dirIngest + ref + "/" + name }

// object is what a HEAD or GET tells about an object.
type object struct {
	Size    int64
	ETag    string
	ModTime time.Time
}

func contentMD5(p []byte) (b64 string, hexsum string) {
	s := md5.Sum(p)
	return base64.StdEncoding.EncodeToString(s[:]), hex.EncodeToString(s[:])
}

// head describes key; a missing key is blobstore.ErrNotFound.
func (b *Backend) head(ctx context.Context, key string) (object, error) {
	var out *s3.HeadObjectOutput
	err := b.do(ctx, func(ctx context.Context) error {
		var err error
		out, err = b.cli.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &b.bucket, Key: &key})
		return err
	})
	if err != nil {
		if isNotFound(err) {
			return object{}, fmt.Errorf("%w: %s", blobstore.ErrNotFound, key)
		}
		return object{}, fmt.Errorf("s3store: head %s: %w", key, err)
	}
	return object{Size: aws.ToInt64(out.ContentLength), ETag: aws.ToString(out.ETag), ModTime: aws.ToTime(out.LastModified)}, nil
}

// getSmall reads a whole small object; a missing key is
// blobstore.ErrNotFound, one over maxSmall an error.
func (b *Backend) getSmall(ctx context.Context, key string) ([]byte, object, error) {
	return b.getLimited(ctx, key, maxSmall)
}

// getLimited reads a whole object of at most limit bytes.
func (b *Backend) getLimited(ctx context.Context, key string, limit int64) ([]byte, object, error) {
	var data []byte
	var obj object
	err := b.do(ctx, func(ctx context.Context) error {
		out, err := b.cli.GetObject(ctx, &s3.GetObjectInput{Bucket: &b.bucket, Key: &key})
		if err != nil {
			return err
		}
		defer out.Body.Close()
		data, err = io.ReadAll(io.LimitReader(out.Body, limit+1))
		if err != nil {
			return err
		}
		obj = object{Size: int64(len(data)), ETag: aws.ToString(out.ETag), ModTime: aws.ToTime(out.LastModified)}
		return nil
	})
	if err != nil {
		if isNotFound(err) {
			return nil, object{}, fmt.Errorf("%w: %s", blobstore.ErrNotFound, key)
		}
		return nil, object{}, fmt.Errorf("s3store: get %s: %w", key, err)
	}
	if int64(len(data)) > limit {
		return nil, object{}, fmt.Errorf("s3store: %s is larger than %d bytes", key, limit)
	}
	return data, obj, nil
}

// putCond writes a small object with Content-MD5. createOnly sends
// If-None-Match: * ; ifMatch, if set, If-Match: <etag>. A failed condition
// is errPrecondition. It returns the new ETag.
func (b *Backend) putCond(ctx context.Context, key string, data []byte, createOnly bool, ifMatch string) (string, error) {
	sum, _ := contentMD5(data)
	in := &s3.PutObjectInput{Bucket: &b.bucket, Key: &key, ContentMD5: &sum, ContentLength: aws.Int64(int64(len(data)))}
	if createOnly {
		in.IfNoneMatch = aws.String("*")
	}
	if ifMatch != "" {
		// RGW 16.2 compares If-Match on PUT with the bare ETag: a quoted
		// one (as HEAD returns it) always fails with 412.
		in.IfMatch = aws.String(strings.Trim(ifMatch, `"`))
	}
	var etag string
	err := b.do(ctx, func(ctx context.Context) error {
		in.Body = bytes.NewReader(data)
		out, err := b.cli.PutObject(ctx, in)
		if err != nil {
			return err
		}
		etag = aws.ToString(out.ETag)
		return nil
	})
	if err != nil {
		if isPreconditionFailed(err) {
			return "", fmt.Errorf("%w: %s: %w", errPrecondition, key, err)
		}
		return "", fmt.Errorf("s3store: put %s: %w", key, err)
	}
	return etag, nil
}

// errPrecondition: an If-None-Match or If-Match condition failed.
var errPrecondition = errors.New("s3store: precondition failed")

// deleteKey removes key; a missing key is no error (S3 semantics).
func (b *Backend) deleteKey(ctx context.Context, key string) error {
	err := b.do(ctx, func(ctx context.Context) error {
		_, err := b.cli.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &b.bucket, Key: &key})
		if isNotFound(err) {
			return nil
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("s3store: delete %s: %w", key, err)
	}
	return nil
}

// list calls fn for every object under prefix (in key order), and, when
// delim is set, for every common prefix with a zero object.
func (b *Backend) list(ctx context.Context, prefix, delim string, fn func(key string, o object) error) error {
	in := &s3.ListObjectsV2Input{Bucket: &b.bucket, Prefix: &prefix}
	if delim != "" {
		in.Delimiter = &delim
	}
	for {
		var out *s3.ListObjectsV2Output
		err := b.do(ctx, func(ctx context.Context) error {
			var err error
			out, err = b.cli.ListObjectsV2(ctx, in)
			return err
		})
		if err != nil {
			return fmt.Errorf("s3store: list %s: %w", prefix, err)
		}
		for _, cp := range out.CommonPrefixes {
			if err := fn(aws.ToString(cp.Prefix), object{}); err != nil {
				return err
			}
		}
		for _, o := range out.Contents {
			if err := fn(aws.ToString(o.Key), objectOf(o)); err != nil {
				return err
			}
		}
		if !aws.ToBool(out.IsTruncated) || out.NextContinuationToken == nil {
			return nil
		}
		in.ContinuationToken = out.NextContinuationToken
	}
}

func objectOf(o types.Object) object {
	return object{Size: aws.ToInt64(o.Size), ETag: aws.ToString(o.ETag), ModTime: aws.ToTime(o.LastModified)}
}

// copyObject copies src to dst server-side (≤ 5 GiB), replacing the
// metadata so that dst gets a new LastModified even when src == dst.
func (b *Backend) copyObject(ctx context.Context, src, dst string) error {
	source := b.bucket + "/" + escapeKey(src)
	err := b.do(ctx, func(ctx context.Context) error {
		_, err := b.cli.CopyObject(ctx, &s3.CopyObjectInput{
			Bucket: &b.bucket, Key: &dst, CopySource: &source,
			MetadataDirective: types.MetadataDirectiveReplace,
			Metadata:          map[string]string{"renewed": b.now().UTC().Format(time.RFC3339Nano)},
		})
		return err
	})
	if err != nil {
		if isNotFound(err) {
			return fmt.Errorf("%w: %s", blobstore.ErrNotFound, src)
		}
		return fmt.Errorf("s3store: copy %s to %s: %w", src, dst, err)
	}
	return nil
}

// escapeKey URL-escapes a key for x-amz-copy-source, keeping the slashes.
func escapeKey(k string) string {
	parts := strings.Split(k, "/")
	for i, p := range parts {
		parts[i] = url.PathEscape(p)
	}
	return strings.Join(parts, "/")
}

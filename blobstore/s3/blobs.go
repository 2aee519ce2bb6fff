package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"imagestore/blobstore"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/opencontainers/go-digest"
)

const (
	copyObjectLimit = 5 << 30 // CopyObject's limit; above it, UploadPartCopy
	copyPartSize    = 1 << 30
)

func blobHex(d digest.Digest) (string, error) {
	if err := d.Validate(); err != nil || d.Algorithm() != digest.SHA256 {
		return "", fmt.Errorf("%w: digest %q", blobstore.ErrInvalidName, string(d))
	}
	return d.Encoded(), nil
}

// copyBlob copies src to dst server-side: one CopyObject up to 5 GiB,
// else a multipart copy of UploadPartCopy ranges. dst appears at once,
// complete, when the call returns.
func (b *Backend) copyBlob(ctx context.Context, src, dst string, size int64) error {
	if size <= b.copyLimit {
		return b.copyObject(ctx, src, dst)
	}
	return b.copyMultipart(ctx, src, dst, size)
}

func (b *Backend) copyMultipart(ctx context.Context, src, dst string, size int64) error {
	var id string
	err := b.do(ctx, func(ctx context.Context) error {
		out, err := b.cli.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &b.bucket, Key: &dst})
		if err != nil {
			return err
		}
		id = aws.ToString(out.UploadId)
		return nil
	})
	if err != nil {
		return fmt.Errorf("s3store: start copy to %s: %w", dst, err)
	}
	source := b.bucket + "/" + escapeKey(src)
	var parts []types.CompletedPart
	for off, n := int64(0), int32(1); off < size; off, n = off+b.copyPart, n+1 {
		end := min(off+b.copyPart, size) - 1
		rng := fmt.Sprintf("bytes=%d-%d", off, end)
		var etag string
		err := b.do(ctx, func(ctx context.Context) error {
			out, err := b.cli.UploadPartCopy(ctx, &s3.UploadPartCopyInput{
				Bucket: &b.bucket, Key: &dst, UploadId: &id, PartNumber: aws.Int32(n),
				CopySource: &source, CopySourceRange: &rng,
			})
			if err != nil {
				return err
			}
			etag = aws.ToString(out.CopyPartResult.ETag)
			return nil
		})
		if err != nil {
			_ = b.abort(context.WithoutCancel(ctx), dst, id)
			return fmt.Errorf("s3store: copy %s of %s to %s: %w", rng, src, dst, err)
		}
		parts = append(parts, types.CompletedPart{PartNumber: aws.Int32(n), ETag: aws.String(etag)})
	}
	err = b.do(ctx, func(ctx context.Context) error {
		_, err := b.cli.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
			Bucket: &b.bucket, Key: &dst, UploadId: &id,
			MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
		})
		return err
	})
	if err != nil && !uploadGone(err) {
		_ = b.abort(context.WithoutCancel(ctx), dst, id)
		return fmt.Errorf("s3store: complete copy to %s: %w", dst, err)
	}
	if o, err := b.head(ctx, dst); err != nil || o.Size != size {
		return fmt.Errorf("s3store: copy to %s: %d bytes (want %d): %v", dst, o.Size, size, err)
	}
	return nil
}

// renew gives an existing object a new LastModified by copying it onto
// itself with replaced metadata: S3 has no "touch", and the blob's
// LastModified is what the commit grace measures.
func (b *Backend) renew(ctx context.Context, key string, size int64) error {
	return b.copyBlob(ctx, key, key, size)
}

// RenewBlob renews a committed blob's modification time (a commit of
// content already stored).
func (b *Backend) RenewBlob(ctx context.Context, d digest.Digest) error {
	o, err := b.StatBlob(ctx, d)
	if err != nil {
		return err
	}
	h, _ := blobHex(d)
	return b.renew(ctx, b.blobKey(h), o.Size)
}

// StatBlob describes a committed blob (ErrNotFound if absent). ModTime is
// the object's LastModified.
func (b *Backend) StatBlob(ctx context.Context, d digest.Digest) (blobstore.BlobInfo, error) {
	h, err := blobHex(d)
	if err != nil {
		return blobstore.BlobInfo{}, err
	}
	o, err := b.head(ctx, b.blobKey(h))
	if err != nil {
		if errors.Is(err, blobstore.ErrNotFound) {
			return blobstore.BlobInfo{}, fmt.Errorf("%w: blob %s", blobstore.ErrNotFound, d)
		}
		return blobstore.BlobInfo{}, err
	}
	return blobstore.BlobInfo{Digest: d, Size: o.Size, ModTime: o.ModTime}, nil
}

// WalkBlobs calls fn for every committed blob in digest order; keys that
// are not well-formed blob names are skipped.
func (b *Backend) WalkBlobs(ctx context.Context, fn func(blobstore.BlobInfo) error) error {
	base := b.prefix + dirBlobs
	return b.list(ctx, base, "", func(key string, o object) error {
		rest := strings.TrimPrefix(key, base)
		hh, h, ok := strings.Cut(rest, "/")
		if !ok || len(h) < 2 || h[:2] != hh {
			return nil
		}
		d := digest.NewDigestFromEncoded(digest.SHA256, h)
		if _, err := blobHex(d); err != nil {
			return nil
		}
		return fn(blobstore.BlobInfo{Digest: d, Size: o.Size, ModTime: o.ModTime})
	})
}

// DeleteBlob removes a committed blob: blobstore.ErrNotFound if absent,
// ErrInUse if a commit of the same content (here or on another agent
// sharing the bucket) relies on it (pins.go).
func (b *Backend) DeleteBlob(ctx context.Context, d digest.Digest) error {
	h, err := blobHex(d)
	if err != nil {
		return err
	}
	if b.cache != nil {
		b.cache.drop(d)
	}
	b.ra.forget(d)
	b.stats.drop(b.blobKey(h))
	if err := b.deleteUnpinned(ctx, h); err != nil {
		if errors.Is(err, blobstore.ErrNotFound) {
			return fmt.Errorf("%w: blob %s", blobstore.ErrNotFound, d)
		}
		return err
	}
	return nil
}

// QuarantineBlob moves a blob that failed verification to quarantine/<hex>
// (server-side copy, then delete) and returns that key.
func (b *Backend) QuarantineBlob(ctx context.Context, d digest.Digest) (string, error) {
	o, err := b.StatBlob(ctx, d)
	if err != nil {
		return "", err
	}
	h, _ := blobHex(d)
	dst := b.quarantineKey(h)
	if err := b.copyBlob(ctx, b.blobKey(h), dst, o.Size); err != nil {
		return "", err
	}
	if b.cache != nil {
		b.cache.drop(d)
	}
	b.ra.forget(d)
	b.stats.drop(b.blobKey(h))
	if err := b.deleteKey(ctx, b.blobKey(h)); err != nil {
		return "", err
	}
	return dst, nil
}

// OpenBlob opens a committed blob for ranged reads through the cache.
// The blob's size and ETag come from a HEAD, or from one made in the last
// statTTL (statcache.go): a blob deleted since then opens, and its reads
// fail with blobstore.ErrNotFound.
func (b *Backend) OpenBlob(ctx context.Context, d digest.Digest) (blobstore.Blob, error) {
	h, err := blobHex(d)
	if err != nil {
		return nil, err
	}
	key := b.blobKey(h)
	o, reused := b.stats.get(key)
	if !reused {
		if o, err = b.headBlob(ctx, d, key); err != nil {
			return nil, err
		}
	}
	// A Blob outlives the call that opened it (an instant-restore export
	// lives as long as the export, not the request), as an open file
	// does: its reads keep ctx's values but not its cancellation, and end
	// with Close.
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	bl := &blob{b: b, ctx: rctx, cancel: cancel, d: d, etag: o.ETag, key: key, size: o.Size}
	if !reused {
		bl.cacheTag = o.ETag
		bl.tagged.Do(func() {})
	}
	return bl, nil
}

// headBlob is a HEAD of blob d, remembered in the stat cache.
func (b *Backend) headBlob(ctx context.Context, d digest.Digest, key string) (object, error) {
	o, err := b.head(ctx, key)
	if err != nil {
		if errors.Is(err, blobstore.ErrNotFound) {
			b.stats.drop(key)
			return object{}, fmt.Errorf("%w: blob %s", blobstore.ErrNotFound, d)
		}
		return object{}, err
	}
	b.stats.put(key, o)
	return o, nil
}

// blob reads ranges of one object. ReadAt goes through the chunk cache.
type blob struct {
	b      *Backend
	ctx    context.Context
	cancel context.CancelFunc
	d      digest.Digest
	etag   string // the object's version when opened (perhaps a few seconds before): readahead chunks are per version
	key    string
	size   int64

	// The read cache's chunks are per version too, and it serves
	// repeated reads without asking the bucket, so its version is
	// checked by a HEAD when the blob was opened from the stat cache:
	// once, before the first cached read. Thus an object rewritten behind
	// the store's back (corrupted, repaired) is never served from the
	// read cache's older copy, and a verify sees the stored bytes.
	tagged   sync.Once
	cacheTag string
	tagErr   error
}

func (o *blob) Size() int64 { return o.size }

// Close ends the blob's reads; a ReadAt after it fails.
func (o *blob) Close() error {
	o.cancel()
	return nil
}

// ReadAt reads len(p) bytes at off (io.EOF past the end, as io.ReaderAt).
func (o *blob) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("s3store: negative offset %d", off)
	}
	if err := o.ctx.Err(); err != nil {
		return 0, fmt.Errorf("s3store: read of closed blob %s: %w", o.d, err)
	}
	if off >= o.size {
		return 0, io.EOF
	}
	want := len(p)
	if rest := o.size - off; int64(want) > rest {
		p = p[:rest]
	}
	var n int
	var err error
	// Reads of a chunk or more (a scrub, a stream, a guest's large read)
	// go straight to the server and are not cached: they would only evict
	// the small reads worth keeping (qcow2 headers and tables, clusters),
	// and a scrub must see the stored bytes, not a cached copy.
	if o.b.cache == nil || int64(want) >= o.b.opts.CacheChunk {
		n, err = o.b.getRange(o.ctx, o.key, off, p)
	} else {
		n, err = o.readCached(p, off)
	}
	if err == nil && n < want {
		err = io.EOF
	}
	return n, err
}

func (o *blob) readCached(p []byte, off int64) (int, error) {
	o.tagged.Do(func() {
		var obj object
		obj, o.tagErr = o.b.headBlob(o.ctx, o.d, o.key)
		o.cacheTag = obj.ETag
	})
	if o.tagErr != nil {
		return 0, o.tagErr
	}
	cs := o.b.opts.CacheChunk
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		idx := pos / cs
		chunk, err := o.b.cache.get(o.ctx, chunkKey{o.d, o.cacheTag, idx}, func() (*chunkBuf, error) {
			start := idx * cs
			buf := make([]byte, min(cs, o.size-start))
			k, err := o.b.getRange(o.ctx, o.key, start, buf)
			if err != nil {
				return nil, err
			}
			if k != len(buf) {
				return nil, fmt.Errorf("s3store: %s: short read %d of %d at %d", o.key, k, len(buf), start)
			}
			return newChunkBuf(buf), nil
		})
		if err != nil {
			return n, err
		}
		n += copy(p[n:], chunk.b[pos-idx*cs:])
		chunk.release()
	}
	return n, nil
}

// getRange fills p from key at off with one ranged GET (retried whole).
func (b *Backend) getRange(ctx context.Context, key string, off int64, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	rng := fmt.Sprintf("bytes=%d-%d", off, off+int64(len(p))-1)
	var n int
	err := b.do(ctx, func(ctx context.Context) error {
		g := newStallGuard(ctx, b.opts.ReadStall)
		defer g.stop()
		out, err := b.cli.GetObject(g.ctx, &s3.GetObjectInput{Bucket: &b.bucket, Key: &key, Range: &rng})
		if err != nil {
			return g.err(err)
		}
		defer out.Body.Close()
		// Every caller asks for bytes inside the object: a body that
		// ends early (io.ErrUnexpectedEOF, a connection closed before
		// Content-Length, as when RGW restarts) is a transient failure,
		// retried whole, not the end of the blob.
		n, err = io.ReadFull(g.reader(out.Body), p)
		return g.err(err)
	})
	if err != nil {
		if isNotFound(err) {
			return 0, b.gone(key)
		}
		return n, fmt.Errorf("s3store: read %s %s: %w", key, rng, err)
	}
	return n, nil
}

// gone is the error of a read of a blob that is not in the bucket (any
// more): its remembered size and ETag go too.
func (b *Backend) gone(key string) error {
	b.stats.drop(key)
	return fmt.Errorf("%w: %s is not in the bucket (deleted after it was opened?)", blobstore.ErrNotFound, key)
}

// ReadBlob streams a whole blob without the cache (verify, export): one
// ranged GET per chunk, so a failed connection costs a chunk, not the blob.
func (b *Backend) ReadBlob(ctx context.Context, d digest.Digest, w io.Writer) (int64, error) {
	o, err := b.StatBlob(ctx, d)
	if err != nil {
		return 0, err
	}
	h, _ := blobHex(d)
	key := b.blobKey(h)
	buf := make([]byte, min(o.Size, b.opts.PartSize))
	var done int64
	for done < o.Size {
		p := buf[:min(int64(len(buf)), o.Size-done)]
		n, err := b.getRange(ctx, key, done, p)
		if err != nil {
			return done, err
		}
		if n != len(p) {
			return done, fmt.Errorf("s3store: %s: short read at %d", key, done)
		}
		if _, err := w.Write(p); err != nil {
			return done, err
		}
		done += int64(n)
	}
	return done, nil
}

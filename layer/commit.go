package layer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"imagestore/internal/countio"
	"io"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/qcow2"
)

// Content writes one blob's bytes to w and returns the guest (virtual) size
// of what it wrote. Normalize, NormalizeRaw and Flatten make the usual ones;
// a caller may wrap one (to speculate, to tee) or write its own.
type Content func(ctx context.Context, w io.Writer) (virtualSize int64, err error)

// Progress is told of the bytes Commit writes into the ingest (a job's
// progress satisfies it).
type Progress interface{ Add(n int64) }

// Record is the image record Commit creates; the blob's digest and size,
// the creation time and the parent's name come from the commit.
type Record struct {
	Ref    blobstore.Ref
	Parent *blobstore.Image // nil for a base
	Format string           // "qcow2" records are checked (Check) before they are made
	Author string
	Arch   string
	Desc   string
}

// Spec is one Commit: a Record and where its blob's bytes come from:
// Content (written into a fresh ingest), Reader (opaque bytes stored as
// they are), or Blob (a blob already in the store, recorded as it is).
type Spec struct {
	Record
	// Ingest names the ingest Content writes ("" = a random "layer-…").
	Ingest  string
	Content Content
	// Progress, if set, counts the bytes Content writes (Content only).
	Progress Progress
	// Reader holds opaque bytes, stored as-is by blobstore.Put: with
	// Size ≥ 0 the quota is checked before reading and the length must
	// be Size. The record's virtual size is the byte size.
	Reader io.Reader
	Size   int64
	// Blob is a committed blob recorded as it is, without a copy (a
	// download that is already a raw disk or an ISO image); the caller
	// holds it. The record's virtual size is the byte size.
	Blob digest.Digest
	// Verify, if set, runs on the committed blob, held, before the record
	// is made: its error leaves the blob unrecorded, and removed if this
	// Commit created it and nothing else uses it.
	Verify func(ctx context.Context, l Layer) error
}

// ingestBuffer batches Content's writes into the ingest.
const ingestBuffer = 1 << 20

// Commit stores a blob and records it as an image, the one way every
// import path does so:
//
//  1. ingest: the bytes go into the store (Content into an ingest that is
//     committed with its size checked, Reader the same way as it comes;
//     a Blob is there already); a failure removes the ingest, and a blob
//     this Commit created and then refused is removed (blobstore.Discard);
//  2. hold: the new blob is held from its commit until the record exists,
//     and the parent's blob for the whole call, so GC cannot free either
//     whatever the store's commit grace;
//  3. verify: a "qcow2" record's blob must pass the layer check against
//     the parent (Check); bytes from Reader or Blob must be canonical (a qcow2,
//     CheckCanonical) or not a qcow2 at all (CheckFormat); then
//     spec.Verify runs;
//  4. record: the image record is written (blobstore.PutImage) and logged.
//
// Errors of Content, Reader and Verify come back as they are, so callers
// branch on them (qcow2.ErrZeroData, say) and wrap them with their own
// context.
func (s *Store) Commit(ctx context.Context, spec Spec) (blobstore.Image, error) {
	if n := btoi(spec.Content != nil) + btoi(spec.Reader != nil) + btoi(spec.Blob != ""); n != 1 {
		return blobstore.Image{}, errors.New("layer: commit needs exactly one of Content, Reader and Blob")
	}
	if err := CheckNamespace(spec.Ref, spec.Parent); err != nil {
		return blobstore.Image{}, err
	}
	if spec.Parent != nil {
		release := s.blobs.Hold(spec.Parent.Blob)
		defer release()
	}
	var l Layer
	var created blobstore.Creation
	var err error
	switch {
	case spec.Blob != "":
		var bi blobstore.BlobInfo
		bi, err = s.blobs.Stat(ctx, spec.Blob)
		l = Layer{Digest: spec.Blob, Size: bi.Size, VirtualSize: bi.Size}
	case spec.Reader != nil:
		if err := s.quotaAllows(spec.Size); err != nil {
			return blobstore.Image{}, err
		}
		spec.Content, spec.Progress = opaque(spec.Reader, spec.Size), nil
		l, created, err = s.ingest(ctx, spec)
	default:
		l, created, err = s.ingest(ctx, spec)
	}
	if err != nil {
		return blobstore.Image{}, err
	}
	if spec.Reader != nil || spec.Blob != "" {
		l.VirtualSize = l.Size
		if spec.Format == "qcow2" {
			l.VirtualSize = 0 // from the layer's header, by checkNew
		}
	}
	release := s.blobs.Hold(l.Digest)
	img, err := s.verifyAndRecord(ctx, spec, l)
	release()
	if err != nil && created.Created() {
		// A refusal leaves no blob behind (unless something else uses it
		// by now: Discard checks holds, records and later commits).
		if _, derr := s.blobs.Discard(ctx, created); derr != nil {
			s.log.Warn("discarding a refused blob", "blob", l.Digest, "err", derr)
		}
	}
	return img, err
}

// verifyAndRecord runs Commit's checks on the held blob l and records it.
func (s *Store) verifyAndRecord(ctx context.Context, spec Spec, l Layer) (blobstore.Image, error) {
	var err error
	if spec.Format == "qcow2" {
		if l.VirtualSize, err = s.checkNew(ctx, spec.Record, l); err != nil {
			return blobstore.Image{}, err
		}
	}
	// Content is our writer's output; bytes stored as they came (Reader,
	// Blob) must be what our writer would make of them (qcow2) or not be a
	// qcow2 at all.
	if spec.Reader != nil || spec.Blob != "" {
		check := func() error { return CheckFormat(ctx, s.blobs, l.Digest, spec.Format) }
		if spec.Format == "qcow2" {
			check = func() error { return CheckCanonical(ctx, s.blobs, l.Digest, nil) }
		}
		if err := check(); err != nil {
			return blobstore.Image{}, fmt.Errorf("recording %s: %w", spec.Ref, err)
		}
	}
	if spec.Verify != nil {
		if err := spec.Verify(ctx, l); err != nil {
			return blobstore.Image{}, err
		}
	}
	return s.record(ctx, spec.Record, l)
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// quotaAllows checks, before any byte is read, that size more bytes
// (< 0: unknown) fit the store's quota.
func (s *Store) quotaAllows(size int64) error {
	if size < 0 {
		return nil
	}
	c, err := s.blobs.Capacity()
	if err != nil {
		return err
	}
	if c.Quota > 0 && c.Used+size > c.Quota {
		return fmt.Errorf("layer: %w: %d bytes in use + %d > quota %d", blobstore.ErrQuotaExceeded, c.Used, size, c.Quota)
	}
	return nil
}

// opaque is the Content of Reader bytes stored as they are: exactly size
// bytes when size ≥ 0.
func opaque(r io.Reader, size int64) Content {
	return func(ctx context.Context, w io.Writer) (int64, error) {
		if size >= 0 {
			r = io.LimitReader(r, size+1) // one more, to see a too-long stream
		}
		n, err := io.Copy(w, r)
		if err != nil {
			return n, err
		}
		if size >= 0 && n != size {
			return n, fmt.Errorf("%w: %d bytes, expected %d", blobstore.ErrSizeMismatch, n, size)
		}
		return n, nil
	}
}

// ingest writes spec.Content into a fresh ingest and commits it; it
// returns the commit's Creation (zero if the blob was already stored).
func (s *Store) ingest(ctx context.Context, spec Spec) (Layer, blobstore.Creation, error) {
	ref := spec.Ingest
	if ref == "" {
		ref = "layer-" + randomHex(12)
	}
	w, err := s.blobs.Writer(ctx, ref)
	if err != nil {
		return Layer{}, blobstore.Creation{}, err
	}
	var out io.Writer = w
	if spec.Progress != nil {
		out = io.MultiWriter(w, progressWriter{spec.Progress})
	}
	bw := bufio.NewWriterSize(out, ingestBuffer)
	cw := &countio.Writer{W: bw}
	vsize, err := spec.Content(ctx, cw)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		_ = w.Cancel()
		return Layer{}, blobstore.Creation{}, err
	}
	d, err := w.Commit(ctx, cw.N, "")
	if err != nil {
		_ = w.Cancel()
		return Layer{}, blobstore.Creation{}, fmt.Errorf("committing layer: %w", err)
	}
	return Layer{Digest: d, Size: cw.N, VirtualSize: vsize}, w.Creation(), nil
}

// checkNew checks a new qcow2 layer against the parent it is recorded on
// and returns its virtual size.
func (s *Store) checkNew(ctx context.Context, rec Record, l Layer) (int64, error) {
	img := blobstore.Image{Ref: rec.Ref, Blob: l.Digest, VirtualSize: l.VirtualSize, Format: "qcow2"}
	parentSize := int64(-1)
	if rec.Parent != nil && rec.Parent.Format == "qcow2" {
		var err error
		if parentSize, err = virtualSize(ctx, s.blobs, *rec.Parent); err != nil {
			return 0, err
		}
	}
	size, err := checkLayer(ctx, s.blobs, img, rec.Parent, parentSize)
	if err != nil {
		return 0, fmt.Errorf("%w: layer %s (%s): %w", ErrInvalid, img.Blob, img.Ref, err)
	}
	return size, nil
}

// record writes the image record of a committed, held blob.
func (s *Store) record(ctx context.Context, rec Record, l Layer) (blobstore.Image, error) {
	img := blobstore.Image{
		Ref: rec.Ref, Blob: l.Digest, Created: time.Now().UTC(),
		Author: rec.Author, Arch: rec.Arch, Desc: rec.Desc,
		Size: l.Size, VirtualSize: l.VirtualSize, Format: rec.Format,
	}
	if rec.Parent != nil {
		img.Parent = rec.Parent.Ref.String()
	}
	if err := s.blobs.PutImage(ctx, img); err != nil {
		return img, fmt.Errorf("recording image %s: %w", rec.Ref, err)
	}
	s.log.Info("image recorded", "image", rec.Ref.String(), "blob", l.Digest, "parent", img.Parent, "format", rec.Format, "size", l.Size)
	return img, nil
}

// CheckParent says whether an untrusted qcow2 can be stored on parent (nil:
// as a base): a delta needs a qcow2 parent of its own virtual size, a base
// must name no backing file. Errors wrap ErrParent. A caller that reads
// src from far away checks first, so a misfit fails before the data moves.
func CheckParent(src *qcow2.Image, parent *blobstore.Image) error {
	switch {
	case parent == nil && src.BackingFile() != "":
		return fmt.Errorf("%w: the qcow2 is a delta (backing file %q) but no parent was given", ErrParent, src.BackingFile())
	case parent == nil:
		return nil
	case parent.Format != "qcow2":
		return fmt.Errorf("%w: parent %s has format %s; a qcow2 delta needs a qcow2 parent", ErrParent, parent.Ref, parent.Format)
	case parent.VirtualSize != 0 && parent.VirtualSize != src.VirtualSize():
		return fmt.Errorf("%w: virtual size %d differs from parent %s's %d; a delta must have its parent's size",
			ErrParent, src.VirtualSize(), parent.Ref, parent.VirtualSize)
	}
	return nil
}

// Normalize re-encodes an untrusted qcow2 (parsed by qcow2.Open, its
// backing name never followed) as a canonical layer on parent (nil: a
// standalone base), whose backing file is the parent's blob. opts may set
// writer options (AssumeNoZeroData); BackingFile is Normalize's to set.
func Normalize(src *qcow2.Image, parent *blobstore.Image, opts qcow2.WriteOptions) Content {
	return func(ctx context.Context, w io.Writer) (int64, error) {
		if err := CheckParent(src, parent); err != nil {
			return 0, err
		}
		opts.BackingFile = ""
		if parent != nil {
			opts.BackingFile = blobstore.BackingName(parent.Blob)
		}
		if _, err := qcow2.Normalize(ctx, w, src, opts); err != nil {
			return 0, err
		}
		return src.VirtualSize(), nil
	}
}

// NormalizeRaw converts a raw disk image of size bytes (a multiple of 512,
// else qcow2.ErrRawSize) into a canonical standalone layer.
func NormalizeRaw(r io.ReaderAt, size int64) Content {
	return func(ctx context.Context, w io.Writer) (int64, error) {
		if _, err := qcow2.NormalizeRaw(ctx, w, r, size, qcow2.WriteOptions{}); err != nil {
			return 0, err
		}
		return size, nil
	}
}

// Flatten writes the guest view of an open chain as one standalone image of
// format "qcow2" or "raw".
func Flatten(c *Chain, format string, opts qcow2.WriteOptions) Content {
	return func(ctx context.Context, w io.Writer) (int64, error) {
		if _, err := qcow2.Flatten(ctx, w, c.Chain, format, opts); err != nil {
			return 0, err
		}
		return c.VirtualSize(), nil
	}
}

type progressWriter struct{ p Progress }

func (p progressWriter) Write(b []byte) (int, error) {
	p.p.Add(int64(len(b)))
	return len(b), nil
}

package blobstore

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"

	"github.com/opencontainers/go-digest"
)

// CorruptBlob describes a blob that failed verification.
type CorruptBlob struct {
	Digest         digest.Digest
	QuarantinePath string // where it went (a path, or a key on S3); "" if not moved
	Images         []Ref  // images whose chain includes the blob
	Err            error
}

// VerifyReport summarises a Verify run.
type VerifyReport struct {
	Checked int
	Bytes   int64
	Corrupt []CorruptBlob
}

// Verify re-hashes every blob (sample 0 or 1) or a random fraction of
// them (sample in (0,1), at least one), quarantining corrupt ones.
func (s *Store) Verify(ctx context.Context, sample float64) (VerifyReport, error) {
	var rep VerifyReport
	if sample < 0 || sample > 1 || sample != sample {
		return rep, fmt.Errorf("blobstore: verify: sample %v not in [0,1]", sample)
	}
	var all []BlobInfo
	if err := s.WalkBlobs(ctx, func(bi BlobInfo) error { all = append(all, bi); return nil }); err != nil {
		return rep, err
	}
	if sample > 0 && sample < 1 && len(all) > 0 {
		rand.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
		n := int(float64(len(all)) * sample)
		all = all[:max(n, 1)]
	}
	for _, bi := range all {
		cb, n, err := s.verifyBlob(ctx, bi.Digest)
		if errors.Is(err, ErrNotFound) {
			continue // freed meanwhile
		}
		if err != nil && cb == nil {
			if ctx.Err() != nil {
				return rep, err
			}
			cb = &CorruptBlob{Digest: bi.Digest, Err: err}
		}
		rep.Checked++
		rep.Bytes += n
		if cb != nil {
			rep.Corrupt = append(rep.Corrupt, *cb)
		}
	}
	return rep, nil
}

// VerifyBlob re-hashes one blob. On a mismatch it moves the blob to the
// quarantine and returns an error wrapping ErrCorrupt that names the
// images the loss breaks.
func (s *Store) VerifyBlob(ctx context.Context, d digest.Digest) error {
	cb, _, err := s.verifyBlob(ctx, d)
	if err != nil {
		return err
	}
	if cb != nil {
		return cb.Err
	}
	return nil
}

func (s *Store) verifyBlob(ctx context.Context, d digest.Digest) (*CorruptBlob, int64, error) {
	if err := validateDigest(d); err != nil {
		return nil, 0, err
	}
	b, err := s.backend.OpenBlob(ctx, d)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, 0, err
		}
		return nil, 0, fmt.Errorf("blobstore: verify %s: %w", d, err)
	}
	defer b.Close()
	f := io.NewSectionReader(b, 0, b.Size())
	h := sha256.New()
	bp := s.copyBufs.Get().(*[]byte)
	defer s.copyBufs.Put(bp)
	n, err := io.CopyBuffer(h, readerFunc(func(p []byte) (int, error) {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		return f.Read(p)
	}), *bp)
	if err != nil {
		return nil, n, fmt.Errorf("blobstore: verify %s: read: %w", d, err)
	}
	got := digest.NewDigest(digest.SHA256, h)
	if got == d {
		return nil, n, nil
	}
	cb := &CorruptBlob{Digest: d}
	qp, qerr := s.quarantine(ctx, d)
	cb.QuarantinePath = qp
	cb.Images = s.imagesUsing(ctx, d)
	names := make([]string, len(cb.Images))
	for i, r := range cb.Images {
		names[i] = r.String()
	}
	msg := fmt.Sprintf("blob %s hashes to %s", d, got)
	if qerr != nil {
		msg += fmt.Sprintf("; quarantine failed: %v", qerr)
	} else {
		msg += "; moved to " + qp
	}
	if len(names) > 0 {
		msg += "; breaks images " + strings.Join(names, ", ")
	}
	cb.Err = fmt.Errorf("blobstore: %w: %s", ErrCorrupt, msg)
	s.log.Error("corrupt blob", "digest", d.String(), "actual", got.String(), "quarantine", qp, "images", names)
	return cb, n, nil
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

func (s *Store) quarantine(ctx context.Context, d digest.Digest) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	bi, err := s.backend.StatBlob(ctx, d)
	if err != nil {
		return "", err
	}
	where, err := s.backend.QuarantineBlob(ctx, d)
	if err != nil {
		return "", err
	}
	s.used -= bi.Size
	s.blobs--
	delete(s.commits, d)
	return where, nil
}

// imagesUsing lists the images whose chain contains a layer with blob d.
func (s *Store) imagesUsing(ctx context.Context, d digest.Digest) []Ref {
	s.imgMu.RLock()
	all, err := s.listImages(ctx, "")
	s.imgMu.RUnlock()
	if err != nil {
		return nil
	}
	byRef := make(map[string]Image, len(all))
	for _, img := range all {
		byRef[img.Ref.String()] = img
	}
	var out []Ref
	for _, img := range all {
		cur, ok := img, true
		for depth := 0; ok && depth < MaxChainDepth; depth++ {
			if cur.Blob == d {
				out = append(out, img.Ref)
				break
			}
			if cur.Parent == "" {
				break
			}
			cur, ok = byRef[cur.Parent]
		}
	}
	return out
}

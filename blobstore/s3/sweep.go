package s3store

import (
	"context"
	"errors"
	"strings"
	"time"

	"imagestore/blobstore"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
)

// ingestActivity is what the bucket shows of one ingest ref.
type ingestActivity struct {
	last    time.Time // newest LastModified of its objects or Initiated of its uploads
	uploads []string  // multipart upload ids at its data key
}

// ingests maps every ingest ref in the bucket (objects or multipart
// uploads under ingest/) to its latest activity.
func (b *Backend) ingests(ctx context.Context) (map[string]*ingestActivity, error) {
	base := b.prefix + dirIngest
	refs := map[string]*ingestActivity{}
	at := func(ref string) *ingestActivity {
		a := refs[ref]
		if a == nil {
			a = &ingestActivity{}
			refs[ref] = a
		}
		return a
	}
	err := b.list(ctx, base, "", func(key string, o object) error {
		ref, _, ok := strings.Cut(strings.TrimPrefix(key, base), "/")
		if !ok || blobstore.ValidateName(ref) != nil {
			return nil
		}
		if a := at(ref); o.ModTime.After(a.last) {
			a.last = o.ModTime
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = b.listUploads(ctx, base, func(u types.MultipartUpload) error {
		ref, name, ok := strings.Cut(strings.TrimPrefix(aws.ToString(u.Key), base), "/")
		if !ok || name != ingestData || blobstore.ValidateName(ref) != nil {
			return nil
		}
		a := at(ref)
		a.uploads = append(a.uploads, aws.ToString(u.UploadId))
		if t := aws.ToTime(u.Initiated); t.After(a.last) {
			a.last = t
		}
		return nil
	})
	return refs, err
}

// SweepIngests removes the ingests with no activity since idleSince and no
// open Writer in this process: their multipart uploads are aborted (our own
// sweeper: RGW's lifecycle rules run daily at best, MinIO rejects them) and
// their state, tail and data objects deleted. Activity is the newest of the
// objects' LastModified (the state is rewritten after every part) and the
// uploads' Initiated, so an upload that another agent is still feeding is
// left alone. It reports the ingests removed and the bytes their states
// claimed.
func (b *Backend) SweepIngests(ctx context.Context, idleSince time.Time) (int, int64, error) {
	refs, err := b.ingests(ctx)
	if err != nil {
		return 0, 0, err
	}
	removed, freed := 0, int64(0)
	var firstErr error
	for ref, a := range refs {
		if !a.last.Before(idleSince) {
			continue
		}
		b.mu.Lock()
		open := b.active[ref]
		b.mu.Unlock()
		if open {
			continue
		}
		n, _ := b.stateBytes(ctx, ref)
		if err := b.removeIngest(ctx, ref, ""); err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		b.mu.Lock()
		delete(b.ended, ref)
		b.mu.Unlock()
		b.log.Info("removed abandoned ingest", "ref", ref, "last_activity", a.last, "uploads_aborted", len(a.uploads), "bytes", n)
		removed++
		freed += n
	}
	if err := b.sweepCopies(ctx, idleSince); err != nil && firstErr == nil {
		firstErr = err
	}
	return removed, freed, firstErr
}

// sweepCopies aborts the multipart uploads at blob keys initiated before
// idleSince: the server-side copies of blobs over copyLimit (a commit or
// a renewal) that a crash interrupted. Never completed, they are no
// visible blob, but their parts hold the copied bytes until aborted.
func (b *Backend) sweepCopies(ctx context.Context, idleSince time.Time) error {
	type upload struct{ key, id string }
	var old []upload
	err := b.listUploads(ctx, b.prefix+dirBlobs, func(u types.MultipartUpload) error {
		if aws.ToTime(u.Initiated).Before(idleSince) {
			old = append(old, upload{aws.ToString(u.Key), aws.ToString(u.UploadId)})
		}
		return nil
	})
	if err != nil {
		return err
	}
	var first error
	for _, u := range old {
		if err := b.abort(ctx, u.key, u.id); err != nil {
			if first == nil {
				first = err
			}
			continue
		}
		b.log.Info("aborted an abandoned blob copy", "key", u.key, "upload", u.id)
	}
	return first
}

// Sweep is SweepIngests with the backend's IngestExpiry and clock.
func (b *Backend) Sweep(ctx context.Context) (int, int64, error) {
	return b.SweepIngests(ctx, b.now().Add(-b.opts.IngestExpiry))
}

// stateBytes is what ref's state object claims (0 without a usable one).
func (b *Backend) stateBytes(ctx context.Context, ref string) (int64, error) {
	raw, _, err := b.getSmall(ctx, b.ingestKey(ref, ingestState))
	if err != nil {
		if errors.Is(err, blobstore.ErrNotFound) {
			return 0, nil
		}
		return 0, err
	}
	st, _, err := parseState(raw)
	if err != nil {
		return 0, nil
	}
	return st.Offset + st.Tail, nil
}

// IngestBytes is the bytes all ingests' states claim.
func (b *Backend) IngestBytes(ctx context.Context) (int64, error) {
	refs, err := b.ingests(ctx)
	if err != nil {
		return 0, err
	}
	var sum int64
	for ref := range refs {
		n, err := b.stateBytes(ctx, ref)
		if err != nil {
			return 0, err
		}
		sum += n
	}
	return sum, nil
}

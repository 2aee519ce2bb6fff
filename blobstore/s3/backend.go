package s3store

import (
	"context"
	"fmt"
	"time"

	"imagestore/blobstore"

	"github.com/opencontainers/go-digest"
)

// DefaultCommitGrace is the commit grace a Store on S3 should use when
// several agents share the bucket: an agent cannot see another's ingests
// or holds, so a blob another agent committed must outlive the time that
// agent may take to write the image record naming it (≈ 24 h, as PBS and
// kopia keep).
const DefaultCommitGrace = 24 * time.Hour

var _ blobstore.Backend = (*Backend)(nil)

// OpenIngest opens or resumes ingest ref (Writer). dropped is what the
// state claimed beyond where the Writer resumes (a tail that did not
// survive, or an upload that is gone).
func (b *Backend) OpenIngest(ctx context.Context, ref string) (blobstore.Ingest, int64, error) {
	claimed, err := b.stateBytes(ctx, ref)
	if err != nil {
		return nil, 0, err
	}
	w, err := b.Writer(ctx, ref)
	if err != nil {
		return nil, 0, err
	}
	// The Store reserved every byte a Writer here accepted; one that
	// failed for good (a part upload, a save) stored fewer than its
	// Offset, and those bytes are dropped too.
	b.mu.Lock()
	claimed = max(claimed, b.ended[ref])
	delete(b.ended, ref)
	b.mu.Unlock()
	return ingest{w}, max(0, claimed-w.Offset()), nil
}

// ingest adapts Writer to blobstore.Ingest.
type ingest struct{ *Writer }

func (i ingest) Err() error { return i.err }

// Commit publishes the ingest as blob d. The Store has checked size and
// digest; d is checked once more, so a wrong d can never be published.
func (i ingest) Commit(ctx context.Context, d digest.Digest) (bool, error) {
	res, err := i.commit(ctx, -1, d)
	if err != nil {
		return false, err
	}
	return !res.Existed, nil
}

// BlobPath: an object has no local path; read it through OpenBlob.
func (b *Backend) BlobPath(d digest.Digest) (string, error) {
	return "", fmt.Errorf("%w: blob %s is in bucket %s", blobstore.ErrNoLocalPath, d, b.bucket)
}

// Capacity: a bucket has no size to report.
func (b *Backend) Capacity(context.Context) (blobstore.BackendCapacity, error) {
	return blobstore.BackendCapacity{Known: false}, nil
}

// Close drops the read cache and ends the readahead streams.
func (b *Backend) Close() error {
	if b.cache != nil {
		b.cache.reset()
	}
	b.ra.halt("", true)
	b.ra.chunks.reset()
	return nil
}

package replicate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"imagestore/blobstore"
	"imagestore/internal/retry"
	"imagestore/transfer/oci"
	"imagestore/transfer/ratelimit"
)

// One blob's transfer, each way, with its own small retry rules inside a
// task attempt (Engine.taskRetry): a blob the peer (or this store) finds
// garbled is sent (fetched) once more; a cut download resumes.

// onceMore is the policy of "try a second time, at once".
func onceMore() retry.Policy { return retry.Policy{Attempts: 2} }

// downloadResumes is the policy of a blob download's resumes from where it
// stopped: 6 more, 200 ms doubling to 3.2 s (±20 %), for failures a resume
// may get past.
func downloadResumes() retry.Policy {
	return retry.Policy{
		Attempts: 7, Initial: 200 * time.Millisecond, Max: 3200 * time.Millisecond, Jitter: 0.2,
		Retryable: func(err error) bool {
			var oe *oci.Error
			return !(errors.As(err, &oe) && !oe.Temporary()) && retryable(err)
		},
	}
}

func (e *Engine) sendBlob(ctx context.Context, ts *taskState, c *oci.Client, name string, l oci.Descriptor, lim *ratelimit.Limiter) error {
	return onceMore().Do(ctx, func(ctx context.Context, attempt int) error {
		b, err := e.st.OpenBlob(ctx, l.Digest)
		if err != nil {
			return retry.Permanent(fmt.Errorf("%w: blob %s: %w", ErrIncomplete, l.Digest, err))
		}
		var sent int64
		err = c.PushBlob(ctx, name, l.Digest, l.Size, ratelimit.ReaderAt(ctx, b, lim), oci.PushOptions{Progress: func(n int64) {
			sent += n
			ts.progress(n)
		}})
		b.Close()
		switch {
		case err == nil:
			e.m.SentBytes.Add(float64(l.Size))
			e.m.BlobsSent.Inc()
			ts.blobDone()
			return nil
		case errors.Is(err, oci.ErrSourceDigest):
			ts.progress(-sent)
			// Confirm with a full read: VerifyBlob quarantines a corrupt blob.
			verr := e.st.VerifyBlob(context.WithoutCancel(ctx), l.Digest)
			if verr == nil {
				return retry.Permanent(fmt.Errorf("blob %s: hash while sending did not match but the blob verifies; will retry: %w", l.Digest, err))
			}
			return retry.Permanent(fmt.Errorf("%w: blob %s not sent: %w", ErrSourceCorrupt, l.Digest, verr))
		case errors.Is(err, oci.ErrDigestInvalid) && attempt == 0:
			// The peer received bytes that do not hash right: send once more.
			ts.progress(-sent)
			e.log.Warn("peer refused blob digest; re-sending once", "blob", l.Digest)
			return err
		case errors.Is(err, oci.ErrDigestInvalid):
			return fmt.Errorf("blob %s refused twice by the peer: %w", l.Digest, err)
		default:
			ts.progress(-sent)
			return retry.Permanent(fmt.Errorf("send blob %s: %w", l.Digest, err))
		}
	})
}

// fetchBlob downloads one blob into a resumable ingest named after its
// digest (a retry, even after a restart, continues where it stopped) and
// commits it against the digest; a mismatch is fetched once more. It
// returns the commit's Creation (zero if the blob was stored meanwhile).
func (e *Engine) fetchBlob(ctx context.Context, ts *taskState, c *oci.Client, name string, l oci.Descriptor, lim *ratelimit.Limiter) (blobstore.Creation, error) {
	ingest := "pull-" + l.Digest.Encoded()
	var created blobstore.Creation
	err := onceMore().Do(ctx, func(ctx context.Context, attempt int) error {
		w, err := e.st.Writer(ctx, ingest)
		if err != nil {
			return retry.Permanent(fmt.Errorf("blob %s: %w", l.Digest, err))
		}
		start := w.Offset()
		ts.progress(start)
		err = e.download(ctx, ts, c, name, l, w, lim)
		if errors.Is(err, oci.ErrTooLarge) {
			// The peer streams more than it declared: what it sent is
			// worth nothing, so no ingest stays behind to resume.
			_ = w.Cancel()
			ts.progress(-w.Offset())
			return retry.Permanent(fmt.Errorf("fetch blob %s: %w", l.Digest, err))
		}
		if err != nil {
			w.Close()
			ts.progress(-w.Offset())
			return retry.Permanent(fmt.Errorf("fetch blob %s: %w", l.Digest, err))
		}
		e.m.ReceivedBytes.Add(float64(w.Offset() - start))
		_, err = w.Commit(ctx, l.Size, l.Digest)
		switch {
		case err == nil:
			created = w.Creation()
			e.m.BlobsSent.Inc()
			ts.blobDone()
			return nil
		case (errors.Is(err, blobstore.ErrDigestMismatch) || errors.Is(err, blobstore.ErrSizeMismatch)) && attempt == 0:
			ts.progress(-l.Size)
			e.log.Warn("blob from peer failed verification; fetching once more", "blob", l.Digest, "err", err)
			return fmt.Errorf("blob %s: %w", l.Digest, err)
		default:
			return retry.Permanent(fmt.Errorf("blob %s: %w", l.Digest, err))
		}
	})
	return created, err
}

// download copies the rest of blob l (from w's offset) into w, resuming
// after a cut (downloadResumes).
func (e *Engine) download(ctx context.Context, ts *taskState, c *oci.Client, name string, l oci.Descriptor, w *blobstore.Writer, lim *ratelimit.Limiter) error {
	buf := make([]byte, 1<<20)
	err := downloadResumes().Do(ctx, func(ctx context.Context, _ int) error {
		off := w.Offset()
		if off >= l.Size {
			return nil
		}
		rc, err := c.GetBlob(ctx, name, l.Digest, off, l.Size)
		if err != nil {
			return err
		}
		_, err = io.CopyBuffer(w, &progressReader{r: ratelimit.Reader(ctx, rc, lim), fn: ts.progress}, buf)
		rc.Close()
		if err == nil && w.Offset() < l.Size {
			err = io.ErrUnexpectedEOF
		}
		return err
	})
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

type progressReader struct {
	r  io.Reader
	fn func(int64)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.fn(int64(n))
	}
	return n, err
}

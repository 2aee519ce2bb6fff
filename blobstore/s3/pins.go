package s3store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"imagestore/blobstore"
	"imagestore/internal/retry"
)

// Agents sharing a bucket share no lock, and RGW 16.2 has no conditional
// DELETE. The one race the commit grace cannot close is a commit of content
// already stored (which only renews the blob's LastModified) against a GC
// on another agent that checked that LastModified just before the renew
// and deletes just after it. Two small objects per blob close it, by the
// store-buffer argument (each side writes its own flag, then reads the
// other's; S3 is strongly consistent per key):
//
//	commit (A): put pins/<hex>; wait while a young gc/<hex> exists;
//	            head the blob (gone: upload our own copy); renew it;
//	            put pins/<hex> again
//	delete (B): head the blob; put gc/<hex>; a young pins/<hex>: skip;
//	            delete the blob unless pinTTL/2 has passed since the start;
//	            delete gc/<hex>
//
// If B's pin check ran before A's first pin put, then B's intent was put
// before A looked for it, so A either waits until B is done (and then finds
// the blob gone and uploads its own copy) or finds it already gone. If it ran
// after, B sees A's pin and skips. A renew that finished before B's check
// left a pin younger than pinTTL that B sees, since B gives up deleting
// pinTTL/2 after it started. "Young" is measured on the server's clock (the
// LastModified of an object just written), so agents' clock skew does not
// matter. Pins are never removed by their writer; a delete that meets a
// stale one removes it.
const (
	dirPins    = "pins/"
	dirGC      = "gc/"
	defaultPin = 10 * time.Minute
)

func (b *Backend) pinKey(h string) string    { return b.prefix + dirPins + h }
func (b *Backend) intentKey(h string) string { return b.prefix + dirGC + h }

// serverNow puts key and returns its LastModified: the server's clock.
func (b *Backend) serverNow(ctx context.Context, key string) (time.Time, error) {
	if _, err := b.putCond(ctx, key, nil, false, ""); err != nil {
		return time.Time{}, err
	}
	o, err := b.head(ctx, key)
	if err != nil {
		return time.Time{}, err
	}
	return o.ModTime, nil
}

// pinExisting runs A's side for blob h of size bytes: it reports whether
// the blob is there and renewed (false: it is gone, upload a copy).
func (b *Backend) pinExisting(ctx context.Context, h string, size int64) (bool, error) {
	if b.pinsOff {
		err := b.renew(ctx, b.blobKey(h), size)
		return err == nil, err
	}
	now, err := b.serverNow(ctx, b.pinKey(h))
	if err != nil {
		return false, err
	}
	wait := retry.Policy{Initial: 200 * time.Millisecond, Max: 5 * time.Second}
	for i := 0; ; i++ {
		o, err := b.head(ctx, b.intentKey(h))
		if errors.Is(err, blobstore.ErrNotFound) {
			break
		}
		if err != nil {
			return false, err
		}
		if now.Sub(o.ModTime) >= b.opts.PinTTL {
			break // left by a GC that died; a live one gives up within PinTTL/2
		}
		b.log.Debug("waiting for a GC on the blob to finish", "blob", h)
		if err := retry.Sleep(ctx, wait.Delay(i)); err != nil {
			return false, err
		}
		if now, err = b.serverNow(ctx, b.pinKey(h)); err != nil {
			return false, err
		}
	}
	key := b.blobKey(h)
	o, err := b.head(ctx, key)
	if errors.Is(err, blobstore.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if o.Size != size {
		return false, nil // not our bytes: overwrite with ours
	}
	if err := b.renew(ctx, key, size); err != nil {
		if errors.Is(err, blobstore.ErrNotFound) {
			return false, nil
		}
		return false, err
	}
	if _, err := b.putCond(ctx, b.pinKey(h), nil, false, ""); err != nil {
		return false, err
	}
	return true, nil
}

// deleteUnpinned runs B's side: it deletes blob h unless a commit pinned
// it (ErrInUse) or it is absent (blobstore.ErrNotFound).
func (b *Backend) deleteUnpinned(ctx context.Context, h string) error {
	start := time.Now()
	key := b.blobKey(h)
	if _, err := b.head(ctx, key); err != nil {
		return err
	}
	if b.pinsOff {
		if b.beforeDelete != nil {
			b.beforeDelete(h)
		}
		return b.deleteKey(ctx, key)
	}
	ik := b.intentKey(h)
	now, err := b.serverNow(ctx, ik)
	if err != nil {
		return err
	}
	defer func() { _ = b.deleteKey(context.WithoutCancel(ctx), ik) }()
	p, err := b.head(ctx, b.pinKey(h))
	switch {
	case err == nil && now.Sub(p.ModTime) < b.opts.PinTTL:
		return fmt.Errorf("%w: %s pinned %s ago", blobstore.ErrInUse, h, now.Sub(p.ModTime).Round(time.Second))
	case err == nil:
		_ = b.deleteKey(ctx, b.pinKey(h)) // stale
	case !errors.Is(err, blobstore.ErrNotFound):
		return err
	}
	if b.beforeDelete != nil {
		b.beforeDelete(h)
	}
	dctx, cancel := context.WithDeadline(ctx, start.Add(b.opts.PinTTL/2))
	defer cancel()
	if err := b.deleteKey(dctx, key); err != nil {
		if dctx.Err() != nil && ctx.Err() == nil {
			return fmt.Errorf("%w: %s: delete not done within %s: %w", blobstore.ErrInUse, h, b.opts.PinTTL/2, err)
		}
		return err
	}
	return nil
}

package s3store

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"imagestore/blobstore"
)

// Records (image records, "images/<name>/<id>.json") are small immutable
// objects under their key; the settings object is store.json.

func (b *Backend) recordKey(key string) (string, error) {
	if err := blobstore.ValidateRecordKey(key); err != nil {
		return "", fmt.Errorf("%w: %w", blobstore.ErrInvalidName, err)
	}
	return b.prefix + key, nil
}

// PutRecord creates the record only if its key is free: PutObject with
// If-None-Match: *, which RGW honours on PutObject. A 412 (the key exists,
// whoever wrote it) is blobstore.ErrExists; the Store compares contents.
func (b *Backend) PutRecord(ctx context.Context, key string, data []byte) error {
	k, err := b.recordKey(key)
	if err != nil {
		return err
	}
	if _, err := b.putCond(ctx, k, data, true, ""); err != nil {
		if errors.Is(err, errPrecondition) {
			return fmt.Errorf("%w: record %s", blobstore.ErrExists, key)
		}
		return err
	}
	return nil
}

// GetRecord reads a record (blobstore.ErrNotFound if absent).
func (b *Backend) GetRecord(ctx context.Context, key string) ([]byte, error) {
	k, err := b.recordKey(key)
	if err != nil {
		return nil, err
	}
	data, _, err := b.getSmall(ctx, k)
	return data, err
}

// ListRecords lists the records under prefix ("images/", "images/vol1/")
// in key order, with their LastModified.
func (b *Backend) ListRecords(ctx context.Context, prefix string) ([]blobstore.RecordInfo, error) {
	p, ok := strings.CutSuffix(prefix, "/")
	if !ok {
		return nil, fmt.Errorf("%w: record prefix %q does not end with /", blobstore.ErrInvalidName, prefix)
	}
	if _, err := b.recordKey(p); err != nil {
		return nil, err
	}
	var out []blobstore.RecordInfo
	err := b.list(ctx, b.prefix+prefix, "", func(key string, o object) error {
		rel := strings.TrimPrefix(key, b.prefix)
		if blobstore.ValidateRecordKey(rel) != nil {
			return nil // not ours (a stray key someone else put there)
		}
		out = append(out, blobstore.RecordInfo{Key: rel, ModTime: o.ModTime})
		return nil
	})
	return out, err
}

// DeleteRecord removes a record; an absent key is no error.
func (b *Backend) DeleteRecord(ctx context.Context, key string) error {
	k, err := b.recordKey(key)
	if err != nil {
		return err
	}
	return b.deleteKey(ctx, k)
}

// ReadSettings returns store.json (blobstore.ErrNotFound if never written).
func (b *Backend) ReadSettings(ctx context.Context) ([]byte, error) {
	data, _, err := b.getSmall(ctx, b.prefix+keySettings)
	return data, err
}

// WriteSettings replaces store.json. The replacement is conditional on the
// version it replaces (If-Match on its ETag, or If-None-Match: * when there
// was none), so of two agents replacing it at once each write lands whole
// and in some order; a lost race is retried on the new version.
func (b *Backend) WriteSettings(ctx context.Context, data []byte) error {
	key := b.prefix + keySettings
	for range 5 {
		o, err := b.head(ctx, key)
		createOnly := errors.Is(err, blobstore.ErrNotFound)
		if err != nil && !createOnly {
			return err
		}
		_, err = b.putCond(ctx, key, data, createOnly, o.ETag)
		if !errors.Is(err, errPrecondition) {
			return err
		}
	}
	return fmt.Errorf("s3store: %s keeps changing under us", keySettings)
}

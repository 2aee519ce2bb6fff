package blobstore

import (
	"imagestore/internal/fsutil"

	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// LocalOptions configure the local filesystem backend.
type LocalOptions struct {
	Root string
	// CheckpointEvery is how many bytes an ingest writes between durable
	// checkpoints (default 128 MiB): what a crash can cost to resend.
	CheckpointEvery int64
	Logger          *slog.Logger
}

// Local is the Backend on a local filesystem; docs/blobstore.md has its
// layout and crash-safety argument.
type Local struct {
	root string
	log  *slog.Logger

	// commitMu makes a commit's "is the blob there? then touch it, else
	// rename the ingest into place" one step, so concurrent commits of
	// the same bytes report created once.
	commitMu sync.Mutex

	checkpointEvery int64                // bytes between ingest checkpoints; tests lower it
	syncFile        func(*os.File) error // fsyncs ingest data; tests make it fail
}

const (
	// defaultCheckpoint: a checkpoint is three fsyncs (data, the state's
	// temp file, the directory) and a drop of the pages written since; at
	// 32 MiB a push spent a checkpoint every ~50 ms, and 128 MiB measured
	// 12 % faster (bench, commit message). A cut costs at most this much
	// resent, a fraction of a second on a LAN.
	defaultCheckpoint = 128 << 20
	dirBlobs          = "blobs"
	dirIngest         = "ingest"
	dirImages         = "images"
	dirQuarantine     = "quarantine"
	fileSettings      = "store.json"
	recordExt         = ".json"
)

// NewLocal opens (creating if needed) the local backend at opts.Root and
// removes what a crash can leave behind: ingest directories without a data
// file and temp files of records and settings. No Ingest of the backend can
// be open yet, so nothing in flight is touched.
func NewLocal(opts LocalOptions) (*Local, error) {
	if opts.Root == "" {
		return nil, fmt.Errorf("blobstore: empty root")
	}
	root, err := filepath.Abs(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("blobstore: root: %w", err)
	}
	if opts.CheckpointEvery <= 0 {
		opts.CheckpointEvery = defaultCheckpoint
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	l := &Local{
		root:            root,
		log:             logger.With("component", "blobstore"),
		checkpointEvery: opts.CheckpointEvery,
		syncFile:        (*os.File).Sync,
	}
	for _, d := range []string{"", dirBlobs, filepath.Join(dirBlobs, "sha256"), dirIngest, dirImages, dirQuarantine} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, mapSpace(err, "blobstore: create layout")
		}
	}
	if err := l.removeOrphanIngests(); err != nil {
		return nil, err
	}
	l.cleanTemps()
	return l, nil
}

// Root is the backend's directory.
func (l *Local) Root() string { return l.root }

func (l *Local) blobPath(d digest.Digest) string {
	h := d.Encoded()
	return filepath.Join(l.root, dirBlobs, "sha256", h[:2], h)
}

// BlobPath implements Backend.
func (l *Local) BlobPath(d digest.Digest) (string, error) {
	p := l.blobPath(d)
	if _, err := os.Lstat(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("%w: blob %s", ErrNotFound, d)
		}
		return "", fmt.Errorf("blobstore: %w", err)
	}
	return p, nil
}

type blobFile struct {
	*os.File
	size int64
}

func (b blobFile) Size() int64 { return b.size }

// OpenBlob implements Backend.
func (l *Local) OpenBlob(ctx context.Context, d digest.Digest) (Blob, error) {
	f, err := os.Open(l.blobPath(d))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: blob %s", ErrNotFound, d)
		}
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	return blobFile{File: f, size: fi.Size()}, nil
}

// StatBlob implements Backend.
func (l *Local) StatBlob(ctx context.Context, d digest.Digest) (BlobInfo, error) {
	fi, err := os.Lstat(l.blobPath(d))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return BlobInfo{}, fmt.Errorf("%w: blob %s", ErrNotFound, d)
		}
		return BlobInfo{}, fmt.Errorf("blobstore: %w", err)
	}
	return BlobInfo{Digest: d, Size: fi.Size(), ModTime: fi.ModTime()}, nil
}

// WalkBlobs implements Backend.
func (l *Local) WalkBlobs(ctx context.Context, fn func(BlobInfo) error) error {
	base := filepath.Join(l.root, dirBlobs, "sha256")
	dirs, err := os.ReadDir(base)
	if err != nil {
		return fmt.Errorf("blobstore: list blobs: %w", err)
	}
	for _, dd := range dirs {
		if !dd.IsDir() || len(dd.Name()) != 2 {
			continue
		}
		ents, err := os.ReadDir(filepath.Join(base, dd.Name()))
		if err != nil {
			return fmt.Errorf("blobstore: list blobs: %w", err)
		}
		for _, e := range ents {
			if err := ctx.Err(); err != nil {
				return err
			}
			d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
			if validateDigest(d) != nil || e.Name()[:2] != dd.Name() || !e.Type().IsRegular() {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					continue // swept meanwhile
				}
				return fmt.Errorf("blobstore: %w", err)
			}
			if err := fn(BlobInfo{Digest: d, Size: fi.Size(), ModTime: fi.ModTime()}); err != nil {
				return err
			}
		}
	}
	return nil
}

// DeleteBlob implements Backend.
func (l *Local) DeleteBlob(ctx context.Context, d digest.Digest) error {
	p := l.blobPath(d)
	if err := os.Remove(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w: blob %s", ErrNotFound, d)
		}
		return fmt.Errorf("blobstore: delete blob: %w", err)
	}
	if err := fsutil.SyncDir(filepath.Dir(p)); err != nil {
		return fmt.Errorf("blobstore: delete blob: %w", err)
	}
	return nil
}

// QuarantineBlob implements Backend: the blob moves to quarantine/<hex>.
func (l *Local) QuarantineBlob(ctx context.Context, d digest.Digest) (string, error) {
	src := l.blobPath(d)
	dst := filepath.Join(l.root, dirQuarantine, d.Encoded())
	if err := os.Rename(src, dst); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("%w: blob %s", ErrNotFound, d)
		}
		return "", err
	}
	_ = fsutil.SyncDir(filepath.Dir(src))
	_ = fsutil.SyncDir(filepath.Dir(dst))
	return dst, nil
}

// recordPath maps a record key to its file: <root>/<key>.json.
func (l *Local) recordPath(key string) (string, error) {
	if err := ValidateRecordKey(key); err != nil {
		return "", err
	}
	return filepath.Join(l.root, filepath.FromSlash(key)+recordExt), nil
}

// PutRecord implements Backend: temp file, fsync, then link(2) to the
// final name, which fails if it exists (create-only), then fsync the dir.
func (l *Local) PutRecord(ctx context.Context, key string, b []byte) error {
	p, err := l.recordPath(key)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return mapSpace(err, "blobstore: put record")
		}
		if err := fsutil.SyncDir(filepath.Dir(dir)); err != nil {
			return fmt.Errorf("blobstore: put record: %w", err)
		}
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(p)+".tmp-*")
	if err != nil {
		return mapSpace(err, "blobstore: put record "+key)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	_, werr := f.Write(b)
	if werr == nil {
		werr = f.Chmod(0o600)
	}
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return mapSpace(werr, "blobstore: put record "+key)
	}
	if err := os.Link(tmp, p); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%w: record %s", ErrExists, key)
		}
		return mapSpace(err, "blobstore: put record "+key)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return fmt.Errorf("blobstore: put record %s: %w", key, err)
	}
	return nil
}

// GetRecord implements Backend.
func (l *Local) GetRecord(ctx context.Context, key string) ([]byte, error) {
	p, err := l.recordPath(key)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: record %s", ErrNotFound, key)
		}
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	return b, nil
}

// ListRecords implements Backend.
func (l *Local) ListRecords(ctx context.Context, prefix string) ([]RecordInfo, error) {
	if err := validateRecordPrefix(prefix); err != nil {
		return nil, err
	}
	var out []RecordInfo
	var walk func(dir, keyPrefix string) error
	walk = func(dir, keyPrefix string) error {
		ents, err := os.ReadDir(dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("blobstore: list records: %w", err)
		}
		for _, e := range ents {
			if err := ctx.Err(); err != nil {
				return err
			}
			if e.IsDir() {
				if ValidateName(e.Name()) == nil {
					if err := walk(filepath.Join(dir, e.Name()), keyPrefix+e.Name()+"/"); err != nil {
						return err
					}
				}
				continue
			}
			id, ok := strings.CutSuffix(e.Name(), recordExt)
			if !ok || ValidateName(id) != nil || !e.Type().IsRegular() {
				continue // temp files start with a dot
			}
			fi, err := e.Info()
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					continue
				}
				return fmt.Errorf("blobstore: list records: %w", err)
			}
			out = append(out, RecordInfo{Key: keyPrefix + id, ModTime: fi.ModTime()})
		}
		return nil
	}
	if err := walk(filepath.Join(l.root, filepath.FromSlash(prefix)), prefix); err != nil {
		return nil, err
	}
	return out, nil
}

// DeleteRecord implements Backend; it also drops the record's directory
// once empty (below the key's first component).
func (l *Local) DeleteRecord(ctx context.Context, key string) error {
	p, err := l.recordPath(key)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("blobstore: delete record %s: %w", key, err)
	}
	dir := filepath.Dir(p)
	if err := fsutil.SyncDir(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("blobstore: delete record %s: %w", key, err)
	}
	if strings.Count(key, "/") >= 2 && os.Remove(dir) == nil {
		_ = fsutil.SyncDir(filepath.Dir(dir))
	}
	return nil
}

// ReadSettings implements Backend: <root>/store.json.
func (l *Local) ReadSettings(ctx context.Context) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(l.root, fileSettings))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, fileSettings)
		}
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	return b, nil
}

// WriteSettings implements Backend.
func (l *Local) WriteSettings(ctx context.Context, b []byte) error {
	return mapSpace(fsutil.WriteFile(filepath.Join(l.root, fileSettings), b, 0o600), "blobstore: save settings")
}

// Capacity implements Backend: statfs of the root.
func (l *Local) Capacity(ctx context.Context) (BackendCapacity, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(l.root, &st); err != nil {
		return BackendCapacity{}, fmt.Errorf("blobstore: statfs %s: %w", l.root, err)
	}
	return BackendCapacity{
		Total: int64(st.Blocks) * int64(st.Bsize),
		Free:  int64(st.Bavail) * int64(st.Bsize),
		Known: true,
	}, nil
}

// Close implements Backend; open Ingests stay usable until closed.
func (l *Local) Close() error { return nil }

// cleanTemps removes temp files a crash left behind in images/ and the root.
func (l *Local) cleanTemps() {
	base := filepath.Join(l.root, dirImages)
	ents, _ := os.ReadDir(base)
	for _, e := range ents {
		sub, _ := os.ReadDir(filepath.Join(base, e.Name()))
		for _, f := range sub {
			if strings.HasPrefix(f.Name(), ".") && strings.Contains(f.Name(), ".tmp-") {
				os.Remove(filepath.Join(base, e.Name(), f.Name()))
			}
		}
	}
	if sub, _ := os.ReadDir(l.root); sub != nil {
		for _, f := range sub {
			if strings.HasPrefix(f.Name(), "."+fileSettings+".tmp-") {
				os.Remove(filepath.Join(l.root, f.Name()))
			}
		}
	}
}

// touch sets a blob's mtime: the commit time the GC grace counts from.
func touch(path string) {
	now := time.Now()
	_ = os.Chtimes(path, now, now)
}

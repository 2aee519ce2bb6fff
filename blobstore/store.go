// Package blobstore is a content-addressed blob store on a local filesystem:
// resumable, crash-safe ingest of sha256-named blobs, image records that
// chain blobs into backup chains, mark-and-sweep GC, scrubbing and a quota.
// See docs/blobstore.md for the layout and the crash-safety argument.
package blobstore

import (
	"imagestore/internal/fsutil"

	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Options configure a Store.
type Options struct {
	Root         string
	Quota        int64         // bytes; 0 = none; overridden by SetQuota (persisted)
	IngestExpiry time.Duration // abandoned ingests older than this are removed (default 24h)
	CommitGrace  time.Duration // GC never frees a blob committed less than this ago (default 10m)
	// CheckpointEvery is how many bytes an ingest Writer writes between
	// durable checkpoints (default 32 MiB): what a crash can cost to resend.
	CheckpointEvery int64
	Logger          *slog.Logger
}

const (
	defaultIngestExpiry = 24 * time.Hour
	defaultCommitGrace  = 10 * time.Minute
	defaultCheckpoint   = 32 << 20
	dirBlobs            = "blobs"
	dirIngest           = "ingest"
	dirImages           = "images"
	dirQuarantine       = "quarantine"
	fileSettings        = "store.json"
)

// Store is a blob store rooted at one directory. It is safe for concurrent
// use; one process should own a root at a time (ingests are additionally
// protected across processes by flock).
type Store struct {
	root   string
	opts   Options
	log    *slog.Logger
	closed chan struct{}

	// imgMu serialises image record changes against GC's mark and sweep, so
	// a record written during GC cannot point at a blob being swept.
	imgMu sync.RWMutex

	// mu guards the accounting and the commit/sweep critical sections: a
	// blob is renamed into place (or found to exist and touched) under mu,
	// and GC re-checks holds and commit times under mu before it unlinks.
	mu      sync.Mutex
	used    int64 // committed blob bytes + ingest bytes
	blobs   int
	quota   int64
	holds   map[digest.Digest]int
	commits map[digest.Digest]commitMark // recent commits, for CommitGrace
	seq     uint64                       // numbers commits, for Creation

	// discardListed runs in Discard after it listed the records, before
	// it takes mu; tests use it to force an interleaving.
	discardListed func()

	checkpointEvery int64                // bytes between ingest checkpoints; tests lower it
	copyBufs        sync.Pool            // Put's copy buffers
	syncFile        func(*os.File) error // fsyncs ingest data; tests make it fail
}

type settings struct {
	Quota int64 `json:"quota"`
}

// Open opens (creating if needed) the store at opts.Root, removes expired
// ingests and leftover temp files, and computes the space in use.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if opts.Root == "" {
		return nil, fmt.Errorf("blobstore: empty root")
	}
	root, err := filepath.Abs(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("blobstore: root: %w", err)
	}
	if opts.IngestExpiry <= 0 {
		opts.IngestExpiry = defaultIngestExpiry
	}
	if opts.CommitGrace <= 0 {
		opts.CommitGrace = defaultCommitGrace
	}
	if opts.CheckpointEvery <= 0 {
		opts.CheckpointEvery = defaultCheckpoint
	}
	if opts.Quota < 0 {
		return nil, fmt.Errorf("blobstore: negative quota %d", opts.Quota)
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	s := &Store{
		root:    root,
		opts:    opts,
		log:     logger.With("component", "blobstore"),
		closed:  make(chan struct{}),
		quota:   opts.Quota,
		holds:   map[digest.Digest]int{},
		commits: map[digest.Digest]commitMark{},

		checkpointEvery: opts.CheckpointEvery,
		syncFile:        (*os.File).Sync,
	}
	s.copyBufs.New = func() any { b := make([]byte, copyBufSize); return &b }
	for _, d := range []string{"", dirBlobs, filepath.Join(dirBlobs, "sha256"), dirIngest, dirImages, dirQuarantine} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, mapSpace(err, "blobstore: create layout")
		}
	}
	if b, err := os.ReadFile(filepath.Join(root, fileSettings)); err == nil {
		var st settings
		if err := json.Unmarshal(b, &st); err != nil {
			return nil, fmt.Errorf("blobstore: %s: %w", fileSettings, err)
		}
		if st.Quota < 0 {
			return nil, fmt.Errorf("blobstore: %s: negative quota %d", fileSettings, st.Quota)
		}
		s.quota = st.Quota
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	if _, _, err := s.cleanIngests(ctx, true); err != nil {
		return nil, err
	}
	s.cleanImageTemps()
	var used int64
	var n int
	if err := s.WalkBlobs(ctx, func(bi BlobInfo) error {
		used += bi.Size
		n++
		return nil
	}); err != nil {
		return nil, err
	}
	used += s.ingestBytes()
	s.used, s.blobs = used, n
	return s, nil
}

// Close releases the store. Open Writers stay usable until closed themselves.
func (s *Store) Close() error {
	select {
	case <-s.closed:
	default:
		close(s.closed)
	}
	return nil
}

// Root returns the absolute root directory.
func (s *Store) Root() string { return s.root }

// Capacity reports the filesystem's size and free space (statfs) next to
// the bytes the store uses and its quota.
type Capacity struct {
	Total, Free, Used, Quota int64
	Blobs, Images            int
}

// Capacity returns the current capacity figures.
func (s *Store) Capacity() (Capacity, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.root, &st); err != nil {
		return Capacity{}, fmt.Errorf("blobstore: statfs %s: %w", s.root, err)
	}
	imgs, err := s.countImages()
	if err != nil {
		return Capacity{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return Capacity{
		Total:  int64(st.Blocks) * int64(st.Bsize),
		Free:   int64(st.Bavail) * int64(st.Bsize),
		Used:   s.used,
		Quota:  s.quota,
		Blobs:  s.blobs,
		Images: imgs,
	}, nil
}

// SetQuota sets and persists the quota (0 = none). Lowering it below the
// space in use does not delete anything; it only makes new ingests fail.
func (s *Store) SetQuota(q int64) error {
	if q < 0 {
		return fmt.Errorf("blobstore: negative quota %d", q)
	}
	b, _ := json.Marshal(settings{Quota: q})
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := fsutil.WriteFile(filepath.Join(s.root, fileSettings), b, 0o600); err != nil {
		return mapSpace(err, "blobstore: save quota")
	}
	s.quota = q
	return nil
}

// reserve accounts n more bytes, failing before anything is written if the
// quota would be exceeded.
func (s *Store) reserve(n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.quota > 0 && s.used+n > s.quota {
		return fmt.Errorf("%w: %d bytes in use + %d requested > quota %d", ErrQuotaExceeded, s.used, n, s.quota)
	}
	s.used += n
	return nil
}

func (s *Store) release(n int64) {
	if n == 0 {
		return
	}
	s.mu.Lock()
	s.used -= n
	s.mu.Unlock()
}

// Package blobstore is a content-addressed blob store: resumable,
// crash-safe ingest of sha256-named blobs, image records that chain blobs
// into backup chains, mark-and-sweep GC, scrubbing and a quota. The Store
// keeps the rules; a Backend keeps the bytes (the local filesystem by
// default, or S3 via package blobstore/s3). See docs/blobstore.md for the
// layout and the crash-safety argument.
package blobstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// Options configure a Store.
type Options struct {
	// Root is the local state directory: the blobs themselves with the
	// default backend; with another backend the agent still keeps its
	// uploads, workspaces and caches there.
	Root string
	// Backend keeps the bytes; nil = the local filesystem at Root
	// (NewLocal with Root, CheckpointEvery and Logger). The Store owns
	// it: Close closes it.
	Backend      Backend
	Quota        int64         // bytes; 0 = none; overridden by SetQuota (persisted)
	IngestExpiry time.Duration // abandoned ingests older than this are removed (default 24h)
	CommitGrace  time.Duration // GC never frees a blob committed less than this ago (default 10m)
	// CheckpointEvery is how many bytes an ingest Writer writes between
	// durable checkpoints with the default backend (LocalOptions).
	CheckpointEvery int64
	Logger          *slog.Logger
}

const (
	defaultIngestExpiry = 24 * time.Hour
	defaultCommitGrace  = 10 * time.Minute
)

// Store is a blob store with its local state directory. It is safe for
// concurrent use; one process should own a root at a time (ingests are
// additionally protected across processes by flock on local disk).
type Store struct {
	root    string
	opts    Options
	log     *slog.Logger
	closed  chan struct{}
	backend Backend

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

	copyBufs sync.Pool // Put's and Verify's copy buffers
}

type settings struct {
	Quota int64 `json:"quota"`
}

// Open opens the store: the backend (creating the local one at opts.Root
// if opts.Backend is nil), its settings; it removes expired ingests and
// computes the space in use.
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
	if opts.Quota < 0 {
		return nil, fmt.Errorf("blobstore: negative quota %d", opts.Quota)
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	be := opts.Backend
	if be == nil {
		l, err := NewLocal(LocalOptions{Root: root, CheckpointEvery: opts.CheckpointEvery, Logger: logger})
		if err != nil {
			return nil, err
		}
		be = l
	} else if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, mapSpace(err, "blobstore: create root")
	}
	s := &Store{
		root:    root,
		opts:    opts,
		log:     logger.With("component", "blobstore"),
		closed:  make(chan struct{}),
		backend: be,
		quota:   opts.Quota,
		holds:   map[digest.Digest]int{},
		commits: map[digest.Digest]commitMark{},
	}
	s.copyBufs.New = func() any { b := make([]byte, copyBufSize); return &b }
	fail := func(err error) (*Store, error) {
		be.Close()
		return nil, err
	}
	if b, err := be.ReadSettings(ctx); err == nil {
		var st settings
		if err := json.Unmarshal(b, &st); err != nil {
			return fail(fmt.Errorf("blobstore: %s: %w", fileSettings, err))
		}
		if st.Quota < 0 {
			return fail(fmt.Errorf("blobstore: %s: negative quota %d", fileSettings, st.Quota))
		}
		s.quota = st.Quota
	} else if !errors.Is(err, ErrNotFound) {
		return fail(fmt.Errorf("blobstore: %w", err))
	}
	if _, _, err := be.SweepIngests(ctx, time.Now().Add(-opts.IngestExpiry)); err != nil {
		return fail(err)
	}
	var used int64
	var n int
	if err := be.WalkBlobs(ctx, func(bi BlobInfo) error {
		used += bi.Size
		n++
		return nil
	}); err != nil {
		return fail(err)
	}
	ib, err := be.IngestBytes(ctx)
	if err != nil {
		return fail(err)
	}
	s.used, s.blobs = used+ib, n
	return s, nil
}

// Close releases the store. Open Writers stay usable until closed themselves.
func (s *Store) Close() error {
	select {
	case <-s.closed:
		return nil
	default:
		close(s.closed)
	}
	return s.backend.Close()
}

// Root returns the absolute local state directory.
func (s *Store) Root() string { return s.root }

// Backend returns the store's backend.
func (s *Store) Backend() Backend { return s.backend }

// Capacity reports the medium's size and free space next to the bytes the
// store uses and its quota. On local disk Total and Free are statfs's; a
// backend without a size (S3) reports Unbounded with Total = Free = 0, and
// then only the quota bounds the store.
type Capacity struct {
	Total, Free, Used, Quota int64
	Blobs, Images            int
	Unbounded                bool
}

// Capacity returns the current capacity figures.
func (s *Store) Capacity() (Capacity, error) {
	ctx := context.Background()
	bc, err := s.backend.Capacity(ctx)
	if err != nil {
		return Capacity{}, err
	}
	imgs, err := s.countImages(ctx)
	if err != nil {
		return Capacity{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c := Capacity{Used: s.used, Quota: s.quota, Blobs: s.blobs, Images: imgs, Unbounded: !bc.Known}
	if bc.Known {
		c.Total, c.Free = bc.Total, bc.Free
	}
	return c, nil
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
	if err := s.backend.WriteSettings(context.Background(), b); err != nil {
		return fmt.Errorf("blobstore: save quota: %w", err)
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

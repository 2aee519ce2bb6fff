// Package uploads is the store's host-writable boundary in one place: the
// upload dirs KVM hosts write backups into (allocation and expiry), the
// checks that confine a path a request names to those dirs (or to an
// allowed import root) and open it without following a swapped-in link,
// and the chunked upload sessions of upload:// imports.
//
// Everything under Root can be written by hosts at any time, so no check
// here trusts an earlier one: a path accepted by Confine is opened again
// through Open, which refuses to leave the root whatever the path holds by
// then.
package uploads

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"imagestore/internal/fsutil"
)

// DirPrefix starts the name of every upload dir: <Root>/u-<hex>, with its
// expiry in the sibling file u-<hex>.expires, which the uploader cannot
// touch from inside the dir.
const DirPrefix = "u-"

// Default timeouts of upload sessions.
const (
	// DefaultIdle fails an upload import when no chunk arrives for this long.
	DefaultIdle = 15 * time.Minute
	// DefaultChunkReadIdle bounds how long a chunk's body may stall between reads.
	DefaultChunkReadIdle = time.Minute
)

// Options configure the boundary.
type Options struct {
	// Root holds the upload dirs (<store>/uploads); created 0755 if missing.
	Root string
	// AllowedRoots are directories besides Root that imports may read.
	AllowedRoots []string
	// Expiry is an upload dir's lifetime when its request names none.
	Expiry time.Duration
	// ReleasedTarget reports whether path (an absolute, clean path) names,
	// by its base name, a file the agent made itself outside the upload
	// dirs and lets imports read (a released NBD target, linked into a
	// workspace by LinkInto), and returns that file's path. nil: there
	// are none.
	ReleasedTarget func(path string) (string, bool)
	// MaxChunk is the largest upload chunk a client may send (reported in
	// every chunk reply).
	MaxChunk int64
	// Idle fails an upload session that receives no chunk for this long
	// (default DefaultIdle); ChunkReadIdle cuts a chunk whose body stalls
	// this long between reads (default DefaultChunkReadIdle).
	Idle, ChunkReadIdle time.Duration
	Logger              *slog.Logger
}

// Uploads is the boundary of one store.
type Uploads struct {
	opts Options
	log  *slog.Logger

	mu       sync.Mutex
	sessions map[string]*session // by taskuuid
}

// New creates Root if needed and returns the boundary over it.
func New(opts Options) (*Uploads, error) {
	if opts.Root == "" {
		return nil, errors.New("uploads: no root")
	}
	if opts.Idle <= 0 {
		opts.Idle = DefaultIdle
	}
	if opts.ChunkReadIdle <= 0 {
		opts.ChunkReadIdle = DefaultChunkReadIdle
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Root, 0o755); err != nil {
		return nil, err
	}
	return &Uploads{opts: opts, log: log, sessions: map[string]*session{}}, nil
}

// Root is the directory holding the upload dirs.
func (u *Uploads) Root() string { return u.opts.Root }

// ChunkReadIdle is how long a chunk's body may stall between reads.
func (u *Uploads) ChunkReadIdle() time.Duration { return u.opts.ChunkReadIdle }

// Dir is an allocated upload dir.
type Dir struct {
	Path    string
	Expires time.Time // whole seconds, UTC
}

// Alloc makes a fresh upload dir that CleanExpired removes after ttl
// (0: Options.Expiry). The expiry file is written first, so a dir never
// exists without one.
func (u *Uploads) Alloc(ttl time.Duration) (Dir, error) {
	if ttl <= 0 {
		ttl = u.opts.Expiry
	}
	dir := filepath.Join(u.opts.Root, DirPrefix+randomHex(16))
	exp := time.Now().Add(ttl).UTC().Truncate(time.Second)
	if err := fsutil.WriteFile(dir+".expires", []byte(exp.Format(time.RFC3339)), 0o600); err != nil {
		return Dir{}, fmt.Errorf("allocating upload dir: %w", err)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		_ = os.Remove(dir + ".expires")
		return Dir{}, fmt.Errorf("allocating upload dir: %w", err)
	}
	u.log.Info("upload dir allocated", "dir", dir, "expires", exp)
	return Dir{Path: dir, Expires: exp}, nil
}

// Expiry reads the expiry recorded for upload dir dir.
func (u *Uploads) Expiry(dir string) (time.Time, error) {
	b, err := os.ReadFile(dir + ".expires")
	if err != nil {
		return time.Time{}, err
	}
	return time.Parse(time.RFC3339, strings.TrimSpace(string(b)))
}

// CleanExpired removes the upload dirs whose expiry is before now and
// returns how many it removed. A dir without a readable expiry lives
// Options.Expiry from its modification time.
func (u *Uploads) CleanExpired(now time.Time) (int, error) {
	ents, err := os.ReadDir(u.opts.Root)
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, e := range ents {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, DirPrefix) {
			continue
		}
		dir := filepath.Join(u.opts.Root, name)
		exp, err := u.Expiry(dir)
		if err != nil {
			fi, serr := e.Info()
			if serr != nil {
				continue
			}
			exp = fi.ModTime().Add(u.opts.Expiry)
		}
		if now.Before(exp) {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		_ = os.Remove(dir + ".expires")
		n++
	}
	return n, errors.Join(errs...)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

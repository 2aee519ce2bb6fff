package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/internal/fsutil"
)

// pushCache remembers, per source file, the layer its last push made, so
// that a push of the same unchanged file with the same options asks the
// store for that layer (a mount) before reading the file, and sends nothing
// when the store has it. One JSON file per (file, options) under
// <state dir>/layers, written atomically.
//
// A file counts as unchanged when its device, inode, size, mtime and ctime
// are those it had when the push began. ctime cannot be set from user
// space, so a write since then shows; to leave no window inside one tick
// of the file system's clock, a push records its layer only when the file
// had not changed for pushCacheSettle before the push looked at it.
type pushCache struct{ dir string }

const pushCacheSettle = 2 * time.Second

// fileID is what identifies a file's content for the cache.
type fileID struct {
	Dev     uint64 `json:"dev"`
	Ino     uint64 `json:"ino"`
	Size    int64  `json:"size"`
	MtimeNs int64  `json:"mtimeNs"`
	CtimeNs int64  `json:"ctimeNs"`
}

// statID is f's identity now, and the time it was taken.
func statID(f *os.File) (fileID, time.Time, error) {
	now := time.Now()
	st, err := f.Stat()
	if err != nil {
		return fileID{}, now, err
	}
	id, ok := fileIDOf(st)
	if !ok {
		return fileID{}, now, errors.New("no stat_t")
	}
	return id, now, nil
}

// fileIDOf is the identity st describes.
func fileIDOf(st os.FileInfo) (fileID, bool) {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, false
	}
	return fileID{Dev: uint64(sys.Dev), Ino: sys.Ino, Size: st.Size(), MtimeNs: st.ModTime().UnixNano(),
		CtimeNs: time.Unix(sys.Ctim.Unix()).UnixNano()}, true
}

// settled reports whether a file with identity id, stat'ed at at, had
// not changed for pushCacheSettle: a later write changes its ctime.
func (id fileID) settled(at time.Time) bool {
	return id.CtimeNs < at.Add(-pushCacheSettle).UnixNano() && id.MtimeNs < at.Add(-pushCacheSettle).UnixNano()
}

// pushCacheKey is what, besides the file's content, decides the layer.
type pushCacheKey struct {
	Path     string `json:"path"`     // canonical
	Backing  string `json:"backing"`  // the parent's backing name, "" for a base
	Compress bool   `json:"compress"` // -compress
}

type pushCacheEntry struct {
	pushCacheKey
	File   fileID        `json:"file"`
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
}

func (c pushCache) file(k pushCacheKey) string {
	b, _ := json.Marshal(k)
	sum := sha256.Sum256(b)
	return filepath.Join(c.dir, "layers", hex.EncodeToString(sum[:])+".json")
}

// get returns the layer recorded for k if the file is still id.
func (c pushCache) get(k pushCacheKey, id fileID) (digest.Digest, int64, bool) {
	b, err := os.ReadFile(c.file(k))
	if err != nil {
		return "", 0, false
	}
	var e pushCacheEntry
	if json.Unmarshal(b, &e) != nil || e.pushCacheKey != k || e.File != id || e.Digest.Validate() != nil || e.Size <= 0 {
		return "", 0, false
	}
	return e.Digest, e.Size, true
}

// put records the layer a push of the file with identity id (stat'ed at
// at, before it was read) made; nothing when the file had changed too
// recently to tell a later write apart.
func (c pushCache) put(k pushCacheKey, id fileID, at time.Time, d digest.Digest, size int64) error {
	p := c.file(k)
	if !id.settled(at) {
		os.Remove(p) // an older entry no longer says anything
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("push cache: %w", err)
	}
	b, err := json.Marshal(pushCacheEntry{pushCacheKey: k, File: id, Digest: d, Size: size})
	if err != nil {
		return err
	}
	if err := fsutil.WriteFile(p, b, 0o600); err != nil {
		return fmt.Errorf("push cache: %w", err)
	}
	return nil
}

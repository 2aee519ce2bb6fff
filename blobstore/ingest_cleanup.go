package blobstore

import (
	"imagestore/internal/fsutil"

	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// cleanIngests removes ingests idle for longer than IngestExpiry that no
// Writer holds. At Open (no Writer of ours can exist yet) it also removes
// directories without a data file: leftovers of a commit or of a Writer
// killed before it created its file. It returns how many it removed and
// their bytes.
func (s *Store) cleanIngests(ctx context.Context, atOpen bool) (int, int64, error) {
	base := filepath.Join(s.root, dirIngest)
	ents, err := os.ReadDir(base)
	if err != nil {
		return 0, 0, fmt.Errorf("blobstore: list ingests: %w", err)
	}
	removed, freed := 0, int64(0)
	now := time.Now()
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return removed, freed, err
		}
		dir := filepath.Join(base, e.Name())
		_, serr := os.Lstat(filepath.Join(dir, ingestData))
		orphan := atOpen && errors.Is(serr, fs.ErrNotExist)
		if !orphan && now.Sub(lastActivity(dir)) < s.opts.IngestExpiry {
			continue
		}
		f, err := os.OpenFile(filepath.Join(dir, ingestData), os.O_RDWR, 0)
		var size int64
		if err == nil {
			if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
				f.Close() // a Writer has it: not abandoned
				continue
			}
			if fi, err := f.Stat(); err == nil {
				size = fi.Size()
			}
		}
		// Remove while holding the lock, so a Writer opening now either
		// sees the directory gone or notices its file was unlinked.
		rerr := os.RemoveAll(dir)
		if f != nil {
			f.Close()
		}
		if rerr != nil {
			return removed, freed, fmt.Errorf("blobstore: remove expired ingest: %w", rerr)
		}
		s.log.Info("removed abandoned ingest", "ref", e.Name(), "bytes", size)
		removed++
		freed += size
	}
	if removed > 0 {
		_ = fsutil.SyncDir(base)
	}
	return removed, freed, nil
}

func lastActivity(dir string) time.Time {
	var t time.Time
	for _, p := range []string{dir, filepath.Join(dir, ingestData), filepath.Join(dir, ingestStateFile)} {
		if fi, err := os.Stat(p); err == nil && fi.ModTime().After(t) {
			t = fi.ModTime()
		}
	}
	return t
}

func (s *Store) ingestBytes() int64 {
	var n int64
	ents, _ := os.ReadDir(filepath.Join(s.root, dirIngest))
	for _, e := range ents {
		if fi, err := os.Stat(filepath.Join(s.root, dirIngest, e.Name(), ingestData)); err == nil {
			n += fi.Size()
		}
	}
	return n
}

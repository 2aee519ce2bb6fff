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

// SweepIngests implements Backend: it removes ingests idle since before
// idleSince that no Ingest holds (flock on data, across processes too).
func (l *Local) SweepIngests(ctx context.Context, idleSince time.Time) (int, int64, error) {
	return l.sweepIngests(ctx, idleSince, false)
}

// removeOrphanIngests removes ingest directories without a data file:
// leftovers of a commit or of an Ingest killed before it created its file.
// Only NewLocal calls it, when no Ingest of ours can exist yet.
func (l *Local) removeOrphanIngests() error {
	_, _, err := l.sweepIngests(context.Background(), time.Time{}, true)
	return err
}

func (l *Local) sweepIngests(ctx context.Context, idleSince time.Time, orphans bool) (int, int64, error) {
	base := filepath.Join(l.root, dirIngest)
	ents, err := os.ReadDir(base)
	if err != nil {
		return 0, 0, fmt.Errorf("blobstore: list ingests: %w", err)
	}
	removed, freed := 0, int64(0)
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return removed, freed, err
		}
		dir := filepath.Join(base, e.Name())
		_, serr := os.Lstat(filepath.Join(dir, ingestData))
		orphan := orphans && errors.Is(serr, fs.ErrNotExist)
		if !orphan && !lastActivity(dir).Before(idleSince) {
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
		l.log.Info("removed abandoned ingest", "ref", e.Name(), "bytes", size)
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

// IngestBytes implements Backend: the sizes of the ingests' data files.
func (l *Local) IngestBytes(ctx context.Context) (int64, error) {
	var n int64
	ents, err := os.ReadDir(filepath.Join(l.root, dirIngest))
	if err != nil {
		return 0, fmt.Errorf("blobstore: list ingests: %w", err)
	}
	for _, e := range ents {
		if fi, err := os.Stat(filepath.Join(l.root, dirIngest, e.Name(), ingestData)); err == nil {
			n += fi.Size()
		}
	}
	return n, nil
}

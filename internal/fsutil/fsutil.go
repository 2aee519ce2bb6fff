// Package fsutil holds the one way the module replaces a file on disk so a
// crash leaves either the old or the new content, never a torn one.
package fsutil

import (
	"errors"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// WriteFile writes data to path atomically with mode perm; see WriteFunc.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	_, err := WriteFunc(path, perm, func(w io.Writer) (int64, error) {
		n, err := w.Write(data)
		return int64(n), err
	})
	return err
}

// WriteFunc replaces path with what fill writes: a temp file
// ".<base>.tmp-*" in the same directory, fsync, close, chmod perm, rename
// over path, fsync of the directory. On any error the temp file is removed
// and path is untouched (or, if only the directory sync failed, already
// replaced: the error says so).
func WriteFunc(path string, perm os.FileMode, fill func(io.Writer) (int64, error)) (int64, error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return 0, err
	}
	tmp := f.Name()
	renamed := false
	defer func() {
		if !renamed {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	n, err := fill(f)
	if err != nil {
		return n, err
	}
	if err := f.Chmod(perm); err != nil {
		return n, err
	}
	if err := f.Sync(); err != nil {
		return n, err
	}
	if err := f.Close(); err != nil {
		return n, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return n, err
	}
	renamed = true
	return n, SyncDir(dir)
}

// SyncDir fsyncs a directory so a rename or create in it is durable.
// Filesystems that cannot sync a directory (EINVAL) are not an error.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, unix.EINVAL) {
		return err
	}
	return nil
}

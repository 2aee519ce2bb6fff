package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"

	"imagestore/internal/fsutil"
)

// writePIDFile records this process's pid in path (atomically). serve
// calls it only once both ports listen: a second daemon that cannot bind
// never overwrites the running one's pid, and an init script waiting for
// the file knows the daemon is up.
func writePIDFile(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("pidFile: %w", err)
	}
	if err := fsutil.WriteFile(path, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return fmt.Errorf("pidFile: %w", err)
	}
	return nil
}

// removePIDFile removes path if it still holds this process's pid (another
// daemon may have written it since).
func removePIDFile(path string, logger *slog.Logger) {
	b, err := os.ReadFile(path)
	if err != nil || string(bytes.TrimSpace(b)) != strconv.Itoa(os.Getpid()) {
		return
	}
	if err := os.Remove(path); err != nil {
		logger.Warn("removing the pid file", "path", path, "err", err)
	}
}

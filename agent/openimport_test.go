package agent

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A host can write the upload dirs, so a path component may become a
// symlink after confineImportPath accepted it: openImportPath must still
// refuse to leave the upload root.
func TestOpenImportPathRefusesSwappedSymlink(t *testing.T) {
	a, _ := newHTAgent(t, nil)
	up := filepath.Join(a.uploadRoot, "u1")
	if err := os.MkdirAll(filepath.Join(up, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	inside := filepath.Join(up, "sub", "disk.raw")
	if err := os.WriteFile(inside, []byte("inside"), 0o644); err != nil {
		t.Fatal(err)
	}
	path, err := a.confineImportPath("file://" + inside)
	if err != nil {
		t.Fatalf("confine: %v", err)
	}
	f, err := a.openImportPath(path)
	if err != nil {
		t.Fatalf("open before swap: %v", err)
	}
	f.Close()

	// Swap "sub" for a symlink to a directory outside the store.
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "disk.raw"), []byte("secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(up, "sub")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(up, "sub")); err != nil {
		t.Fatal(err)
	}
	if f, err := a.openImportPath(path); err == nil {
		b := make([]byte, 16)
		n, _ := f.Read(b)
		f.Close()
		t.Fatalf("opened %q through a swapped symlink (read %q)", path, b[:n])
	}

	// A symlink that stays inside the upload root is still fine.
	if err := os.Remove(filepath.Join(up, "sub")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(up, "real"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(up, "real", "disk.raw"), []byte("inside2"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("real", filepath.Join(up, "sub")); err != nil {
		t.Fatal(err)
	}
	f, err = a.openImportPath(path)
	if err != nil {
		t.Fatalf("open through an inside symlink: %v", err)
	}
	f.Close()

	// Directories and paths outside every root are refused with a clear error.
	if _, err := a.openImportPath(up); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("directory: got %v", err)
	}
	if _, err := a.openImportPath("/etc/passwd"); err == nil || !strings.Contains(err.Error(), "escapes the upload dirs") {
		t.Fatalf("outside path: got %v", err)
	}
}

// A FIFO swapped in by the host must be refused, not block the open.
func TestOpenImportPathRefusesFIFO(t *testing.T) {
	a, _ := newHTAgent(t, nil)
	up := filepath.Join(a.uploadRoot, "u2")
	if err := os.MkdirAll(up, 0o755); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(up, "disk.raw")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		f, err := a.openImportPath(fifo)
		if err == nil {
			f.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("FIFO: got %v, want 'not a regular file'", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("opening a FIFO blocked")
	}
}

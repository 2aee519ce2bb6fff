package uploads

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func newTestUploads(t *testing.T) *Uploads {
	t.Helper()
	u, err := New(Options{Root: filepath.Join(t.TempDir(), "uploads"), Expiry: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// A host can write the upload dirs, so a path component may become a
// symlink after Confine accepted it: Open must still refuse to leave the
// upload root.
func TestOpenImportPathRefusesSwappedSymlink(t *testing.T) {
	a := newTestUploads(t)
	up := filepath.Join(a.Root(), DirPrefix+"01")
	if err := os.MkdirAll(filepath.Join(up, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	inside := filepath.Join(up, "sub", "disk.raw")
	if err := os.WriteFile(inside, []byte("inside"), 0o644); err != nil {
		t.Fatal(err)
	}
	path, err := a.Confine("file://" + inside)
	if err != nil {
		t.Fatalf("confine: %v", err)
	}
	f, err := a.Open(path)
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
	if f, err := a.Open(path); err == nil {
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
	f, err = a.Open(path)
	if err != nil {
		t.Fatalf("open through an inside symlink: %v", err)
	}
	f.Close()

	// Directories and paths outside every root are refused with a clear error.
	if _, err := a.Open(filepath.Join(up, "real")); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("directory: got %v", err)
	}
	if _, err := a.Open("/etc/passwd"); err == nil || !strings.Contains(err.Error(), "escapes the upload dirs") {
		t.Fatalf("outside path: got %v", err)
	}
}

// A FIFO swapped in by the host must be refused, not block the open.
func TestOpenImportPathRefusesFIFO(t *testing.T) {
	a := newTestUploads(t)
	up := filepath.Join(a.Root(), DirPrefix+"02")
	if err := os.MkdirAll(up, 0o755); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(up, "disk.raw")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		f, err := a.Open(fifo)
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

func TestConfine(t *testing.T) {
	base, err := filepath.EvalSymlinks(t.TempDir()) // Confine returns resolved paths
	if err != nil {
		t.Fatal(err)
	}
	allowed := filepath.Join(base, "allowed")
	outside := filepath.Join(base, "outside")
	released := filepath.Join(base, "targets", "t.qcow2")
	for _, d := range []string{allowed, outside, filepath.Dir(released)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	u, err := New(Options{
		Root: filepath.Join(base, "uploads"), AllowedRoots: []string{allowed},
		// Released targets are found by base name (the agent's hook maps
		// a name in an upload dir to its private file).
		ReleasedTarget: func(p string) (string, bool) {
			return released, filepath.Base(p) == filepath.Base(released)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	dir, err := u.Alloc(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	write := func(p string) string {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	inUpload := write(filepath.Join(dir.Path, "disk.qcow2"))
	inAllowed := write(filepath.Join(allowed, "disk.raw"))
	secret := write(filepath.Join(outside, "secret"))
	write(released)
	if err := os.Mkdir(filepath.Join(dir.Path, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(dir.Path, "link")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ in, want, err string }{
		{inUpload, inUpload, ""},
		{"file://" + inUpload, inUpload, ""},
		{"file://" + inAllowed, inAllowed, ""},
		{filepath.Join(dir.Path, "t.qcow2"), released, ""}, // no such entry: the private file
		{"file://" + filepath.Join(dir.Path, "sub", "t.qcow2"), released, ""},
		{released, "", "escapes the upload dirs"},                          // named directly: outside
		{filepath.Join(outside, "t.qcow2"), "", "escapes the upload dirs"}, // a target's name outside
		{"http://h/x", "", "scheme http is not supported by import-backup"},
		{"disk.qcow2", "", "not an absolute path"},
		{dir.Path + "/../../outside/secret", "", "escapes the upload dirs"},
		{filepath.Join(dir.Path, "link"), "", "escapes the upload dirs"},
		{dir.Path, "", "escapes the upload dirs"},
		{filepath.Join(dir.Path, "sub"), "", "not a regular file"},
		// The agent's bookkeeping beside the upload dirs is not importable.
		{dir.Path + ".expires", "", "escapes the upload dirs"},
		{write(filepath.Join(u.Root(), "stray")), "", "escapes the upload dirs"},
		// A hard link to a file outside (ln /etc/shadow <dir>/s) is refused
		// on the opened file.
		{hardLink(t, secret, filepath.Join(dir.Path, "s")), "", "hard links"},
		{filepath.Join(dir.Path, "missing"), "", "no such file"},
	} {
		got, err := u.Confine(tc.in)
		if err == nil && tc.err != "" {
			// Confine names a path; Open checks the opened file.
			var f *os.File
			if f, err = u.Open(got); err == nil {
				f.Close()
			}
		}
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Confine(%q) = %q, %v; want error %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("Confine(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
		f, err := u.Open(got)
		if err != nil {
			t.Errorf("Open(%q): %v", got, err)
			continue
		}
		f.Close()
	}
}

func hardLink(t *testing.T, target, link string) string {
	t.Helper()
	if err := os.Link(target, link); err != nil {
		t.Fatal(err)
	}
	return link
}

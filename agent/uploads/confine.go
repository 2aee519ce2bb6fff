package uploads

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// importRoots are the directories file imports may read from.
func (u *Uploads) importRoots() []string {
	roots := []string{u.opts.Root}
	roots = append(roots, u.opts.AllowedRoots...)
	return roots
}

func (u *Uploads) releasedTarget(path string) (string, bool) {
	if u.opts.ReleasedTarget == nil {
		return "", false
	}
	return u.opts.ReleasedTarget(path)
}

// Confine resolves imgurl (an absolute path or file://path) and checks,
// after resolving symlinks, that it is a regular file inside an upload dir
// or an allowed import root. A path inside those whose name is a released
// target's (see Options.ReleasedTarget) resolves to that target instead,
// whatever the entry there holds. The path it returns is only a name:
// read it through Open.
func (u *Uploads) Confine(imgurl string) (string, error) {
	p := imgurl
	if rest, ok := strings.CutPrefix(imgurl, "file://"); ok {
		p = rest
	} else if i := strings.Index(imgurl, "://"); i > 0 {
		return "", fmt.Errorf("imgurl %q: scheme %s is not supported by import-backup (a file in an upload dir or file://path); URL downloads are the import/ command", imgurl, imgurl[:i])
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("imgurl %q: not an absolute path", imgurl)
	}
	// Check the lexical path first (so ../ tricks are named as such), then
	// the path with symlinks resolved (so a link cannot lead outside).
	if u.confinedRoot(filepath.Clean(p), false) == "" {
		return "", fmt.Errorf("imgurl %q escapes the upload dirs (%s) and the allowed import roots", imgurl, u.opts.Root)
	}
	if t, ok := u.releasedTarget(filepath.Clean(p)); ok {
		return t, nil
	}
	real, err := filepath.EvalSymlinks(filepath.Clean(p))
	if err != nil {
		return "", fmt.Errorf("imgurl %q: %w", imgurl, err)
	}
	if u.confinedRoot(real, true) != "" {
		fi, err := os.Stat(real)
		if err != nil {
			return "", fmt.Errorf("imgurl %q: %w", imgurl, err)
		}
		if !fi.Mode().IsRegular() {
			return "", fmt.Errorf("imgurl %q: not a regular file", imgurl)
		}
		return real, nil
	}
	return "", fmt.Errorf("imgurl %q escapes the upload dirs (%s) and the allowed import roots", imgurl, u.opts.Root)
}

// Open opens a path Confine accepted. A host can write the upload dirs,
// so it could swap a path component for a symlink between the check and
// the open: the open goes through os.Root, which refuses to leave the
// import root whatever the path holds by then.
func (u *Uploads) Open(path string) (*os.File, error) {
	if t, ok := u.releasedTarget(path); ok && t == path {
		// Released targets live where hosts cannot reach (the entry in
		// the workspace is our own hard link to them).
		return openRegular(t, false, func(p string) (*os.File, error) {
			return os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
		})
	}
	for _, root := range u.importRoots() {
		rr, err := filepath.EvalSymlinks(root)
		if err != nil {
			continue
		}
		if !inside(rr, path) {
			continue
		}
		if root == u.opts.Root {
			// Only inside an upload dir proper: the os.Root is that dir.
			first, ok := uploadDirOf(rr, path)
			if !ok || !inUploadDir(rr, path) {
				return nil, fmt.Errorf("%s is not inside an upload dir (%s/%s<hex>/)", path, u.opts.Root, DirPrefix)
			}
			rr = filepath.Join(rr, first)
		}
		rel, _ := filepath.Rel(rr, path)
		r, err := os.OpenRoot(rr)
		if err != nil {
			return nil, err
		}
		defer r.Close()
		// O_NONBLOCK: a FIFO swapped in by the host must not hang the open;
		// openRegular then refuses it.
		return openRegular(rel, true, func(name string) (*os.File, error) {
			return r.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOCTTY, 0)
		})
	}
	return nil, fmt.Errorf("%s escapes the upload dirs (%s) and the allowed import roots", path, u.opts.Root)
}

// openRegular opens name with open and refuses anything but a regular file
// (with singleLink, one whose link count is 1).
func openRegular(name string, singleLink bool, open func(string) (*os.File, error)) (*os.File, error) {
	f, err := open(name)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file", name)
	}
	// A hard link is the same file under another name (ln /etc/shadow
	// <uploadDir>/s): the symlink defences cannot see it, the link count
	// of the opened file can.
	if st, ok := fi.Sys().(*syscall.Stat_t); singleLink && (!ok || st.Nlink != 1) {
		f.Close()
		n := uint64(0)
		if ok {
			n = uint64(st.Nlink)
		}
		return nil, fmt.Errorf("%s: has %d hard links; only a file with exactly one is imported", name, n)
	}
	return f, nil
}

// confinedRoot returns the import root p lies strictly inside, or "".
func (u *Uploads) confinedRoot(p string, resolve bool) string {
	for _, root := range u.importRoots() {
		rr := filepath.Clean(root)
		if resolve {
			var err error
			if rr, err = filepath.EvalSymlinks(root); err != nil {
				continue
			}
		}
		if inside(rr, p) && (root != u.opts.Root || inUploadDir(rr, p)) {
			return root
		}
	}
	return ""
}

// inUploadDir reports whether p (inside root, the uploads root) lies inside
// one of its allocated upload dirs: the first component is a u-<hex>
// directory. The rest of the uploads root (the u-<hex>.expires bookkeeping,
// anything else) is the agent's, never a host's file to import.
func inUploadDir(root, p string) bool {
	first, ok := uploadDirOf(root, p)
	if !ok {
		return false
	}
	fi, err := os.Lstat(filepath.Join(root, first))
	return err == nil && fi.IsDir() && inside(filepath.Join(root, first), p)
}

// uploadDirOf names the first component of p below root if it has the
// upload dir form u-<hex>.
func uploadDirOf(root, p string) (string, bool) {
	rel, err := filepath.Rel(root, p)
	if err != nil {
		return "", false
	}
	first, _, _ := strings.Cut(rel, string(filepath.Separator))
	hex, ok := strings.CutPrefix(first, DirPrefix)
	if !ok || hex == "" || strings.Trim(hex, "0123456789abcdef") != "" {
		return "", false
	}
	return first, true
}

// inside reports whether p lies strictly inside dir.
func inside(dir, p string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator))
}

// ConfineWorkspace resolves ws (after symlinks) and checks it is a
// directory inside an upload dir; it returns it and that upload dir.
func (u *Uploads) ConfineWorkspace(ws string) (dir, uploadDir string, err error) {
	if !filepath.IsAbs(ws) {
		return "", "", fmt.Errorf("workspace %q: not an absolute path", ws)
	}
	real, err := filepath.EvalSymlinks(filepath.Clean(ws))
	if err != nil {
		return "", "", fmt.Errorf("workspace %q: %w", ws, err)
	}
	root, err := filepath.EvalSymlinks(u.opts.Root)
	if err != nil {
		return "", "", err
	}
	if !inside(root, real) {
		return "", "", fmt.Errorf("workspace %q is not inside an upload dir (%s/%s*; allocate one with allocuploaddir)", ws, u.opts.Root, DirPrefix)
	}
	rel, _ := filepath.Rel(root, real)
	first, _, _ := strings.Cut(rel, string(filepath.Separator))
	if !strings.HasPrefix(first, DirPrefix) {
		return "", "", fmt.Errorf("workspace %q is not inside an upload dir (%s/%s*)", ws, u.opts.Root, DirPrefix)
	}
	if fi, err := os.Stat(real); err != nil {
		return "", "", fmt.Errorf("workspace %q: %w", ws, err)
	} else if !fi.IsDir() {
		return "", "", fmt.Errorf("workspace %q is not a directory", ws)
	}
	return real, filepath.Join(root, first), nil
}

// openWorkspace opens workspace ws (see ConfineWorkspace) through os.Root
// over the uploads root, so a workspace a host swapped for a symlink
// cannot lead outside the upload dirs.
func (u *Uploads) openWorkspace(ws string) (*os.Root, *os.File, error) {
	dir, _, err := u.ConfineWorkspace(ws)
	if err != nil {
		return nil, nil, err
	}
	root, err := filepath.EvalSymlinks(u.opts.Root)
	if err != nil {
		return nil, nil, err
	}
	rel, err := filepath.Rel(root, dir)
	if err != nil {
		return nil, nil, err
	}
	r, err := os.OpenRoot(root)
	if err != nil {
		return nil, nil, err
	}
	d, err := r.OpenFile(rel, os.O_RDONLY|syscall.O_DIRECTORY, 0)
	if err != nil {
		r.Close()
		return nil, nil, fmt.Errorf("workspace %q: %w", ws, err)
	}
	return r, d, nil
}

// LinkInto hard-links src, a file the agent made where hosts cannot
// reach, into workspace ws (a directory inside an upload dir) under src's
// base name, and returns that path (ws as given, joined with the name).
// The link is made relative to the opened workspace (see openWorkspace),
// and an existing entry of that name is an error, never replaced. What
// the agent later reads is src itself, never the workspace entry, so a
// host replacing the entry changes nothing the agent trusts.
func (u *Uploads) LinkInto(ws, src string) (string, error) {
	r, d, err := u.openWorkspace(ws)
	if err != nil {
		return "", err
	}
	defer r.Close()
	defer d.Close()
	name := filepath.Base(src)
	if err := unix.Linkat(unix.AT_FDCWD, src, int(d.Fd()), name, 0); err != nil {
		return "", fmt.Errorf("linking %s into workspace %s: %w", name, ws, err)
	}
	return filepath.Join(ws, name), nil
}

// RemoveLink removes an entry LinkInto made (path = workspace/name); an
// entry already gone is not an error.
func (u *Uploads) RemoveLink(path string) error {
	r, d, err := u.openWorkspace(filepath.Dir(path))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	defer r.Close()
	defer d.Close()
	if err := unix.Unlinkat(int(d.Fd()), filepath.Base(path), 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing %s: %w", path, err)
	}
	return nil
}

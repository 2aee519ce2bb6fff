package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/api"
	"imagestore/blobstore"
	"imagestore/internal/fsutil"
	"imagestore/transfer/oci"
)

// addResult is add's last stdout line.
type addResult struct {
	Name        string `json:"name"`
	ID          string `json:"id"`
	VirtualSize int64  `json:"virtualsize"`
	Size        int64  `json:"size"`
}

// cmdAdd registers FILE in the host-local index under a new name:id and
// prints it; a following push of the same file records exactly that
// name:id. The file is normalized once (nothing written) to learn the
// layer's size and digest, which push then sends.
func cmdAdd(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("add")
	file := fs.String("file", "", "the volume or image file (qcow2 or raw)")
	desc := fs.String("desc", "", "description stored with the image")
	name := fs.String("name", "", "image name (default: -imageUuid, else one derived from the file's path)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 1 && *file == "" {
		*file = pos[0]
	} else if len(pos) != 0 {
		return usageErr("add [-desc D] -file FILE")
	}
	if *file == "" {
		return usageErr("add: -file is required")
	}
	abs, err := canonicalPath(*file)
	if err != nil {
		return err
	}
	ref := blobstore.Ref{Name: *name, ID: newID(16)}
	if ref.Name == "" {
		ref.Name = g.imageUUID
	}
	if ref.Name == "" {
		sum := sha256.Sum256([]byte(abs))
		ref.Name = hex.EncodeToString(sum[:16])
	}
	if err := ref.Validate(); err != nil {
		return usageErr("%v", err)
	}
	at := time.Now()
	st, err := os.Stat(abs)
	if err != nil {
		return err
	}
	var e indexEntry
	if in, ok := pulledAs(abs, st); ok && *name == "" && g.imageUUID == "" {
		// A file this host pulled and has not changed since: it is that
		// image already, and push has nothing to send.
		e = indexEntry{Path: abs, Ref: blobstore.Ref{Name: in.Name, ID: in.ID}, Size: in.Size,
			VirtualSize: in.VirtualSize, Created: in.Created, Desc: in.Desc, Pulled: true}
	} else {
		m, err := measureFile(ctx, abs)
		if err != nil {
			return err
		}
		e = indexEntry{
			Path: abs, Ref: ref, Blobsum: m.digest, Size: m.size, VirtualSize: m.virtualSize,
			Created: time.Now().UTC().Truncate(time.Second), Desc: *desc,
		}
	}
	ref = e.Ref
	e.setIdentity(st)
	if id, ok := fileIDOf(st); ok && id.settled(at) {
		// push may mount the measured layer only for a file whose
		// identity would show any write since (see pushCache).
		e.File = &id
	}
	ix := hostIndex{dir: g.stateDir}
	if err := ix.put(e); err != nil {
		return err
	}
	ix.prune(30 * 24 * time.Hour)
	b, err := json.Marshal(addResult{Name: ref.Name, ID: ref.ID, VirtualSize: e.VirtualSize, Size: e.Size})
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(g.stdout, "%s\n", b)
	return err
}

// canonicalPath is path made absolute with its symlinks resolved: the key
// add and push share.
func canonicalPath(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(abs)
}

// hostStateDir is where the host-local index lives:
// $IMAGESTORE_STATE_DIR, else /var/lib/imagestore-client for root, else
// the user's state directory.
func hostStateDir() string {
	if d := os.Getenv("IMAGESTORE_STATE_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/imagestore-client"
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "imagestore")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "imagestore-client")
	}
	return filepath.Join(home, ".local", "state", "imagestore")
}

// indexEntry is what add recorded about one file.
type indexEntry struct {
	Path string `json:"path"`
	blobstore.Ref
	Blobsum     digest.Digest `json:"blobsum"`
	Size        int64         `json:"size"`
	VirtualSize int64         `json:"virtualsize"`
	Created     time.Time     `json:"created"`
	Desc        string        `json:"desc,omitempty"`
	// Pulled: the file is the image it was pulled as (its .imf matched);
	// push only checks that the store still has it.
	Pulled bool `json:"pulled,omitempty"`

	// The file's identity when added: a later push of a changed file says so.
	Dev     uint64 `json:"dev"`
	Ino     uint64 `json:"ino"`
	Bytes   int64  `json:"bytes"`
	MtimeNs int64  `json:"mtimeNs"`
	// File is the identity push's mount of the measured layer needs
	// (with ctime), set when the file had settled before add looked.
	File *fileID `json:"file,omitempty"`
}

func (e *indexEntry) setIdentity(st os.FileInfo) {
	e.Bytes, e.MtimeNs = st.Size(), st.ModTime().UnixNano()
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		e.Dev, e.Ino = uint64(sys.Dev), sys.Ino
	}
}

// sameFile reports whether st is still the file add measured.
func (e indexEntry) sameFile(st os.FileInfo) bool {
	var now indexEntry
	now.setIdentity(st)
	return now.Dev == e.Dev && now.Ino == e.Ino && now.Bytes == e.Bytes && now.MtimeNs == e.MtimeNs
}

// hostIndex is the host-local index of added files: one JSON file per
// path, named by the path's hash, written atomically.
type hostIndex struct{ dir string }

func (x hostIndex) file(path string) string {
	sum := sha256.Sum256([]byte(path))
	return filepath.Join(x.dir, "index", hex.EncodeToString(sum[:])+".json")
}

func (x hostIndex) put(e indexEntry) error {
	p := x.file(e.Path)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("host index: %w", err)
	}
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFile(p, b, 0o600); err != nil {
		return fmt.Errorf("host index: %w", err)
	}
	return nil
}

// get returns the entry for path (canonical), ok false when there is none.
func (x hostIndex) get(path string) (indexEntry, bool, error) {
	b, err := os.ReadFile(x.file(path))
	if errors.Is(err, os.ErrNotExist) {
		return indexEntry{}, false, nil
	}
	if err != nil {
		return indexEntry{}, false, fmt.Errorf("host index: %w", err)
	}
	var e indexEntry
	if err := json.Unmarshal(b, &e); err != nil || e.Path != path || e.Validate() != nil {
		return indexEntry{}, false, fmt.Errorf("host index: entry for %s is damaged (remove %s)", path, x.file(path))
	}
	return e, true, nil
}

// prune removes entries older than age (best effort): the index does not
// grow without bound on a host that adds many files.
func (x hostIndex) prune(age time.Duration) {
	dir := filepath.Join(x.dir, "index")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, de := range ents {
		if info, err := de.Info(); err == nil && time.Since(info.ModTime()) > age {
			_ = os.Remove(filepath.Join(dir, de.Name()))
		}
	}
}

// pyStem is Python's os.path.splitext(p)[0]: p without the extension of
// its last element (a leading dot does not start an extension).
func pyStem(p string) string {
	base := filepath.Base(p)
	i := strings.LastIndex(base, ".")
	if i <= 0 || strings.Trim(base[:i], ".") == "" {
		return p
	}
	return p[:len(p)-len(base)+i]
}

// imfFile is the .imf beside a pulled file: the image's info and, our
// addition, the pulled file's size and mtime, so a later add of the
// unchanged file can reuse the identity (PROTOCOL.md note Z1).
type imfFile struct {
	api.ImageInfo
	Pulled *fileStamp `json:"pulled,omitempty"`
}

// fileStamp identifies a file's content cheaply: size and mtime.
type fileStamp struct {
	Bytes   int64 `json:"bytes"`
	MtimeNs int64 `json:"mtimeNs"`
}

func stampOf(st os.FileInfo) *fileStamp {
	return &fileStamp{Bytes: st.Size(), MtimeNs: st.ModTime().UnixNano()}
}

// writeImf writes <DST without extension>.imf and .imf2 beside a pulled
// image: the image's info, which the cloud's tools read (desc of a
// database backup) and keep beside cached images; .imf also says which
// file it describes.
func writeImf(dst string, in api.ImageInfo) error {
	st, err := os.Stat(dst)
	if err != nil {
		return err
	}
	stem := pyStem(dst)
	for _, v := range []struct {
		ext string
		doc any
	}{{".imf", imfFile{ImageInfo: in, Pulled: stampOf(st)}}, {".imf2", in}} {
		b, err := json.Marshal(v.doc)
		if err != nil {
			return err
		}
		if err := fsutil.WriteFile(stem+v.ext, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// pulledAs returns the image a file was pulled as, when the .imf beside it
// describes exactly this file (same size and mtime: unchanged since the pull).
func pulledAs(path string, st os.FileInfo) (api.ImageInfo, bool) {
	b, err := os.ReadFile(pyStem(path) + ".imf")
	if err != nil {
		return api.ImageInfo{}, false
	}
	var imf imfFile
	if json.Unmarshal(b, &imf) != nil || imf.Pulled == nil || *imf.Pulled != *stampOf(st) {
		return api.ImageInfo{}, false
	}
	if (blobstore.Ref{Name: imf.Name, ID: imf.ID}).Validate() != nil {
		return api.ImageInfo{}, false
	}
	return imf.ImageInfo, true
}

// parseImageArg reads name:id, or the zstore://name/id install path.
func parseImageArg(arg string) (blobstore.Ref, error) {
	if strings.HasPrefix(arg, "zstore://") {
		return blobstore.ParseInstallPath(arg)
	}
	return blobstore.ParseRef(arg)
}

// printJSONLine writes v as one line of JSON.
func (g *globals) printJSONLine(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(g.stdout, "%s\n", b)
	return err
}

// cmdList prints one image info per image name on the store (zstcli
// list): a bare JSON array.
func cmdList(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("list")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErr("list takes no arguments")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	names, err := c.Catalog(ctx)
	if err != nil {
		return err
	}
	out := []api.ImageInfo{}
	for _, name := range names {
		infos, err := listImages(ctx, c, name, 1)
		if err != nil {
			return err
		}
		out = append(out, infos...)
	}
	return g.printJSONLine(out)
}

// listImages returns the infos of name's images (at most limit; 0 = all);
// a missing repository is an empty list.
func listImages(ctx context.Context, c *oci.Client, name string, limit int) ([]api.ImageInfo, error) {
	tags, err := c.Tags(ctx, name)
	if err != nil && !errors.Is(err, oci.ErrNotFound) {
		return nil, err
	}
	out := []api.ImageInfo{}
	for _, id := range tags {
		ri, err := fetchImage(ctx, c, blobstore.Ref{Name: name, ID: id})
		if errors.Is(err, oci.ErrNotFound) {
			continue // deleted while listing
		}
		if err != nil {
			return nil, err
		}
		out = append(out, infoOf(ri.Top()))
		if limit > 0 && len(out) == limit {
			break
		}
	}
	return out, nil
}

// cmdDelete deletes one image record (imagestore delete name:id); an image
// other images are built on is refused by the store, which names them.
func cmdDelete(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("delete")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("delete name:id")
	}
	ref, err := parseImageArg(pos[0])
	if err != nil {
		return usageErr("%v", err)
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	if err := c.DeleteManifest(ctx, ref.Name, ref.ID); err != nil {
		return fmt.Errorf("delete %s: %w", ref, err)
	}
	res := struct {
		Name    string `json:"name"`
		ID      string `json:"id"`
		Deleted bool   `json:"deleted"`
	}{ref.Name, ref.ID, true}
	return g.printResult(res, func(w io.Writer) { fmt.Fprintf(w, "deleted %s\n", ref) })
}

package agent

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
)

// ImageInfo is the protocol's image info (blobstore.Info).
type ImageInfo = blobstore.Info

func imageInfo(img blobstore.Image) ImageInfo { return img.Info() }

// NewImage describes a blob to record as an image.
type NewImage struct {
	Ref         blobstore.Ref
	Blob        digest.Digest
	Parent      *blobstore.Image // nil for a base
	Size        int64
	VirtualSize int64
	Format      string
	Author      string
	Arch        string
	Desc        string
}

// recordImage turns a committed blob into an image record. Every import
// path ends here.
func (a *Agent) recordImage(ctx context.Context, n NewImage) (blobstore.Image, error) {
	img := blobstore.Image{
		Ref: n.Ref, Blob: n.Blob, Created: time.Now().UTC(),
		Author: n.Author, Arch: n.Arch, Desc: n.Desc,
		Size: n.Size, VirtualSize: n.VirtualSize, Format: n.Format,
	}
	if n.Parent != nil {
		img.Parent = n.Parent.Ref.String()
	}
	if err := a.store.PutImage(ctx, img); err != nil {
		return img, fmt.Errorf("recording image %s: %w", n.Ref, err)
	}
	a.log.Info("image recorded", "image", n.Ref.String(), "blob", n.Blob, "parent", img.Parent, "format", n.Format, "size", n.Size)
	return img, nil
}

type importBackupReq struct {
	ImgURL           string `json:"imgurl"`
	Name             string `json:"name"`
	Desc             string `json:"desc"`
	Parent           string `json:"parent"`
	InstallPath      string `json:"installPath"`
	ImageUUID        string `json:"imageuuid"`
	ProcessToRelease string `json:"processToRelease"`
}

func (q *importBackupReq) validate() error {
	if q.ImgURL == "" {
		return missing("imgurl")
	}
	if q.Name == "" && q.Parent == "" && q.InstallPath == "" {
		return missing("name")
	}
	return nil
}

type importReply struct {
	Capacity
	Name        string `json:"name"`
	ID          string `json:"id"`
	Blobsum     string `json:"blobsum"`
	Size        int64  `json:"size"`
	VirtualSize int64  `json:"virtualsize"`
	Format      string `json:"format"`
	InstallPath string `json:"installPath"`
}

// importBackup ingests a file a KVM host wrote into an upload dir (or an
// allowed file:// path). A qcow2 is normalised into a canonical layer on
// top of parent; anything else is stored as-is.
func (a *Agent) importBackup(w http.ResponseWriter, r *http.Request) {
	var req importBackupReq
	err := decode(r, &req)
	if err == nil && req.Name == databaseBackupName && hasMD5(req.Desc) {
		a.importDatabaseBackup(w, r, req)
		return
	}
	a.async(w, r, JobSpec{Kind: "import-backup", Backup: true, Err: err}, func(ctx context.Context, job *Job) (any, error) {
		if err := a.releaseProcess(req.ProcessToRelease); err != nil {
			return nil, err
		}
		parent, ref, err := a.parentAndRef(ctx, req.Parent, req.InstallPath, req.Name)
		if err != nil {
			return nil, err
		}
		job.SetImage(firstNonEmpty(req.ImageUUID, ref.Name), ref.InstallPath(), "")
		path, err := a.confineImportPath(req.ImgURL)
		if err != nil {
			return nil, err
		}
		img, err := a.importFile(ctx, job, path, ref, parent, req.Desc)
		if err != nil {
			return nil, err
		}
		return importReplyFor(img, a.capacity()), nil
	})
}

func importReplyFor(img blobstore.Image, c Capacity) importReply {
	return importReply{
		Capacity: c, Name: img.Name, ID: img.ID, Blobsum: img.Blob.String(),
		Size: img.Size, VirtualSize: img.VirtualSize, Format: img.Format, InstallPath: img.InstallPath(),
	}
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// parentAndRef resolves a request's optional parent ("name:id" or an
// install path; nil when empty) and picks the new image's ref on top of it.
func (a *Agent) parentAndRef(ctx context.Context, parent, installPath, name string) (*blobstore.Image, blobstore.Ref, error) {
	var p *blobstore.Image
	if parent != "" {
		img, err := a.lookupImage(ctx, "parent", parent)
		if err != nil {
			return nil, blobstore.Ref{}, err
		}
		p = &img
	}
	ref, err := a.newImageRef(installPath, name, p)
	return p, ref, err
}

// newImageRef picks the new image's name and id: the allocated installPath
// if given, else name (or the parent's name) with a random id.
func (a *Agent) newImageRef(installPath, name string, parent *blobstore.Image) (blobstore.Ref, error) {
	if installPath != "" {
		return parseImagePath("installPath", installPath)
	}
	if name == "" && parent != nil {
		name = parent.Name
	}
	ref := blobstore.Ref{Name: name, ID: randomHex(16)}
	if err := ref.Validate(); err != nil {
		return ref, fmt.Errorf("name: %w", err)
	}
	return ref, nil
}

// importRoots are the directories file imports may read from.
func (a *Agent) importRoots() []string {
	roots := []string{a.uploadRoot}
	roots = append(roots, a.cfg.AllowedImportRoots...)
	return roots
}

// confineImportPath resolves imgurl (an absolute path or file://path) and
// checks, after resolving symlinks, that it is a regular file inside an
// upload dir or an allowed import root.
func (a *Agent) confineImportPath(imgurl string) (string, error) {
	p := imgurl
	if rest, ok := strings.CutPrefix(imgurl, "file://"); ok {
		p = rest
	} else if i := strings.Index(imgurl, "://"); i > 0 {
		return "", fmt.Errorf("imgurl %q: scheme %s is not supported by import-backup (a file in an upload dir or file://path); URL downloads are the import/ command", imgurl, imgurl[:i])
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("imgurl %q: not an absolute path", imgurl)
	}
	if t, ok := a.nbdTargetPath(p); ok {
		return t, nil
	}
	// Check the lexical path first (so ../ tricks are named as such), then
	// the path with symlinks resolved (so a link cannot lead outside).
	if a.confinedRoot(filepath.Clean(p), false) == "" {
		return "", fmt.Errorf("imgurl %q escapes the upload dirs (%s) and the allowed import roots", imgurl, a.uploadRoot)
	}
	real, err := filepath.EvalSymlinks(filepath.Clean(p))
	if err != nil {
		return "", fmt.Errorf("imgurl %q: %w", imgurl, err)
	}
	if a.confinedRoot(real, true) != "" {
		fi, err := os.Stat(real)
		if err != nil {
			return "", fmt.Errorf("imgurl %q: %w", imgurl, err)
		}
		if !fi.Mode().IsRegular() {
			return "", fmt.Errorf("imgurl %q: not a regular file", imgurl)
		}
		return real, nil
	}
	return "", fmt.Errorf("imgurl %q escapes the upload dirs (%s) and the allowed import roots", imgurl, a.uploadRoot)
}

// openImportPath opens a path confineImportPath accepted. A host can write
// the upload dirs, so it could swap a path component for a symlink between
// the check and the open: the open goes through os.Root, which refuses to
// leave the import root whatever the path holds by then.
func (a *Agent) openImportPath(path string) (*os.File, error) {
	if t, ok := a.nbdTargetPath(path); ok {
		// Targets live in <root>/nbd/targets, which hosts cannot reach.
		return openRegular(t, func(p string) (*os.File, error) {
			return os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
		})
	}
	for _, root := range a.importRoots() {
		rr, err := filepath.EvalSymlinks(root)
		if err != nil {
			continue
		}
		rel, err := filepath.Rel(rr, path)
		if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			continue
		}
		r, err := os.OpenRoot(rr)
		if err != nil {
			return nil, err
		}
		defer r.Close()
		// O_NONBLOCK: a FIFO swapped in by the host must not hang the open;
		// openRegular then refuses it.
		return openRegular(rel, func(name string) (*os.File, error) {
			return r.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOCTTY, 0)
		})
	}
	return nil, fmt.Errorf("%s escapes the upload dirs (%s) and the allowed import roots", path, a.uploadRoot)
}

// openRegular opens name with open and refuses anything but a regular file.
func openRegular(name string, open func(string) (*os.File, error)) (*os.File, error) {
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
	return f, nil
}

// confinedRoot returns the import root p lies strictly inside, or "".
func (a *Agent) confinedRoot(p string, resolve bool) string {
	for _, root := range a.importRoots() {
		rr := filepath.Clean(root)
		if resolve {
			var err error
			if rr, err = filepath.EvalSymlinks(root); err != nil {
				continue
			}
		}
		rel, err := filepath.Rel(rr, p)
		if err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return root
		}
	}
	return ""
}

var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// sniffFormat names a file's format from its first bytes.
func sniffFormat(head []byte) string {
	switch {
	case len(head) >= 4 && string(head[:4]) == string(qcow2Magic):
		return "qcow2"
	case len(head) >= 2 && head[0] == 0x1f && head[1] == 0x8b:
		return "gzip"
	case len(head) >= 4 && head[0] == 0x28 && head[1] == 0xb5 && head[2] == 0x2f && head[3] == 0xfd:
		return "zstd"
	}
	return "raw"
}

// importFile stores the file at path as image ref on top of parent.
func (a *Agent) importFile(ctx context.Context, job *Job, path string, ref blobstore.Ref, parent *blobstore.Image, desc string) (blobstore.Image, error) {
	f, err := a.openImportPath(path)
	if err != nil {
		return blobstore.Image{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return blobstore.Image{}, err
	}
	size := fi.Size()
	job.SetTotal(size)
	head := make([]byte, 8)
	n, _ := f.ReadAt(head, 0)
	format := sniffFormat(head[:n])
	job.SetImage("", "", format)
	if parent != nil {
		release := a.store.Hold(parent.Blob)
		defer release()
	}
	ni := NewImage{Ref: ref, Parent: parent, Desc: desc, Format: format}
	if format == "qcow2" {
		l, err := normalizeLayer(ctx, a.store, jobs.ReaderAt(job, f), size, parent, "agent-"+job.ID())
		if err != nil {
			return blobstore.Image{}, err
		}
		ni.Blob, ni.Size, ni.VirtualSize = l.Digest, l.Size, l.VirtualSize
	} else {
		d, n, err := a.store.Put(ctx, jobs.Reader(job, f), size, "")
		if err != nil {
			return blobstore.Image{}, fmt.Errorf("storing %s: %w", path, err)
		}
		ni.Blob, ni.Size, ni.VirtualSize = d, n, n
	}
	a.m.bytesIngested.Add(float64(size))
	release := a.store.Hold(ni.Blob)
	defer release()
	return a.recordImage(ctx, ni)
}

type installPathReq struct {
	InstallPath string `json:"installPath"`
	ImageUUID   string `json:"imageUuid"`
	UUID        string `json:"uuid"`
}

func (q *installPathReq) validate() error {
	if q.InstallPath == "" {
		return missing("installPath")
	}
	return nil
}

type chainReply struct {
	Chain []ImageInfo `json:"chain"`
}

func (a *Agent) imgChain(w http.ResponseWriter, r *http.Request) {
	var req installPathReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "imgchain", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		img, err := a.lookupImage(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		chain, err := a.store.Chain(ctx, img.Ref)
		if err != nil {
			return nil, err
		}
		out := make([]ImageInfo, len(chain))
		for i, c := range chain {
			out[i] = imageInfo(c)
		}
		return chainReply{Chain: out}, nil
	})
}

func (a *Agent) imgInfo(w http.ResponseWriter, r *http.Request) {
	var req installPathReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "imginfo", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		img, err := a.lookupImage(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		return imageInfo(img), nil
	})
}

type deleteReply struct {
	Capacity
	Deleted bool `json:"deleted"` // false when the image was already gone
}

// deleteImage removes an image record (its blob is freed by the next gc).
// Deleting an absent image succeeds with deleted:false, so a retried delete
// is harmless; an image with children is refused.
func (a *Agent) deleteImage(w http.ResponseWriter, r *http.Request) {
	var req installPathReq
	err := decode(r, &req)
	var ref blobstore.Ref
	if err == nil {
		ref, err = parseImagePath("installPath", req.InstallPath)
	}
	a.async(w, r, JobSpec{Kind: "delete", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		err := a.store.DeleteImage(ctx, ref)
		switch {
		case errors.Is(err, blobstore.ErrNotFound):
			return deleteReply{Capacity: a.capacity()}, nil
		case err != nil:
			return nil, err
		}
		a.log.Info("image deleted", "image", ref.String())
		return deleteReply{Capacity: a.capacity(), Deleted: true}, nil
	})
}

type gcReq struct {
	ImagesToKeep []string `json:"imagesToKeep"`
}

type gcReply struct {
	Capacity
	Freed          int64 `json:"freed"`
	BlobsFreed     int   `json:"blobsFreed"`
	ImagesRemoved  int   `json:"imagesRemoved"`
	IngestsRemoved int   `json:"ingestsRemoved"`
}

// gc deletes image records not in imagesToKeep (nor their ancestors) and
// frees unreferenced blobs. An absent or empty list keeps every image: an
// empty list is far more likely a bug than a wish to delete everything.
func (a *Agent) gc(w http.ResponseWriter, r *http.Request) {
	var req gcReq
	err := decode(r, &req)
	var keep []blobstore.Ref
	if err == nil {
		for i, p := range req.ImagesToKeep {
			ref, perr := parseImagePath(fmt.Sprintf("imagesToKeep[%d]", i), p)
			if perr != nil {
				err = perr
				break
			}
			keep = append(keep, ref)
		}
	}
	a.async(w, r, JobSpec{Kind: "gc", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		res, err := a.store.GC(ctx, keep)
		if err != nil {
			return nil, err
		}
		a.m.gcFreed.Add(float64(res.BytesFreed))
		a.log.Info("gc done", "freedBytes", res.BytesFreed, "blobs", res.BlobsFreed, "images", res.ImagesRemoved)
		return gcReply{
			Capacity: a.capacity(), Freed: res.BytesFreed, BlobsFreed: res.BlobsFreed,
			ImagesRemoved: res.ImagesRemoved, IngestsRemoved: res.IngestsRemoved,
		}, nil
	})
}

type hashReq struct {
	InstallPath string `json:"installPath"`
	Alogrithm   string `json:"alogrithm"` // sic: the management node's spelling
	Algorithm   string `json:"algorithm"`
}

func (q *hashReq) validate() error {
	if q.InstallPath == "" {
		return missing("installPath")
	}
	if _, err := newHash(q.algorithm()); err != nil {
		return err
	}
	return nil
}

func (q *hashReq) algorithm() string {
	return strings.ToLower(firstNonEmpty(q.Alogrithm, q.Algorithm, "sha256"))
}

func newHash(alg string) (hash.Hash, error) {
	switch alg {
	case "sha256":
		return sha256.New(), nil
	case "md5":
		return md5.New(), nil
	}
	return nil, fmt.Errorf("alogrithm %q not supported (sha256 or md5)", alg)
}

type hashReply struct {
	Hash      string `json:"hash"`
	Algorithm string `json:"algorithm"`
}

// imageHash hashes the image's blob (the stored layer bytes) by streaming it.
func (a *Agent) imageHash(w http.ResponseWriter, r *http.Request) {
	var req hashReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "getimagehash", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		img, err := a.lookupImage(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		job.SetImage("", img.InstallPath(), img.Format)
		b, err := a.store.OpenBlob(ctx, img.Blob)
		if err != nil {
			return nil, err
		}
		defer b.Close()
		job.SetTotal(b.Size())
		h, _ := newHash(req.algorithm())
		if _, err := io.Copy(h, jobs.Reader(job, ctxReader(ctx, io.NewSectionReader(b, 0, b.Size())))); err != nil {
			return nil, err
		}
		return hashReply{Hash: hex.EncodeToString(h.Sum(nil)), Algorithm: req.algorithm()}, nil
	})
}

// ctxReader stops a long copy when ctx ends.
func ctxReader(ctx context.Context, r io.Reader) io.Reader {
	return readerFunc(func(p []byte) (int, error) {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		return r.Read(p)
	})
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

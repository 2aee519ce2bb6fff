// Package exports makes stored images downloadable: each export is a file
// under a random 128-bit token, <Root>/<token>/image-<token>.<ext>, with
// its metadata in <Root>/<token>/export.json, written last. The token is
// the download's credential, so the URL /export/image-<token>.<ext> needs
// no other.
//
// The management node publishes an export URL with the image's name put
// in front of the last segment (<name>-image-<token>.<ext>) and finds the
// export again by the text after the last "image-"; Resolve does the same,
// so the original and the renamed URL both download.
package exports

import (
	"context"
	"crypto/md5"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/ctxio"
	"imagestore/internal/fsutil"
	"imagestore/layer"
)

// URLPrefix is the path under which exports are downloaded:
// URLPrefix + "image-" + <token> + "." + <ext>.
const URLPrefix = "/export/"

// filePrefix starts an export's file name, the URL's last segment: it
// occurs once in the URL, and everything after its last occurrence is
// "<token>.<ext>".
const filePrefix = "image-"

// tokenLen is the length of an export token: 32 hex digits, 128 random
// bits, which make the URL its own credential.
const tokenLen = 32

// metaFile is written last into an export's dir: a dir without it is an
// export being written or one a crash interrupted.
const metaFile = "export.json"

// ErrNotFound: no such export (unknown, incomplete or expired token, or
// another file name).
var ErrNotFound = errors.New("no such export")

// Meta describes an export; it is the content of export.json.
type Meta struct {
	InstallPath string    `json:"installPath"`
	ExtFmt      string    `json:"extFmt"`
	File        string    `json:"file"`
	MD5Sum      string    `json:"md5Sum"`
	Size        int64     `json:"size"`
	Created     time.Time `json:"created"` // when the export was ready; its expiry counts from here
	// Package marks a package of exports (Pack): File is
	// "<packageName>.<tar|tar.gz>", served under PackagePrefix.
	Package bool `json:"package,omitempty"`
}

// Export is a complete export.
type Export struct {
	Token string
	Meta
}

// Path is the export's URL path, relative to the agent's listener:
// URLPrefix + "image-<token>.<ext>".
func (e Export) Path() string { return URLPrefix + e.File }

// Options configure a Service.
type Options struct {
	Root   string        // the exports dir, e.g. <store root>/exports; created (or chmod-ed) 0700
	Layers *layer.Store  // the store exported from
	Expiry time.Duration // an export is removed this long after it was ready; 0 keeps it until Delete
	Logger *slog.Logger
	// QemuImg is the qemu-img binary WriteRemote runs (default "qemu-img"
	// from PATH).
	QemuImg string
	// BeforeWrite, if set, runs before an export's data is written (tests
	// hold an export mid-write with it).
	BeforeWrite func(installPath string)
}

// Service creates, lists, serves and removes the exports of one store.
type Service struct {
	opts   Options
	log    *slog.Logger
	layers *layer.Store

	// mu serialises looking up, reserving and removing exports; it is
	// never held while an export's data is written (see flights).
	mu sync.Mutex

	flightMu sync.Mutex
	byKey    map[string]*flight // installPath \x00 extFmt
	byToken  map[string]bool    // tokens whose dir is being written
}

// flight is an export being written: its token dir exists without
// export.json. Exports of the same image and format wait for it.
type flight struct {
	token string
	done  chan struct{}
	meta  Meta // set before done closes
	err   error
}

// New makes the exports dir private (tokens are download credentials:
// local users must not list them) and removes exports a crash interrupted
// and expired ones.
func New(opts Options) (*Service, error) {
	if opts.Root == "" || opts.Layers == nil {
		return nil, errors.New("exports: Root and Layers are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Root, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(opts.Root, 0o700); err != nil { // made 0755 by older versions
		return nil, err
	}
	s := &Service{opts: opts, log: opts.Logger, layers: opts.Layers, byKey: map[string]*flight{}, byToken: map[string]bool{}}
	s.Sweep()
	return s, nil
}

// Create makes img downloadable as extFmt ("" = the image's own format):
// a qcow2 chain is flattened into one standalone image (qcow2 or raw); a
// base layer or an opaque blob is hard-linked as is. An existing export of
// the same image and format is returned instead (its life starts again, so
// the URL a caller got keeps working), and a concurrent Create of the same
// waits for and shares the first one's result.
func (s *Service) Create(ctx context.Context, p jobs.Progress, img blobstore.Image, extFmt string) (Export, error) {
	p.SetImage("", img.InstallPath(), img.Format)
	if extFmt == "" {
		extFmt = img.Format
	}
	if img.Format != "qcow2" && extFmt != img.Format {
		return Export{}, fmt.Errorf("image %s has format %s; it can only be exported as is (extFmt %s)", img.Ref, img.Format, img.Format)
	}
	key := img.InstallPath() + "\x00" + extFmt
	s.mu.Lock()
	existing, err := s.list()
	if err != nil {
		s.mu.Unlock()
		return Export{}, err
	}
	for token, m := range existing {
		if !m.Package && m.InstallPath == img.InstallPath() && m.ExtFmt == extFmt {
			// The same URL again, with a full life from now.
			err := s.renew(token, &m)
			s.mu.Unlock()
			if err != nil {
				return Export{}, err
			}
			return Export{Token: token, Meta: m}, nil
		}
	}
	s.flightMu.Lock()
	fl := s.byKey[key]
	s.flightMu.Unlock()
	if fl != nil {
		// The same export is being written: share its result.
		s.mu.Unlock()
		select {
		case <-fl.done:
			return Export{Token: fl.token, Meta: fl.meta}, fl.err
		case <-ctx.Done():
			return Export{}, context.Cause(ctx)
		}
	}
	token := randomToken()
	dir := filepath.Join(s.opts.Root, token)
	if err := os.Mkdir(dir, 0o755); err != nil {
		s.mu.Unlock()
		return Export{}, err
	}
	fl = &flight{token: token, done: make(chan struct{})}
	s.flightMu.Lock()
	s.byKey[key] = fl
	s.byToken[token] = true
	s.flightMu.Unlock()
	s.mu.Unlock()

	fl.meta, fl.err = s.write(ctx, p, img, extFmt, token, dir)
	if fl.err != nil {
		_ = os.RemoveAll(dir)
	}
	s.flightMu.Lock()
	delete(s.byKey, key)
	delete(s.byToken, token)
	s.flightMu.Unlock()
	close(fl.done)
	if fl.err != nil {
		return Export{}, fl.err
	}
	s.log.Info("export created", "image", img.Ref.String(), "format", extFmt, "token", token[:8]+"…", "size", fl.meta.Size)
	return Export{Token: token, Meta: fl.meta}, nil
}

// write writes an export's file and, last, its export.json into dir.
func (s *Service) write(ctx context.Context, p jobs.Progress, img blobstore.Image, extFmt, token, dir string) (Meta, error) {
	meta := Meta{InstallPath: img.InstallPath(), ExtFmt: extFmt, File: fileName(token, extFmt)}
	if s.opts.BeforeWrite != nil {
		s.opts.BeforeWrite(img.InstallPath())
	}
	dst := filepath.Join(dir, meta.File)
	h := md5.New()
	if img.Format == "qcow2" && (img.Parent != "" || extFmt == "raw") {
		n, err := fsutil.WriteFunc(dst, 0o644, func(w io.Writer) (int64, error) {
			return s.flatten(ctx, img, extFmt, io.MultiWriter(w, h, jobs.Writer(p)))
		})
		if err != nil {
			return meta, fmt.Errorf("flattening %s: %w", img.Ref, err)
		}
		meta.Size = n
	} else {
		n, err := s.link(ctx, p, img, dst, h)
		if err != nil {
			return meta, err
		}
		meta.Size = n
	}
	meta.MD5Sum = hex.EncodeToString(h.Sum(nil))
	// The URL's life (Expiry) counts from here, when it starts to work.
	meta.Created = time.Now().UTC()
	return meta, writeMeta(dir, meta)
}

// renew starts the life of export token again (mu held).
func (s *Service) renew(token string, m *Meta) error {
	m.Created = time.Now().UTC()
	return writeMeta(filepath.Join(s.opts.Root, token), *m)
}

func writeMeta(dir string, m Meta) error {
	b, _ := json.MarshalIndent(m, "", "  ")
	return fsutil.WriteFile(filepath.Join(dir, metaFile), b, 0o600)
}

// fileName is an export's file name and its URL's last segment.
func fileName(token, extFmt string) string { return filePrefix + token + "." + extFmt }

// parseName finds the export a URL path names, the way the management
// node's removeNameFromExportUrl does: by the text after the last
// "image-", which must be "<token>.<ext>". It returns the token and the
// export's file name.
func parseName(path string) (token, file string, ok bool) {
	i := strings.LastIndex(path, filePrefix)
	if i < 0 {
		return "", "", false
	}
	rest := path[i+len(filePrefix):]
	token, ext, found := strings.Cut(rest, ".")
	if !found || !isToken(token) || ext == "" || strings.ContainsAny(ext, "/.") {
		return "", "", false
	}
	return token, filePrefix + rest, true
}

// link exports img's blob as is at dst and hashes it into h. The blob is
// immutable, so a hard link is a safe zero-copy export; across
// filesystems it is copied.
// On a store without local blob paths (S3) the blob is streamed into dst
// from OpenBlob and hashed on the way.
func (s *Service) link(ctx context.Context, p jobs.Progress, img blobstore.Image, dst string, h io.Writer) (int64, error) {
	src, err := s.layers.Blobs().BlobPath(img.Blob)
	if errors.Is(err, blobstore.ErrNoLocalPath) {
		return s.copyBlob(ctx, p, img, dst, h)
	}
	if err != nil {
		return 0, err
	}
	if err := os.Link(src, dst); err != nil {
		if err := copyFile(ctx, src, dst); err != nil {
			return 0, err
		}
	}
	f, err := os.Open(dst)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	p.SetTotal(fi.Size())
	return io.Copy(h, jobs.Reader(p, ctxio.Reader(ctx, f)))
}

// copyBlob writes img's blob, read through OpenBlob, to dst and into h.
func (s *Service) copyBlob(ctx context.Context, p jobs.Progress, img blobstore.Image, dst string, h io.Writer) (int64, error) {
	b, err := s.layers.Blobs().OpenBlob(ctx, img.Blob)
	if err != nil {
		return 0, err
	}
	defer b.Close()
	p.SetTotal(b.Size())
	return fsutil.WriteFunc(dst, 0o644, func(w io.Writer) (int64, error) {
		r := jobs.Reader(p, ctxio.Reader(ctx, io.NewSectionReader(b, 0, b.Size())))
		n, err := io.Copy(io.MultiWriter(w, h), r)
		if err == nil && n != b.Size() {
			err = fmt.Errorf("blob %s: copied %d of %d bytes", img.Blob, n, b.Size())
		}
		return n, err
	})
}

func copyFile(ctx context.Context, src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	_, err = fsutil.WriteFunc(dst, 0o644, func(w io.Writer) (int64, error) {
		return io.Copy(w, ctxio.Reader(ctx, in))
	})
	return err
}

// Selector picks exports to delete; empty fields match any. Package
// picks packages (Pack) instead of image exports.
type Selector struct {
	Token       string
	InstallPath string
	ExtFmt      string
	Package     bool
}

// Delete removes the exports sel matches (revoking their URLs; a download
// in progress keeps its open file) and returns how many.
func (s *Service) Delete(ctx context.Context, sel Selector) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	exps, err := s.list()
	if err != nil {
		return 0, err
	}
	n := 0
	for token, m := range exps {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		match := m.Package == sel.Package &&
			(sel.Token == "" || token == sel.Token) &&
			(sel.InstallPath == "" || m.InstallPath == sel.InstallPath) &&
			(sel.ExtFmt == "" || m.ExtFmt == sel.ExtFmt)
		if !match {
			continue
		}
		if err := os.RemoveAll(filepath.Join(s.opts.Root, token)); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// TokenFromURL returns the token of an export URL (absolute or a path,
// original or with the image's name in front of its last segment).
func TokenFromURL(u string) (string, error) {
	pu, err := url.Parse(u)
	if err != nil || !strings.HasPrefix(pu.Path, URLPrefix) {
		return "", fmt.Errorf("imgUrl %q is not an export URL of this agent", u)
	}
	token, _, ok := parseName(pu.Path)
	if !ok {
		return "", fmt.Errorf("imgUrl %q is not an export URL of this agent", u)
	}
	return token, nil
}

// Resolve opens the export a download's (decoded) URL path names:
// URLPrefix + [<anything>-]image-<token>.<ext>, or a package's
// PackagePrefix + <token>/<file>; see Open.
func (s *Service) Resolve(path string) (Meta, *os.File, error) {
	if strings.HasPrefix(path, PackagePrefix) {
		token, file, ok := parsePackagePath(path)
		if !ok {
			return Meta{}, nil, ErrNotFound
		}
		return s.Open(token, file)
	}
	if !strings.HasPrefix(path, URLPrefix) {
		return Meta{}, nil, ErrNotFound
	}
	token, file, ok := parseName(path)
	if !ok {
		return Meta{}, nil, ErrNotFound
	}
	return s.Open(token, file)
}

// Open opens the file of a complete, unexpired export for serving; any
// other token or file name is ErrNotFound.
func (s *Service) Open(token, file string) (Meta, *os.File, error) {
	if !isToken(token) {
		return Meta{}, nil, ErrNotFound
	}
	m, err := s.readMeta(token)
	if err != nil || m.File != file || s.expired(m, time.Now()) {
		return Meta{}, nil, ErrNotFound
	}
	f, err := os.Open(filepath.Join(s.opts.Root, token, m.File))
	if err != nil {
		return Meta{}, nil, ErrNotFound
	}
	return m, f, nil
}

// Sweep removes leftovers of exports interrupted by a crash and expired
// exports; New runs it, and Create and Delete do as well.
func (s *Service) Sweep() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.list(); err != nil {
		s.log.Warn("sweeping exports", "err", err)
	}
}

// list maps token to metadata. Call it with mu held: it also removes
// expired exports and token dirs that have no export.json and are not
// being written, which a crash during an export leaves behind.
func (s *Service) list() (map[string]Meta, error) {
	ents, err := os.ReadDir(s.opts.Root)
	if err != nil {
		return nil, err
	}
	out := map[string]Meta{}
	for _, e := range ents {
		if !e.IsDir() || !isToken(e.Name()) {
			continue
		}
		m, err := s.readMeta(e.Name())
		if errors.Is(err, fs.ErrNotExist) {
			s.sweepInterrupted(e.Name())
			continue
		}
		if err != nil {
			continue
		}
		if s.expired(m, time.Now()) {
			// A download in progress keeps its open file; new ones get 404.
			if err := os.RemoveAll(filepath.Join(s.opts.Root, e.Name())); err != nil {
				s.log.Warn("removing an expired export", "installPath", m.InstallPath, "err", err)
			} else {
				s.log.Info("removed an expired export", "installPath", m.InstallPath, "created", m.Created)
			}
			continue
		}
		out[e.Name()] = m
	}
	return out, nil
}

// expired reports whether m is past Expiry at now.
func (s *Service) expired(m Meta, now time.Time) bool {
	return s.opts.Expiry > 0 && now.Sub(m.Created) > s.opts.Expiry
}

// sweepInterrupted removes the dir of an export without export.json
// unless it is being written now. mu must be held.
func (s *Service) sweepInterrupted(token string) {
	s.flightMu.Lock()
	busy := s.byToken[token]
	s.flightMu.Unlock()
	if busy {
		return
	}
	if err := os.RemoveAll(filepath.Join(s.opts.Root, token)); err != nil {
		s.log.Warn("removing an interrupted export", "token", token[:8]+"…", "err", err)
		return
	}
	s.log.Warn("removed an interrupted export (no export.json)", "token", token[:8]+"…")
}

func (s *Service) readMeta(token string) (Meta, error) {
	var m Meta
	b, err := os.ReadFile(filepath.Join(s.opts.Root, token, metaFile))
	if err != nil {
		return m, err
	}
	return m, json.Unmarshal(b, &m)
}

func isToken(s string) bool {
	if len(s) != tokenLen {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

func randomToken() string {
	b := make([]byte, tokenLen/2)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

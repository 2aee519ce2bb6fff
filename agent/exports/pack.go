package exports

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/countio"
	"imagestore/internal/ctxio"
	"imagestore/internal/fsutil"
)

// PackagePrefix is the path under which packages are downloaded:
// PackagePrefix + <token> + "/" + <packageName>.<tar|tar.gz>. The
// management node uses a package URL as is (no renaming), so the token
// sits in a directory segment and the file keeps the package's name.
const PackagePrefix = URLPrefix + "package/"

// PackOptions describe a package (Pack).
type PackOptions struct {
	// ImageFormat is the format each qcow2 image is packed in: "qcow2",
	// "raw" or "" (the image's own). Images of another format (an ISO, a
	// raw blob) are packed as they are stored.
	ImageFormat string
	// Config is the config file's content; "" packs no config file.
	Config string
	// ConfigFormat is the config file's extension; "" = "json".
	ConfigFormat string
	// Name is the package's name: the file is <Name>.<ext> and the config
	// file <Name>.<ConfigFormat>. Characters other than [A-Za-z0-9._-]
	// become "_".
	Name string
	// Format is "tar" (or ""), or "tar.gz" (or "tgz").
	Format string
}

// Package is a complete package.
type Package struct {
	Token string
	Meta
}

// Path is the package's URL path, relative to the agent's listener.
func (p Package) Path() string { return PackagePrefix + p.Token + "/" + p.File }

// Pack writes one package holding each image exactly as its export
// serves it (the export is made, or reused, by Create) and the config
// file, and makes it downloadable under a fresh 128-bit token. Entries
// are named <image name>.<ext> (<name>-<id>.<ext> when two images share a
// name), in the order given, the config file last. The package is
// streamed from the export files (no image is held in memory), written
// atomically, and its md5 is that of the served bytes. Packages live and
// expire like exports; DeletePackage removes one.
func (s *Service) Pack(ctx context.Context, p jobs.Progress, imgs []blobstore.Image, o PackOptions) (Package, error) {
	if len(imgs) == 0 {
		return Package{}, errors.New("pack: no images")
	}
	ext, gz, err := packageExt(o.Format)
	if err != nil {
		return Package{}, err
	}
	name := safeName(o.Name, "package")
	confExt := safeName(o.ConfigFormat, "json")
	exps := make([]Export, 0, len(imgs))
	entries := make([]string, 0, len(imgs)+1)
	seen := map[string]bool{}
	for _, img := range imgs {
		if seen["\x00"+img.InstallPath()] {
			return Package{}, fmt.Errorf("pack: %s is listed twice", img.InstallPath())
		}
		seen["\x00"+img.InstallPath()] = true
		extFmt := o.ImageFormat
		if img.Format != "qcow2" {
			extFmt = "" // as stored: only a qcow2 chain converts
		}
		exp, err := s.Create(ctx, p, img, extFmt)
		if err != nil {
			return Package{}, fmt.Errorf("exporting %s: %w", img.Ref, err)
		}
		entry := safeName(img.Name, "image") + "." + exp.ExtFmt
		if seen[entry] {
			entry = safeName(img.Name+"-"+img.ID, "image") + "." + exp.ExtFmt
		}
		if seen[entry] {
			return Package{}, fmt.Errorf("pack: two images would be packed as %s", entry)
		}
		seen[entry] = true
		exps = append(exps, exp)
		entries = append(entries, entry)
	}
	confEntry := name + "." + confExt
	if o.Config != "" && seen[confEntry] {
		return Package{}, fmt.Errorf("pack: the config file's name %s is an image's", confEntry)
	}

	s.mu.Lock()
	token := randomToken()
	dir := filepath.Join(s.opts.Root, token)
	if err := os.Mkdir(dir, 0o755); err != nil {
		s.mu.Unlock()
		return Package{}, err
	}
	s.flightMu.Lock()
	s.byToken[token] = true // Sweep leaves the dir alone while it has no export.json
	s.flightMu.Unlock()
	s.mu.Unlock()
	defer func() {
		s.flightMu.Lock()
		delete(s.byToken, token)
		s.flightMu.Unlock()
	}()

	meta := Meta{ExtFmt: ext, File: name + "." + ext, Package: true}
	var total int64
	for _, e := range exps {
		total += e.Size
	}
	p.SetTotal(total + int64(len(o.Config)))
	h := md5.New()
	n, err := fsutil.WriteFunc(filepath.Join(dir, meta.File), 0o644, func(w io.Writer) (int64, error) {
		cw := &countio.Writer{W: io.MultiWriter(w, h)}
		var out io.Writer = cw
		var zw *gzip.Writer
		if gz {
			zw = gzip.NewWriter(cw)
			out = zw
		}
		tw := tar.NewWriter(out)
		for i, e := range exps {
			if err := s.packExport(ctx, p, tw, e, entries[i]); err != nil {
				return cw.N, err
			}
		}
		if o.Config != "" {
			hdr := &tar.Header{Name: confEntry, Mode: 0o644, Size: int64(len(o.Config)), ModTime: time.Now().UTC(), Typeflag: tar.TypeReg}
			if err := tw.WriteHeader(hdr); err != nil {
				return cw.N, err
			}
			if _, err := io.WriteString(tw, o.Config); err != nil {
				return cw.N, err
			}
			p.Add(int64(len(o.Config)))
		}
		if err := tw.Close(); err != nil {
			return cw.N, err
		}
		if zw != nil {
			if err := zw.Close(); err != nil {
				return cw.N, err
			}
		}
		return cw.N, nil
	})
	if err != nil {
		_ = os.RemoveAll(dir)
		return Package{}, fmt.Errorf("writing package %s: %w", meta.File, err)
	}
	meta.Size = n
	meta.MD5Sum = hex.EncodeToString(h.Sum(nil))
	meta.Created = time.Now().UTC()
	if err := writeMeta(dir, meta); err != nil {
		_ = os.RemoveAll(dir)
		return Package{}, err
	}
	s.log.Info("package created", "file", meta.File, "images", len(exps), "token", token[:8]+"…", "size", n)
	return Package{Token: token, Meta: meta}, nil
}

// packExport copies export e's file into tw as entry.
func (s *Service) packExport(ctx context.Context, p jobs.Progress, tw *tar.Writer, e Export, entry string) error {
	_, f, err := s.Open(e.Token, e.File)
	if err != nil {
		return fmt.Errorf("the export of %s vanished while packing: %w", e.InstallPath, err)
	}
	defer f.Close()
	hdr := &tar.Header{Name: entry, Mode: 0o644, Size: e.Size, ModTime: e.Created, Typeflag: tar.TypeReg}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	n, err := io.Copy(tw, jobs.Reader(p, ctxio.Reader(ctx, f)))
	if err != nil {
		return fmt.Errorf("packing %s: %w", e.InstallPath, err)
	}
	if n != e.Size {
		return fmt.Errorf("packing %s: export has %d bytes, want %d", e.InstallPath, n, e.Size)
	}
	return nil
}

// DeletePackage removes the package exportURL names (a package URL,
// absolute or relative). An absent package is no error (0 deleted); a URL
// that is not a package URL of this agent is.
func (s *Service) DeletePackage(ctx context.Context, exportURL string) (int, error) {
	u, err := url.Parse(exportURL)
	if err != nil {
		return 0, fmt.Errorf("exportUrl %q is not a package URL of this agent", exportURL)
	}
	token, _, ok := parsePackagePath(u.Path)
	if !ok {
		return 0, fmt.Errorf("exportUrl %q is not a package URL of this agent (%s<token>/<file>)", exportURL, PackagePrefix)
	}
	return s.Delete(ctx, Selector{Token: token, Package: true})
}

// parsePackagePath splits PackagePrefix + <token>/<file>.
func parsePackagePath(path string) (token, file string, ok bool) {
	rest, found := strings.CutPrefix(path, PackagePrefix)
	if !found {
		return "", "", false
	}
	token, file, found = strings.Cut(rest, "/")
	if !found || !isToken(token) || file == "" || strings.Contains(file, "/") {
		return "", "", false
	}
	return token, file, true
}

// packageExt maps a packageFormat to the file's extension.
func packageExt(format string) (ext string, gz bool, err error) {
	switch format {
	case "", "tar":
		return "tar", false, nil
	case "tar.gz", "tgz":
		return "tar.gz", true, nil
	}
	return "", false, fmt.Errorf("packageFormat %q not supported (tar or tar.gz)", format)
}

// safeName makes s a file name of [A-Za-z0-9._-] (others become "_"),
// not starting with a dot and at most 128 bytes; "" becomes def.
func safeName(s, def string) string {
	s = strings.Map(func(c rune) rune {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-' {
			return c
		}
		return '_'
	}, s)
	s = strings.TrimLeft(s, ".")
	if len(s) > 128 {
		s = s[:128]
	}
	if s == "" {
		return def
	}
	return s
}

package ingest

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/images"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/redact"
	"imagestore/layer"
	"imagestore/qcow2"
)

// ErrImportTooLarge is returned when a download exceeds MaxImportSize.
var ErrImportTooLarge = errors.New("image larger than maxImportSize")

// URLRequest is import: download an image into the store.
type URLRequest struct {
	Task string // the job's id; names the ingests ("import-<task>", "import-<task>-canon")
	// ImgURL is http(s)://, ftp://[user[:password]@]host[:port]/path
	// (anonymous without a user), sftp://user[:password]@host[:port]/path,
	// file://path (confined like import-backup's) or upload://name (the
	// host CLI streams the bytes as upload chunks for taskuuid Task).
	ImgURL    string
	Name      string // the image's name ("" = ImageUUID)
	ImageUUID string // the image's id ("" = a new one)
	Arch      string
	Desc      string
	CACert    string // zstore:// only: the PEM the source store's certificate is verified against
}

// CheckSource checks that imgurl is a URL import can fetch. The errors
// never show a password the URL holds.
func CheckSource(imgurl string) (*url.URL, error) {
	u, err := url.Parse(imgurl)
	if err != nil {
		return nil, fmt.Errorf("imgurl is not a URL: %w", redactURLError(err))
	}
	switch u.Scheme {
	case "http", "https", "ftp", "sftp":
		if u.Host == "" {
			return nil, fmt.Errorf("imgurl %s: no host", redact.URL(u.String()))
		}
	case "file", "upload":
	case "zstore":
		if _, err := ParseStoreURL(u); err != nil {
			return nil, err
		}
	case "":
		return nil, fmt.Errorf("imgurl %q: no scheme (http, https, ftp, sftp, file, upload or zstore)", redact.URL(u.String()))
	default:
		return nil, fmt.Errorf("imgurl %s: scheme %s is not supported (http, https, ftp, sftp, file, upload or zstore)", redact.URL(u.String()), u.Scheme)
	}
	return u, nil
}

// IsUploadSession reports whether imgurl is the management node's form of
// an upload:// import, upload://<imageUuid>/<file>, whose bytes arrive
// later at an upload URL of their own; a bare upload://<name> is streamed
// by the host CLI as chunks of the import's taskuuid.
func IsUploadSession(imgurl, imageUUID string) bool {
	u, err := url.Parse(imgurl)
	return err == nil && u.Scheme == "upload" && imageUUID != "" && u.Host == imageUUID && strings.Trim(u.Path, "/") != ""
}

// redactURLError drops a *url.Error's URL, which may hold a password.
func redactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// ImportURL downloads an image into a blob ingest, then records it in
// its true format: a qcow2 is normalized into a canonical standalone
// layer; a raw disk or an ISO-9660 image is recorded as the downloaded
// blob itself (format "raw" or "iso"), so pull and export deliver it as
// what it is.
func (s *Service) ImportURL(ctx context.Context, req URLRequest, p jobs.Progress) (blobstore.Image, error) {
	u, err := CheckSource(req.ImgURL)
	if err != nil {
		return blobstore.Image{}, err
	}
	ref := blobstore.Ref{Name: firstNonEmpty(req.Name, req.ImageUUID), ID: firstNonEmpty(req.ImageUUID, images.NewID())}
	if err := ref.Validate(); err != nil {
		return blobstore.Image{}, fmt.Errorf("name/imageuuid: %w", err)
	}
	store := s.opts.Store
	if _, err := store.GetImage(ctx, ref); err == nil {
		return blobstore.Image{}, fmt.Errorf("image %s already exists", ref)
	}
	p.SetImage(firstNonEmpty(req.ImageUUID, ref.ID), ref.InstallPath(), "")
	if u.Scheme == "zstore" {
		return s.importFromStore(ctx, req, ref, u, p)
	}
	shown := redact.URL(u.String())
	s.log.Info("import started", "image", ref.String(), "url", shown)
	ingest := "import-" + req.Task
	d, size, created, err := s.download(ctx, p, u, ingest, req.Task)
	if err != nil {
		return blobstore.Image{}, fmt.Errorf("importing %s: %w", shown, err)
	}
	// The downloaded blob is held until its canonical layer is recorded;
	// then, unless it is the record's blob, it is nobody's: a refusal or a
	// normalized qcow2 leaves nothing behind for GC.
	release := store.Hold(d)
	defer func() {
		release()
		if created.Created() {
			if _, err := store.Discard(context.WithoutCancel(ctx), created); err != nil {
				s.log.Warn("discarding a downloaded blob", "blob", d, "err", err)
			}
		}
	}()
	b, err := store.OpenBlob(ctx, d)
	if err != nil {
		return blobstore.Image{}, fmt.Errorf("importing %s: %w", shown, err)
	}
	defer b.Close()
	spec, err := canonical(b, d, size)
	if err != nil {
		return blobstore.Image{}, fmt.Errorf("importing %s: %w", shown, err)
	}
	p.SetImage("", "", spec.Format)
	spec.Record = layer.Record{Ref: ref, Format: spec.Format, Arch: req.Arch, Desc: req.Desc}
	spec.Ingest = ingest + "-canon"
	return s.commit(ctx, spec, size, func(err error) error { return fmt.Errorf("importing %s: %w", shown, err) })
}

// download streams the URL's bytes into the ingest and commits them.
// A failed or cancelled download removes the partial ingest.
// created identifies the commit if the blob is new (zero: it was already stored).
func (s *Service) download(ctx context.Context, p jobs.Progress, u *url.URL, ingest, task string) (d digest.Digest, size int64, created blobstore.Creation, err error) {
	w, err := s.opts.Store.Writer(ctx, ingest)
	if err != nil {
		return "", 0, blobstore.Creation{}, err
	}
	ok := false
	defer func() {
		if !ok {
			_ = w.Cancel()
		}
	}()
	lw := &limitedWriter{w: w, max: s.opts.MaxImportSize}
	switch u.Scheme {
	case "http", "https":
		err = s.fetchHTTP(ctx, p, u, lw)
	case "ftp":
		err = s.fetchFTP(ctx, p, u, lw)
	case "sftp":
		err = s.fetchSFTP(ctx, p, u, lw)
	case "file":
		err = s.fetchFile(ctx, p, u, lw)
	case "upload":
		err = s.opts.Uploads.Receive(ctx, task, lw, p)
	default:
		err = fmt.Errorf("scheme %s is not supported", u.Scheme)
	}
	if err != nil {
		return "", 0, blobstore.Creation{}, err
	}
	size = w.Offset()
	if size == 0 {
		return "", 0, blobstore.Creation{}, errors.New("the image is empty")
	}
	d, err = w.Commit(ctx, size, "")
	if err != nil {
		return "", 0, blobstore.Creation{}, err
	}
	ok = true
	return d, size, w.Creation(), nil
}

// limitedWriter enforces MaxImportSize (0 = none) on the ingest; it is
// the uploads.Sink of upload:// imports.
type limitedWriter struct {
	w   *blobstore.Writer
	max int64
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if l.max > 0 && l.w.Offset()+int64(len(p)) > l.max {
		return 0, fmt.Errorf("%w (%d bytes)", ErrImportTooLarge, l.max)
	}
	return l.w.Write(p)
}

// Offset is how many bytes are ingested: where a resumed download continues.
func (l *limitedWriter) Offset() int64 { return l.w.Offset() }

// Fatal: going over the cap ends an upload; other errors fail one chunk.
func (l *limitedWriter) Fatal(err error) bool { return errors.Is(err, ErrImportTooLarge) }

// checkSize refuses a download whose announced size is over the cap.
func (l *limitedWriter) checkSize(n int64) error {
	if l.max > 0 && n > l.max {
		return fmt.Errorf("%w: %d bytes, at most %d allowed", ErrImportTooLarge, n, l.max)
	}
	return nil
}

// canonical names the downloaded blob d's true format and returns how it
// is committed (Format set, Record otherwise empty): a qcow2 normalized
// into a canonical standalone layer (Content); a raw disk or an ISO-9660
// image recorded as it is (Blob).
func canonical(b blobstore.Blob, d digest.Digest, size int64) (layer.Spec, error) {
	format := sniff(b)
	if format == "raw" && isISO(b) {
		format = "iso"
	}
	switch format {
	case "qcow2":
		im, err := qcow2.Open(b, size)
		if err != nil {
			return layer.Spec{}, fmt.Errorf("imgurl is not a usable qcow2: %w", err)
		}
		if err := layer.CheckParent(im, nil); err != nil {
			return layer.Spec{}, err
		}
		return layer.Spec{Record: layer.Record{Format: format}, Content: normalizeContent(layer.Normalize(im, nil, qcow2.WriteOptions{}))}, nil
	case "iso":
	case "raw":
		if size%512 != 0 {
			return layer.Spec{}, fmt.Errorf("not a disk image: neither qcow2, ISO-9660 nor a raw disk (size %d is not a multiple of 512)", size)
		}
	default:
		return layer.Spec{}, fmt.Errorf("not a disk image: %s-compressed data (import a qcow2, raw or ISO image)", format)
	}
	return layer.Spec{Record: layer.Record{Format: format}, Blob: d}, nil
}

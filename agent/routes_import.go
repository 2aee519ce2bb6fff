package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/redact"
	"imagestore/qcow2"
)

// ErrImportTooLarge is returned when a download exceeds maxImportSize.
var ErrImportTooLarge = errors.New("image larger than maxImportSize")

type importURLReq struct {
	ImgURL      string  `json:"imgurl"`
	Name        string  `json:"name"`
	Arch        string  `json:"arch"`
	Desc        string  `json:"desc"`
	Tag         string  `json:"tag"`
	ImageUUID   string  `json:"imageuuid"`
	Concurrency flexInt `json:"concurrency"`
}

func (q *importURLReq) validate() error {
	if q.ImgURL == "" {
		return missing("imgurl")
	}
	if q.Name == "" && q.ImageUUID == "" {
		return missing("name")
	}
	u, err := url.Parse(q.ImgURL)
	if err != nil {
		return fmt.Errorf("imgurl is not a URL: %w", redactURLError(err))
	}
	switch u.Scheme {
	case "http", "https", "sftp":
		if u.Host == "" {
			return fmt.Errorf("imgurl %s: no host", redact.URL(u.String()))
		}
	case "file", "upload":
	case "":
		return fmt.Errorf("imgurl %q: no scheme (http, https, sftp, file or upload)", redact.URL(u.String()))
	default:
		return fmt.Errorf("imgurl %s: scheme %s is not supported (http, https, sftp, file or upload)", redact.URL(u.String()), u.Scheme)
	}
	return nil
}

// redactURLError drops a *url.Error's URL, which may hold a password.
func redactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// importURL downloads an image (http(s) with Range resume, sftp, file, or
// an upload stream from the host CLI) into a blob ingest, then stores it
// as a canonical standalone qcow2 layer: a qcow2 is normalized, a raw
// image converted (all-zero clusters left unallocated).
func (a *Agent) importURL(w http.ResponseWriter, r *http.Request) {
	var req importURLReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "import", Backup: true, Err: err}, func(ctx context.Context, job *Job) (any, error) {
		u, _ := url.Parse(req.ImgURL)
		ref := blobstore.Ref{Name: firstNonEmpty(req.Name, req.ImageUUID), ID: firstNonEmpty(req.ImageUUID, randomHex(16))}
		if req.Name != "" && req.ImageUUID != "" {
			ref = blobstore.Ref{Name: req.Name, ID: req.ImageUUID}
		}
		if err := ref.Validate(); err != nil {
			return nil, fmt.Errorf("name/imageuuid: %w", err)
		}
		if _, err := a.store.GetImage(ctx, ref); err == nil {
			return nil, fmt.Errorf("image %s already exists", ref)
		}
		job.SetImage(firstNonEmpty(req.ImageUUID, ref.ID), ref.InstallPath(), "")
		a.log.Info("import started", "image", ref.String(), "url", redact.URL(u.String()))
		ingest := "import-" + job.ID()
		d, size, err := a.download(ctx, job, u, ingest)
		if err != nil {
			return nil, fmt.Errorf("importing %s: %w", redact.URL(u.String()), err)
		}
		release := a.store.Hold(d)
		defer release()
		l, format, err := a.canonicalize(ctx, d, size, ingest+"-canon")
		if err != nil {
			return nil, fmt.Errorf("importing %s: %w", redact.URL(u.String()), err)
		}
		job.SetImage("", "", format)
		hold := a.store.Hold(l.Digest)
		defer hold()
		a.m.bytesIngested.Add(float64(size))
		img, err := a.recordImage(ctx, NewImage{
			Ref: ref, Blob: l.Digest, Size: l.Size, VirtualSize: l.VirtualSize, Format: "qcow2",
			Arch: req.Arch, Desc: req.Desc,
		})
		if err != nil {
			return nil, err
		}
		return importReplyFor(img, a.capacity()), nil
	})
}

// download streams the URL's bytes into the ingest and commits them.
// A failed or cancelled download removes the partial ingest.
func (a *Agent) download(ctx context.Context, job *Job, u *url.URL, ingest string) (digest.Digest, int64, error) {
	w, err := a.store.Writer(ctx, ingest)
	if err != nil {
		return "", 0, err
	}
	ok := false
	defer func() {
		if !ok {
			_ = w.Cancel()
		}
	}()
	lw := &limitedWriter{w: w, max: int64(a.cfg.MaxImportSize)}
	switch u.Scheme {
	case "http", "https":
		err = a.fetchHTTP(ctx, job, u, lw)
	case "sftp":
		err = a.fetchSFTP(ctx, job, u, lw)
	case "file":
		err = a.fetchFile(ctx, job, u, lw)
	case "upload":
		err = a.receiveUpload(ctx, job, lw)
	default:
		err = fmt.Errorf("scheme %s is not supported", u.Scheme)
	}
	if err != nil {
		return "", 0, err
	}
	size := w.Offset()
	if size == 0 {
		return "", 0, errors.New("the image is empty")
	}
	d, err := w.Commit(ctx, size, "")
	if err != nil {
		return "", 0, err
	}
	ok = true
	return d, size, nil
}

// limitedWriter enforces maxImportSize (0 = none) on the ingest.
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

// offset is how many bytes are ingested: where a resumed download continues.
func (l *limitedWriter) offset() int64 { return l.w.Offset() }

// checkSize refuses a download whose announced size is over the cap.
func (l *limitedWriter) checkSize(n int64) error {
	if l.max > 0 && n > l.max {
		return fmt.Errorf("%w: %d bytes, at most %d allowed", ErrImportTooLarge, n, l.max)
	}
	return nil
}

// canonicalize turns the downloaded blob into a canonical standalone qcow2
// layer and names the source format.
func (a *Agent) canonicalize(ctx context.Context, d digest.Digest, size int64, ingest string) (layer, string, error) {
	b, err := a.store.OpenBlob(ctx, d)
	if err != nil {
		return layer{}, "", err
	}
	defer b.Close()
	head := make([]byte, 8)
	n, _ := b.ReadAt(head, 0)
	format := sniffFormat(head[:n])
	switch format {
	case "qcow2":
		l, err := normalizeLayer(ctx, a.store, b, size, nil, ingest)
		return l, format, err
	case "raw":
	default:
		return layer{}, "", fmt.Errorf("not a disk image: %s-compressed data (import a qcow2 or raw image)", format)
	}
	if size%512 != 0 {
		return layer{}, "", fmt.Errorf("not a disk image: neither qcow2 nor a raw image (size %d is not a multiple of 512)", size)
	}
	w, err := a.store.Writer(ctx, ingest)
	if err != nil {
		return layer{}, "", err
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	out, err := qcow2.NormalizeRaw(ctx, bw, b, size, qcow2.WriteOptions{})
	if err == nil {
		err = bw.Flush()
	}
	var ld digest.Digest
	if err == nil {
		ld, err = w.Commit(ctx, out, "")
	}
	if err != nil {
		_ = w.Cancel()
		return layer{}, "", fmt.Errorf("converting raw image: %w", err)
	}
	return layer{Digest: ld, Size: out, VirtualSize: size}, format, nil
}

// fetchFile copies a file:// image confined like import-backup's.
func (a *Agent) fetchFile(ctx context.Context, job *Job, u *url.URL, w *limitedWriter) error {
	path, err := a.confineImportPath("file://" + u.Path)
	if err != nil {
		return err
	}
	f, err := a.openImportPath(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if err := w.checkSize(fi.Size()); err != nil {
		return err
	}
	job.SetTotal(fi.Size())
	_, err = io.Copy(w, jobs.Reader(job, ctxReader(ctx, f)))
	return err
}

// hostPort adds the default port to a URL's host.
func hostPort(u *url.URL, def string) string {
	if u.Port() != "" {
		return u.Host
	}
	return strings.TrimSuffix(u.Host, ":") + ":" + def
}

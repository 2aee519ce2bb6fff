package ingest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"imagestore/agent/jobs"
	"imagestore/internal/ctxio"
	"imagestore/internal/redact"
	"imagestore/internal/retry"
	"imagestore/transfer/ftp"
	"imagestore/transfer/sshfs"
)

// httpStatusError is a non-retryable HTTP answer.
type httpStatusError struct{ status string }

func (e *httpStatusError) Error() string { return "HTTP " + e.status }

// fetchHTTP downloads u into w. When the body is cut, it asks again from
// the bytes already ingested with a Range request and continues the same
// ingest; a server that ignores Range makes it fail (retry the import).
func (s *Service) fetchHTTP(ctx context.Context, p jobs.Progress, u *url.URL, w *limitedWriter) error {
	policy := s.opts.Resume
	policy.Retryable = nil // fetchOnce marks what is not worth another try
	policy.OnRetry = func(attempt int, err error, _ time.Duration) {
		s.log.Warn("import download interrupted, resuming", "url", redact.URL(u.String()), "offset", w.Offset(), "attempt", attempt+1, "err", err)
	}
	tries := 0
	err := policy.Do(ctx, func(ctx context.Context, _ int) error {
		tries++
		err := s.fetchHTTPOnce(ctx, p, u, w)
		var se *httpStatusError
		if err != nil && (ctx.Err() != nil || errors.As(err, &se) || errors.Is(err, ErrImportTooLarge)) {
			return retry.Permanent(err)
		}
		return err
	})
	var se *httpStatusError
	if err == nil || ctx.Err() != nil || errors.As(err, &se) || errors.Is(err, ErrImportTooLarge) {
		return err
	}
	return fmt.Errorf("giving up after %d attempts: %w", tries, err)
}

// fetchHTTPOnce makes one request and reads the body to its end.
func (s *Service) fetchHTTPOnce(ctx context.Context, p jobs.Progress, u *url.URL, w *limitedWriter) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return redactURLError(err)
	}
	off := w.Offset()
	if off > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-")
	}
	res, err := s.opts.HTTPClient.Do(req)
	if err != nil {
		return redactURLError(err)
	}
	defer res.Body.Close()
	total := int64(-1)
	switch {
	case res.StatusCode == http.StatusPartialContent && off > 0:
		start, size, ok := parseContentRange(res.Header.Get("Content-Range"))
		if !ok || start != off {
			return &httpStatusError{fmt.Sprintf("206 with Content-Range %q, asked for bytes=%d-", res.Header.Get("Content-Range"), off)}
		}
		total = size
	case res.StatusCode == http.StatusRequestedRangeNotSatisfiable && off > 0:
		// Everything was read before the cut was noticed.
		return nil
	case res.StatusCode == http.StatusOK:
		if off > 0 {
			return &httpStatusError{"200 to a Range request: the server cannot resume; retry the import"}
		}
		total = res.ContentLength
	case res.StatusCode >= 500 || res.StatusCode == http.StatusTooManyRequests:
		return fmt.Errorf("HTTP %s", res.Status)
	default:
		return &httpStatusError{res.Status}
	}
	if total >= 0 {
		if err := w.checkSize(total); err != nil {
			return err
		}
		p.SetTotal(total)
	}
	if _, err := io.Copy(w, jobs.Reader(p, res.Body)); err != nil {
		return err
	}
	if total >= 0 && w.Offset() < total {
		return io.ErrUnexpectedEOF
	}
	return nil
}

// fetchFTP downloads u into w over FTP (passive, binary). A cut transfer
// continues from the bytes already ingested (REST) on a new connection,
// paced by the Resume policy; a permanent reply (5xx: no such file, login
// refused) is not retried.
func (s *Service) fetchFTP(ctx context.Context, p jobs.Progress, u *url.URL, w *limitedWriter) error {
	policy := s.opts.Resume
	policy.Retryable = nil
	policy.OnRetry = func(attempt int, err error, _ time.Duration) {
		s.log.Warn("import download interrupted, resuming", "url", redact.URL(u.String()), "offset", w.Offset(), "attempt", attempt+1, "err", err)
	}
	permanent := func(ctx context.Context, err error) bool {
		var re *ftp.ReplyError
		return ctx.Err() != nil || errors.As(err, &re) && re.Permanent() || errors.Is(err, ErrImportTooLarge)
	}
	tries := 0
	err := policy.Do(ctx, func(ctx context.Context, _ int) error {
		tries++
		err := s.fetchFTPOnce(ctx, p, u, w)
		if err != nil && permanent(ctx, err) {
			return retry.Permanent(err)
		}
		return err
	})
	if err == nil || permanent(ctx, err) {
		return err
	}
	return fmt.Errorf("giving up after %d attempts: %w", tries, err)
}

// fetchFTPOnce logs in and reads the file from the ingest's offset to its end.
func (s *Service) fetchFTPOnce(ctx context.Context, p jobs.Progress, u *url.URL, w *limitedWriter) error {
	c, err := ftp.Dial(ctx, u, ftp.Options{})
	if err != nil {
		return err
	}
	defer c.Close()
	path := ftp.Path(u)
	total, err := c.Size(ctx, path)
	if err != nil {
		total = -1 // SIZE is optional; RETR says whether the file exists
	} else {
		if err := w.checkSize(total); err != nil {
			return err
		}
		p.SetTotal(total)
		if w.Offset() >= total {
			return nil
		}
	}
	r, err := c.Retr(ctx, path, w.Offset())
	if err != nil {
		return err
	}
	_, err = io.Copy(w, jobs.Reader(p, r))
	if cerr := r.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if total >= 0 && w.Offset() < total {
		return io.ErrUnexpectedEOF
	}
	return nil
}

// parseContentRange parses "bytes START-END/SIZE" (SIZE may be *).
func parseContentRange(s string) (start, size int64, ok bool) {
	rest, found := strings.CutPrefix(s, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, sz, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	a, _, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil || start < 0 {
		return 0, 0, false
	}
	size = -1
	if sz != "*" {
		if size, err = strconv.ParseInt(sz, 10, 64); err != nil || size < start {
			return 0, 0, false
		}
	}
	return start, size, true
}

// fetchSFTP reads sftp://user[:password]@host[:port]/path through the SFTP
// pool: the host key is checked against KnownHostsFile and the login uses
// SSHKeyFile (or the URL's password). The pool's ReadAt reconnects on a
// lost connection, so a cut resumes where it stopped.
func (s *Service) fetchSFTP(ctx context.Context, p jobs.Progress, u *url.URL, w *limitedWriter) error {
	if s.opts.KnownHostsFile == "" {
		return errors.New("sftp imports need knownHostsFile in the agent config (host keys are always verified)")
	}
	h := sshfs.Host{Addr: hostPort(u, "22"), User: u.User.Username(), KnownHostsFile: s.opts.KnownHostsFile}
	if h.User == "" {
		return errors.New("sftp URL without a user (sftp://user@host/path)")
	}
	if pw, ok := u.User.Password(); ok {
		h.Password = pw
	}
	if s.opts.SSHKeyFile != "" {
		key, err := os.ReadFile(s.opts.SSHKeyFile)
		if err != nil {
			return fmt.Errorf("sshKeyFile: %w", err)
		}
		h.PrivateKey = key
	}
	if h.Password == "" && h.PrivateKey == nil {
		return errors.New("sftp imports need sshKeyFile in the agent config or a password in the URL")
	}
	if s.opts.OpenSFTP == nil {
		return errors.New("sftp imports are not available")
	}
	f, err := s.opts.OpenSFTP(ctx, h, u.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := w.checkSize(f.Size()); err != nil {
		return err
	}
	p.SetTotal(f.Size())
	_, err = io.Copy(w, jobs.Reader(p, ctxio.Reader(ctx, io.NewSectionReader(f, 0, f.Size()))))
	return err
}

// fetchFile copies a file:// image confined like import-backup's.
func (s *Service) fetchFile(ctx context.Context, p jobs.Progress, u *url.URL, w *limitedWriter) error {
	path, err := s.opts.Uploads.Confine("file://" + u.Path)
	if err != nil {
		return err
	}
	f, err := s.opts.Uploads.Open(path)
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
	p.SetTotal(fi.Size())
	_, err = io.Copy(w, jobs.Reader(p, ctxio.Reader(ctx, f)))
	return err
}

// hostPort adds the default port to a URL's host.
func hostPort(u *url.URL, def string) string {
	if u.Port() != "" {
		return u.Host
	}
	return strings.TrimSuffix(u.Host, ":") + ":" + def
}

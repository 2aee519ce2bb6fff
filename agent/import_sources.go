package agent

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
	"sync"
	"sync/atomic"
	"time"

	"imagestore/agent/jobs"
	"imagestore/internal/redact"
	"imagestore/transfer/sshfs"
)

// importRetries bounds consecutive failed attempts (without progress) of
// a resumable download.
const importRetries = 5

// importClient has no overall timeout (images are large); stalls are
// caught by the response-header timeout and by the context.
var importClient = &http.Client{Transport: &http.Transport{
	Proxy:                 http.ProxyFromEnvironment,
	ResponseHeaderTimeout: time.Minute,
	IdleConnTimeout:       90 * time.Second,
}}

// httpStatusError is a non-retryable HTTP answer.
type httpStatusError struct{ status string }

func (e *httpStatusError) Error() string { return "HTTP " + e.status }

// fetchHTTP downloads u into w. When the body is cut, it asks again from
// the bytes already ingested with a Range request and continues the same
// ingest; a server that ignores Range makes it start over.
func (a *Agent) fetchHTTP(ctx context.Context, job *Job, u *url.URL, w *limitedWriter) error {
	failures := 0
	for {
		done, err := a.fetchHTTPOnce(ctx, job, u, w)
		if done {
			return nil
		}
		var se *httpStatusError
		if ctx.Err() != nil || errors.As(err, &se) || errors.Is(err, ErrImportTooLarge) {
			return err
		}
		failures++
		if failures >= importRetries {
			return fmt.Errorf("giving up after %d attempts: %w", failures, err)
		}
		a.log.Warn("import download interrupted, resuming", "url", redact.URL(u.String()), "offset", w.offset(), "attempt", failures, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(failures) * 200 * time.Millisecond):
		}
	}
}

// fetchHTTPOnce makes one request; done reports the whole body was read.
func (a *Agent) fetchHTTPOnce(ctx context.Context, job *Job, u *url.URL, w *limitedWriter) (done bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return false, redactURLError(err)
	}
	off := w.offset()
	if off > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-")
	}
	res, err := importClient.Do(req)
	if err != nil {
		return false, redactURLError(err)
	}
	defer res.Body.Close()
	total := int64(-1)
	switch {
	case res.StatusCode == http.StatusPartialContent && off > 0:
		start, size, ok := parseContentRange(res.Header.Get("Content-Range"))
		if !ok || start != off {
			return false, &httpStatusError{fmt.Sprintf("206 with Content-Range %q, asked for bytes=%d-", res.Header.Get("Content-Range"), off)}
		}
		total = size
	case res.StatusCode == http.StatusRequestedRangeNotSatisfiable && off > 0:
		// Everything was read before the cut was noticed.
		return true, nil
	case res.StatusCode == http.StatusOK:
		if off > 0 {
			return false, &httpStatusError{"200 to a Range request: the server cannot resume; retry the import"}
		}
		total = res.ContentLength
	case res.StatusCode >= 500 || res.StatusCode == http.StatusTooManyRequests:
		return false, fmt.Errorf("HTTP %s", res.Status)
	default:
		return false, &httpStatusError{res.Status}
	}
	if total >= 0 {
		if err := w.checkSize(total); err != nil {
			return false, err
		}
		job.SetTotal(total)
	}
	if _, err := io.Copy(w, jobs.Reader(job, res.Body)); err != nil {
		return false, err
	}
	if total >= 0 && w.offset() < total {
		return false, io.ErrUnexpectedEOF
	}
	return true, nil
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
// pool: the host key is checked against knownHostsFile and the login uses
// sshKeyFile (or the URL's password). The pool's ReadAt reconnects on a
// lost connection, so a cut resumes where it stopped.
func (a *Agent) fetchSFTP(ctx context.Context, job *Job, u *url.URL, w *limitedWriter) error {
	if a.cfg.KnownHostsFile == "" {
		return errors.New("sftp imports need knownHostsFile in the agent config (host keys are always verified)")
	}
	h := sshfs.Host{Addr: hostPort(u, "22"), User: u.User.Username(), KnownHostsFile: a.cfg.KnownHostsFile}
	if h.User == "" {
		return errors.New("sftp URL without a user (sftp://user@host/path)")
	}
	if pw, ok := u.User.Password(); ok {
		h.Password = pw
	}
	if a.cfg.SSHKeyFile != "" {
		key, err := os.ReadFile(a.cfg.SSHKeyFile)
		if err != nil {
			return fmt.Errorf("sshKeyFile: %w", err)
		}
		h.PrivateKey = key
	}
	if h.Password == "" && h.PrivateKey == nil {
		return errors.New("sftp imports need sshKeyFile in the agent config or a password in the URL")
	}
	// The agent's host pool: connections are reused across imports and
	// host transfers, and closed by Agent.Close.
	f, err := a.hosts().pool.Open(ctx, h, u.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := w.checkSize(f.Size()); err != nil {
		return err
	}
	job.SetTotal(f.Size())
	_, err = io.Copy(w, jobs.Reader(job, ctxReader(ctx, io.NewSectionReader(f, 0, f.Size()))))
	return err
}

// Uploads (imgurl upload://...): the job waits for the host CLI to stream
// the image with PUT /imagestore/upload/ in chunks of at most maxBodyBytes,
// headers taskuuid (the import's), Upload-Offset (where the chunk starts:
// the bytes received so far) and, on the last chunk, Upload-Complete: true.
// A chunk at the wrong offset is refused with 409 and the offset to resume
// from, so a cut upload continues where it stopped.

// uploadIdle fails an upload import when no chunk arrives for this long.
var uploadIdle = 15 * time.Minute

type uploadKey struct {
	a  *Agent
	id string
}

// uploadSession is an upload import waiting for chunks.
type uploadSession struct {
	mu   sync.Mutex
	w    *limitedWriter
	job  *Job
	err  error
	last time.Time
	done chan struct{} // closed on completion or failure
	over bool
	// busy marks a chunk being copied. The copy runs without mu so a stalled
	// client cannot block the idle check or the job's end; copying lets the
	// job's end wait for an in-flight copy before the writer goes away.
	busy    bool
	copying sync.WaitGroup
	// ended is set (before the active chunk's read deadline is forced to
	// now) when the job stops waiting, so an in-flight copy ends at once.
	ended atomic.Bool
	rc    *http.ResponseController // of the chunk being copied, under mu
}

// uploadReadIdle bounds how long a chunk's body may stall between reads.
var uploadReadIdle = time.Minute

// end stops the session: no new chunk starts and the one being copied is
// cut off, so cancel and shutdown never wait on a stalled client.
func (s *uploadSession) end() {
	s.ended.Store(true)
	s.mu.Lock()
	s.over = true
	rc := s.rc
	s.mu.Unlock()
	if rc != nil {
		_ = rc.SetReadDeadline(time.Now())
	}
}

// chunkBody reads a chunk, sliding the connection's read deadline on each
// read so only an idle body times out, and stopping once the session ended.
type chunkBody struct {
	r  io.Reader
	rc *http.ResponseController
	s  *uploadSession
}

func (b chunkBody) Read(p []byte) (int, error) {
	_ = b.rc.SetReadDeadline(time.Now().Add(uploadReadIdle))
	// Checked after setting the deadline: end() stores ended before it
	// forces the deadline, so one of the two always stops this read.
	if b.s.ended.Load() {
		return 0, errors.New("upload ended")
	}
	return b.r.Read(p)
}

var uploads sync.Map // uploadKey → *uploadSession

func (a *Agent) receiveUpload(ctx context.Context, job *Job, w *limitedWriter) error {
	s := &uploadSession{w: w, job: job, last: time.Now(), done: make(chan struct{})}
	key := uploadKey{a, job.ID()}
	uploads.Store(key, s)
	defer func() {
		uploads.Delete(key)
		s.end()
		s.copying.Wait()
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			s.mu.Lock()
			defer s.mu.Unlock()
			return s.err
		case <-tick.C:
			s.mu.Lock()
			idle := time.Since(s.last)
			s.mu.Unlock()
			if idle > uploadIdle {
				return fmt.Errorf("upload idle for %v: no data from the host", idle.Round(time.Second))
			}
		}
	}
}

type uploadReply struct {
	Offset   int64 `json:"offset"`
	MaxChunk int64 `json:"maxChunk"`
	Complete bool  `json:"complete"`
}

func (a *Agent) uploadChunk(w http.ResponseWriter, r *http.Request) {
	id := r.Header.Get("taskuuid")
	v, ok := uploads.Load(uploadKey{a, id})
	if id == "" || !ok {
		replyErr(w, http.StatusNotFound, fmt.Errorf("no upload import waiting for taskuuid %q", id))
		return
	}
	s := v.(*uploadSession)
	s.mu.Lock()
	if s.over {
		s.mu.Unlock()
		replyErr(w, http.StatusNotFound, fmt.Errorf("upload %s is over", id))
		return
	}
	cur := s.w.offset()
	rep := uploadReply{Offset: cur, MaxChunk: a.cfg.MaxBodyBytes}
	if s.busy {
		s.mu.Unlock()
		writeJSON(w, http.StatusConflict, replyBody(rep, fmt.Errorf("upload %s: another chunk is being received", id)))
		return
	}
	if h := r.Header.Get("Upload-Offset"); h != "" {
		off, err := strconv.ParseInt(h, 10, 64)
		if err != nil || off != cur {
			s.mu.Unlock()
			writeJSON(w, http.StatusConflict, replyBody(rep, fmt.Errorf("Upload-Offset %q: resume from offset %d", h, cur)))
			return
		}
	} else if r.ContentLength != 0 {
		s.mu.Unlock()
		replyErr(w, http.StatusBadRequest, errors.New("missing header Upload-Offset"))
		return
	}
	s.last = time.Now()
	rc := http.NewResponseController(w)
	s.busy = true
	s.rc = rc
	s.copying.Add(1)
	s.mu.Unlock()

	n, err := io.Copy(s.w, chunkBody{r: r.Body, rc: rc, s: s})
	_ = rc.SetReadDeadline(time.Time{})

	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.copying.Done()
	s.busy = false
	s.rc = nil
	s.last = time.Now()
	s.job.Add(n)
	rep.Offset = s.w.offset()
	if err != nil {
		if errors.Is(err, ErrImportTooLarge) && !s.over {
			s.err = err
			close(s.done)
			s.over = true
		}
		writeJSON(w, http.StatusOK, replyBody(rep, err))
		return
	}
	if s.over {
		writeJSON(w, http.StatusOK, replyBody(rep, fmt.Errorf("upload %s ended while this chunk was received", id)))
		return
	}
	if strings.EqualFold(r.Header.Get("Upload-Complete"), "true") {
		rep.Complete = true
		close(s.done)
		s.over = true
	}
	reply(w, rep)
}

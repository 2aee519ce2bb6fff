package agent

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"imagestore/agent/api"
	"imagestore/agent/jobs"
	"imagestore/agent/uploads"
	"imagestore/internal/redact"
)

// Handlers of the host-writable boundary (agent/uploads): upload dirs,
// install paths, and the chunks of upload:// imports.

func (a *Agent) allocUploadDir(w http.ResponseWriter, r *http.Request) {
	var req api.AllocUploadDirRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	dir, err := a.uploads.Alloc(time.Duration(req.ExpireHour) * time.Hour)
	if err != nil {
		replyErr(w, http.StatusOK, err)
		return
	}
	reply(w, api.AllocUploadDirReply{UploadDir: dir.Path, Expires: dir.Expires})
}

// allocInstallPath returns zstore://<parent's name>/<new id> for a parent,
// or zstore://<name or new name>/<new id> without one.
func (a *Agent) allocInstallPath(w http.ResponseWriter, r *http.Request) {
	var req api.AllocInstallPathRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	p, err := a.images.AllocInstallPath(r.Context(), req.Parent, req.Name)
	if err != nil {
		replyErr(w, http.StatusOK, err)
		return
	}
	reply(w, api.AllocInstallPathReply{InstallPath: p})
}

// uploadChunk receives one chunk of an upload:// import: 404 when no
// import waits for the taskuuid, 409 (with the offset to resume from) for
// a chunk at the wrong offset or while another is received.
func (a *Agent) uploadChunk(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	res, err := a.uploads.Put(r.Context(), uploads.Chunk{
		ID:              r.Header.Get(api.HeaderTaskUUID),
		Offset:          r.Header.Get(api.HeaderUploadOffset),
		Length:          r.ContentLength,
		Complete:        strings.EqualFold(r.Header.Get(api.HeaderUploadComplete), "true"),
		Body:            r.Body,
		SetReadDeadline: rc.SetReadDeadline,
	})
	writeChunkResult(w, res, err)
}

// writeChunkResult answers an upload chunk.
func writeChunkResult(w http.ResponseWriter, res uploads.ChunkResult, err error) {
	rep := api.UploadReply(res)
	switch {
	case errors.Is(err, uploads.ErrNoUpload):
		replyErr(w, http.StatusNotFound, err)
	case errors.Is(err, uploads.ErrBadChunk):
		replyErr(w, http.StatusBadRequest, err)
	case errors.Is(err, uploads.ErrChunkConflict):
		writeJSON(w, http.StatusConflict, replyBody(rep, err))
	case err != nil:
		writeJSON(w, http.StatusOK, replyBody(rep, err))
	default:
		reply(w, rep)
	}
}

// uploadSessionKind is the job kind of a management-node upload:// import
// receiving its bytes at its upload URL.
const uploadSessionKind = "upload"

// sessionWait bounds how long a chunk that arrives before its upload job
// is ready to receive waits for it.
const sessionWait = 10 * time.Second

// serveUploadSession receives the bytes of a management-node upload://
// import at its upload URL, PathUpload + <imageUuid>/<token>: the URL
// is its own credential (the token is 128 random bits, known only to the
// URL and a.sessions, never the job's id), like an export
// URL, so the browser sends no bearer token. It takes a whole file in one
// PUT or POST, or sequential chunks that state their offset
// (Upload-Offset, Content-Range, or the Ceph agent's X-Slice-Offset) and
// the total size (Upload-Length, Content-Range, X-Image-Size); a chunk at
// another offset gets 409 with the offset to resume from.
func (a *Agent) serveUploadSession(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", "*")
	switch r.Method {
	case http.MethodOptions: // a browser's CORS preflight
		h.Set("Access-Control-Allow-Methods", "PUT, POST, OPTIONS")
		h.Set("Access-Control-Allow-Headers", "*")
		h.Set("Access-Control-Max-Age", "600")
		w.WriteHeader(http.StatusNoContent)
		return
	case http.MethodPut, http.MethodPost:
	default:
		h.Set("Allow", "PUT, POST, OPTIONS")
		replyErr(w, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed on an upload URL (PUT or POST)", r.Method))
		return
	}
	imageUUID, token, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, api.PathUpload), "/")
	id, ok := a.sessionJob(token)
	var job *jobs.Job
	if ok {
		job, ok = a.jobs.Get(id)
	}
	if !ok || job.Info().Kind != uploadSessionKind || job.Info().ImageUUID != imageUUID {
		replyErr(w, http.StatusNotFound, uploads.ErrNoUpload)
		return
	}
	c, err := sessionChunk(r)
	if err != nil {
		replyErr(w, http.StatusBadRequest, err)
		return
	}
	c.ID = id
	c.SetReadDeadline = http.NewResponseController(w).SetReadDeadline
	// The job registers its session as it starts: a first chunk may come
	// before.
	ctx, cancel := context.WithTimeout(r.Context(), sessionWait)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for waiting, _ := a.uploads.Receiving(id); !waiting; waiting, _ = a.uploads.Receiving(id) {
		select {
		case <-ctx.Done():
			replyErr(w, http.StatusNotFound, fmt.Errorf("%w: upload %s is not receiving", uploads.ErrNoUpload, id))
			return
		case <-job.Done():
			replyErr(w, http.StatusNotFound, fmt.Errorf("%w: upload %s is over", uploads.ErrNoUpload, id))
			return
		case <-tick.C:
		}
	}
	res, err := a.uploads.Put(r.Context(), c)
	writeChunkResult(w, res, err)
}

func isSessionToken(s string) bool {
	_, err := hex.DecodeString(s)
	return len(s) == 32 && err == nil
}

// sessionJob returns the id of the upload job whose upload URL holds token.
func (a *Agent) sessionJob(token string) (string, bool) {
	if !isSessionToken(token) {
		return "", false
	}
	a.sessMu.Lock()
	defer a.sessMu.Unlock()
	id, ok := a.sessions[token]
	return id, ok
}

// openSession records an upload URL's token for its upload job; the
// returned func forgets it.
func (a *Agent) openSession(token, id string) (forget func()) {
	a.sessMu.Lock()
	defer a.sessMu.Unlock()
	if a.sessions == nil {
		a.sessions = map[string]string{}
	}
	a.sessions[token] = id
	return func() {
		a.sessMu.Lock()
		defer a.sessMu.Unlock()
		delete(a.sessions, token)
	}
}

// redactUploadURL hides the secret token of an upload URL
// (<base>/imagestore/upload/<imageUuid>/<token>) in s, and what
// redact.URL strips from any URL; other strings are returned as they are.
func redactUploadURL(s string) string {
	if !strings.Contains(s, "://") {
		return s
	}
	u, err := url.Parse(s)
	if err != nil {
		return redact.URL(s)
	}
	if rest, ok := strings.CutPrefix(u.Path, api.PathUpload); ok {
		if image, token, ok := strings.Cut(rest, "/"); ok {
			u.Path, u.RawPath = api.PathUpload+image+"/"+redact.Token(token), ""
		}
	}
	return redact.URL(u.String())
}

// sessionChunk reads a chunk's offset, total size and completeness from
// the headers of the upload forms serveUploadSession accepts. Without an
// offset the body is the whole file.
func sessionChunk(r *http.Request) (uploads.Chunk, error) {
	c := uploads.Chunk{Length: r.ContentLength, Body: r.Body}
	hdr := func(names ...string) string {
		for _, n := range names {
			if v := strings.TrimSpace(r.Header.Get(n)); v != "" {
				return v
			}
		}
		return ""
	}
	num := func(name, v string) (int64, error) {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%w: header %s %q is not a byte count", uploads.ErrBadChunk, name, v)
		}
		return n, nil
	}
	var err error
	if v := hdr(api.HeaderUploadLength, "X-Image-Size"); v != "" {
		if c.Total, err = num("Upload-Length/X-Image-Size", v); err != nil {
			return c, err
		}
	}
	c.Offset = hdr(api.HeaderUploadOffset, "X-Slice-Offset")
	if cr := r.Header.Get("Content-Range"); cr != "" && c.Offset == "" {
		// bytes <first>-<last>/<total or *>
		var first, last int64
		var total string
		if _, err := fmt.Sscanf(cr, "bytes %d-%d/%s", &first, &last, &total); err != nil || first < 0 || last < first {
			return c, fmt.Errorf("%w: Content-Range %q", uploads.ErrBadChunk, cr)
		}
		c.Offset = strconv.FormatInt(first, 10)
		if total != "*" {
			if c.Total, err = num("Content-Range", total); err != nil {
				return c, err
			}
		}
	}
	off := int64(0)
	switch {
	case c.Offset == "":
		// One body with the whole file.
		c.Offset, c.Complete = "0", true
		if c.Total == 0 && c.Length > 0 {
			c.Total = c.Length
		}
	default:
		if off, err = num("offset", c.Offset); err != nil {
			return c, err
		}
	}
	if strings.EqualFold(r.Header.Get(api.HeaderUploadComplete), "true") ||
		c.Total > 0 && c.Length >= 0 && off+c.Length == c.Total {
		c.Complete = true
	}
	return c, nil
}

// importUploadSession answers a management-node upload:// import
// (upload://<imageUuid>/<file>) at once, as the management node expects:
// name, the upload URL in blobsum (absolute, built from the request's
// Host), size 0 and capacity. The bytes then arrive at that URL
// (serveUploadSession) for an upload job of their own, which the
// management node follows through /imagestore/progress/ by imageUuid.
func (a *Agent) importUploadSession(w http.ResponseWriter, r *http.Request, req api.ImportRequest) {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	base := scheme + "://" + r.Host
	var apiID string // the upload job is what import/cancel and canceljob-sync stop
	if m, ok := r.Context().Value(ctxMeta).(*reqMeta); ok {
		apiID = m.api
	}
	a.async(w, r, JobSpec{Kind: "import"}, func(ctx context.Context, job *jobs.Job) (any, error) {
		// The upload URL's token is its only credential; the job's id,
		// which logs, job/list and progress show, is another random value.
		token, id := randomHex(16), "upload-"+randomHex(16)
		forget := a.openSession(token, id)
		run := func(ctx context.Context, uj *jobs.Job) ([]byte, error) {
			img, err := a.ingest.ImportURL(ctx, ingestURLRequest(id, req), uj)
			if err != nil {
				return nil, err
			}
			return replyBody(importReplyFor(img, a.capacity()), nil), nil
		}
		uj, _, err := a.jobs.Submit(jobs.Spec{ID: id, Kind: uploadSessionKind, API: apiID, ImageUUID: req.ImageUUID}, run)
		if err != nil {
			forget()
			return nil, err
		}
		go func() { <-uj.Done(); forget() }()
		return api.ImportReply{Capacity: a.capacity(), Name: req.Name, Blobsum: base + api.PathUpload + req.ImageUUID + "/" + token}, nil
	})
}

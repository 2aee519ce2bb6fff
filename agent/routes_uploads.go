package agent

import (
	"errors"
	"net/http"
	"strings"
	"time"

	"imagestore/agent/api"
	"imagestore/agent/uploads"
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

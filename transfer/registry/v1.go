package registry

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"time"

	"imagestore/blobstore"
	"imagestore/transfer/oci"
	"imagestore/transfer/replicate"
)

// TaskReply is the body of GET /v1/tasks/<id>.
type TaskReply struct {
	ID         string           `json:"id"`
	Kind       string           `json:"kind"`
	Name       string           `json:"name"`
	ImageID    string           `json:"imageId"`
	Status     replicate.Status `json:"status"`
	LastOpTime time.Time        `json:"lastOpTime"`
	BytesDone  int64            `json:"bytesDone"`
	BytesTotal int64            `json:"bytesTotal"`
	BlobsDone  int              `json:"blobsDone"`
	BlobsTotal int              `json:"blobsTotal"`
	Skipped    int              `json:"blobsSkipped"`
	Error      string           `json:"error,omitempty"`
}

type v1Error struct {
	Success bool   `json:"success"`
	Error   string `json:"error"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *Server) serveV1(w http.ResponseWriter, r *http.Request) {
	if s.o.Engine == nil {
		writeJSON(w, http.StatusNotFound, v1Error{Error: "replication is not enabled"})
		return
	}
	switch p := r.URL.Path; {
	case p == "/v1/push" || p == "/v1/pull":
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", "POST")
			writeJSON(w, http.StatusMethodNotAllowed, v1Error{Error: "POST only"})
			return
		}
		var req replicate.Request
		dec := json.NewDecoder(io.LimitReader(r.Body, s.o.MaxBodyBytes))
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, v1Error{Error: "bad request body: " + err.Error()})
			return
		}
		var id string
		var err error
		if p == "/v1/push" {
			id, err = s.o.Engine.Push(r.Context(), req)
		} else {
			id, err = s.o.Engine.Pull(r.Context(), req)
		}
		if err != nil {
			status := http.StatusBadGateway
			switch {
			case errors.Is(err, replicate.ErrBadRequest), errors.Is(err, blobstore.ErrInvalidName):
				status = http.StatusBadRequest
			case errors.Is(err, blobstore.ErrNotFound), errors.Is(err, oci.ErrNotFound):
				status = http.StatusNotFound
			case errors.Is(err, replicate.ErrIncomplete):
				status = http.StatusConflict
			case errors.Is(err, replicate.ErrClosed):
				status = http.StatusServiceUnavailable
			}
			s.log.Warn("replication request refused", "path", p, "image", req.Name+":"+req.ID, "peer", req.Addr, "err", err)
			writeJSON(w, status, v1Error{Error: err.Error()})
			return
		}
		w.Header().Set("X-Sync-Task-ID", id)
		writeJSON(w, http.StatusOK, struct {
			Success bool   `json:"success"`
			TaskID  string `json:"taskId"`
		}{true, id})
	case strings.HasPrefix(p, "/v1/tasks/"):
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", "GET")
			writeJSON(w, http.StatusMethodNotAllowed, v1Error{Error: "GET only"})
			return
		}
		t, err := s.o.Engine.Task(strings.TrimPrefix(p, "/v1/tasks/"))
		if err != nil {
			writeJSON(w, http.StatusNotFound, v1Error{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, TaskReply{ID: t.ID, Kind: t.Kind, Name: t.Name, ImageID: t.ImageID, Status: t.Status,
			LastOpTime: t.LastOpTime, BytesDone: t.BytesDone, BytesTotal: t.BytesTotal, BlobsDone: t.BlobsDone,
			BlobsTotal: t.BlobsTotal, Skipped: t.Skipped, Error: t.Error})
	default:
		writeJSON(w, http.StatusNotFound, v1Error{Error: "no such endpoint"})
	}
}

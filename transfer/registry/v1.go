package registry

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"

	"imagestore/blobstore"
	"imagestore/transfer/oci"
	"imagestore/transfer/replicate"
)

// TaskReply is the body of GET /v1/tasks/<id> (lastOpTime in epoch ms).
type TaskReply = replicate.Wire

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
		if !s.decodeV1(w, r, s.o.MaxBodyBytes, &req) {
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
		status := http.StatusAccepted // a task started; poll /v1/tasks/<id>
		if id == replicate.Existed {
			status = http.StatusOK
		}
		writeJSON(w, status, struct {
			Success bool   `json:"success"`
			TaskID  string `json:"taskId"`
		}{true, id})
	case strings.HasPrefix(p, "/v1/tasks/"):
		id := strings.TrimPrefix(p, "/v1/tasks/")
		switch r.Method {
		case http.MethodGet:
		case http.MethodPut:
			s.reportTask(w, r, id)
			return
		default:
			w.Header().Set("Allow", "GET, PUT")
			writeJSON(w, http.StatusMethodNotAllowed, v1Error{Error: "GET or PUT only"})
			return
		}
		t, err := s.o.Engine.Task(id)
		if err != nil {
			writeJSON(w, http.StatusNotFound, v1Error{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, t.Wire())
	default:
		writeJSON(w, http.StatusNotFound, v1Error{Error: "no such endpoint"})
	}
}

// maxReportBody bounds the body of a task report: a Wire with an error
// text of replicate.MaxReportError bytes, JSON-escaped, fits many times.
const maxReportBody = 64 << 10

// reportTask takes a peer's report of a task it runs with this store
// (PUT /v1/tasks/<id>, body: the task as GET shows it), so the id answers
// here too. The reporter is the connection's host: only the host that
// reported a task first may report it again (403 otherwise).
func (s *Server) reportTask(w http.ResponseWriter, r *http.Request, id string) {
	var rep replicate.Wire
	if !s.decodeV1(w, r, min(s.o.MaxBodyBytes, maxReportBody), &rep) {
		return
	}
	if rep.ID != id {
		writeJSON(w, http.StatusBadRequest, v1Error{Error: "body id " + rep.ID + " is not the path's " + id})
		return
	}
	from, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		from = r.RemoteAddr
	}
	if err := s.o.Engine.Report(rep, from); err != nil {
		status := http.StatusBadRequest
		switch {
		case errors.Is(err, replicate.ErrTaskConflict):
			status = http.StatusConflict
		case errors.Is(err, replicate.ErrNotReporter):
			status = http.StatusForbidden
		case !errors.Is(err, replicate.ErrBadRequest):
			status = http.StatusInternalServerError // not persisted
		}
		s.log.Warn("task report refused", "task", id, "from", from, "err", err)
		writeJSON(w, status, v1Error{Error: err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Success bool `json:"success"`
	}{true})
}

// decodeV1 decodes a /v1 JSON body of at most limit bytes into v; a
// longer body is 413 "too large" (not a JSON error about where it was cut),
// a malformed one 400.
func (s *Server) decodeV1(w http.ResponseWriter, r *http.Request, limit int64, v any) bool {
	err := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit)).Decode(v)
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		writeJSON(w, http.StatusRequestEntityTooLarge, v1Error{Error: fmt.Sprintf("request body too large: more than %d bytes", tooLarge.Limit)})
		return false
	case err != nil:
		writeJSON(w, http.StatusBadRequest, v1Error{Error: "bad request body: " + err.Error()})
		return false
	}
	return true
}

package replicate

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"imagestore/internal/fsutil"
)

// Status of a task, as GET /v1/tasks/<id> reports it.
type Status string

// Task states.
const (
	StatusWaiting Status = "waiting"
	StatusRunning Status = "running"
	StatusSuccess Status = "success"
	StatusFailed  Status = "failed"
)

// Existed is what Push and Pull return instead of a task id when the
// receiving side already holds the whole chain.
const Existed = "existed"

// ErrTaskNotFound: no task with that id (never existed, or pruned).
var ErrTaskNotFound = errors.New("task not found")

// Task is the persisted state of one push or pull. Tokens and CAs are
// never persisted: a task interrupted by a restart fails with a reason.
type Task struct {
	ID         string    `json:"id"`
	Kind       string    `json:"kind"` // push | pull
	Name       string    `json:"name"`
	ImageID    string    `json:"imageId"`
	Addr       string    `json:"addr"`
	Status     Status    `json:"status"`
	Created    time.Time `json:"created"`
	LastOpTime time.Time `json:"lastOpTime"`
	BytesDone  int64     `json:"bytesDone"`
	BytesTotal int64     `json:"bytesTotal"`
	BlobsTotal int       `json:"blobsTotal"`
	BlobsDone  int       `json:"blobsDone"`
	Skipped    int       `json:"blobsSkipped"`
	Error      string    `json:"error,omitempty"`
	// Role is "" for a task this store runs and RolePeer for the record
	// of a task the store at Addr runs with this one (it reports its state
	// here), so the id answers on both stores.
	Role string `json:"role,omitempty"`
	// Heard is when the running store last reported a RolePeer task.
	Heard time.Time `json:"heard,omitzero"`
}

// RolePeer marks the record of a task another store runs with this one.
const RolePeer = "peer"

// Wire is a task as GET /v1/tasks/<id> answers it, and the body with which
// the store running a task reports it to its peer (PUT /v1/tasks/<id>).
// lastOpTime is epoch milliseconds: the management node reads a long.
type Wire struct {
	ID         string `json:"id"`
	Kind       string `json:"kind"`
	Name       string `json:"name"`
	ImageID    string `json:"imageId"`
	Status     Status `json:"status"`
	LastOpTime int64  `json:"lastOpTime"`
	BytesDone  int64  `json:"bytesDone"`
	BytesTotal int64  `json:"bytesTotal"`
	BlobsDone  int    `json:"blobsDone"`
	BlobsTotal int    `json:"blobsTotal"`
	Skipped    int    `json:"blobsSkipped"`
	Role       string `json:"role,omitempty"`
	Error      string `json:"error,omitempty"`
}

// Wire is t as /v1/tasks shows it.
func (t Task) Wire() Wire {
	return Wire{ID: t.ID, Kind: t.Kind, Name: t.Name, ImageID: t.ImageID, Status: t.Status,
		LastOpTime: t.LastOpTime.UnixMilli(), BytesDone: t.BytesDone, BytesTotal: t.BytesTotal,
		BlobsDone: t.BlobsDone, BlobsTotal: t.BlobsTotal, Skipped: t.Skipped, Role: t.Role, Error: t.Error}
}

// validStatus: the four states, exactly (the management node maps the string).
func validStatus(s Status) bool {
	switch s {
	case StatusWaiting, StatusRunning, StatusSuccess, StatusFailed:
		return true
	}
	return false
}

// validTaskID: what a peer may name a task it reports: our ids are 24 hex
// digits; accept the URL-safe alphabet, never "existed".
func validTaskID(id string) bool {
	if id == "" || len(id) > 64 || id == Existed {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') || id[0] == '.' {
			return false
		}
	}
	return true
}

func (t Task) finished() bool { return t.Status == StatusSuccess || t.Status == StatusFailed }

func taskPath(dir, id string) string { return filepath.Join(dir, id+".json") }

// saveTask writes the record atomically and durably (fsutil.WriteFile).
func saveTask(dir string, t Task) error {
	b, err := json.MarshalIndent(t, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFile(taskPath(dir, t.ID), b, 0o600); err != nil {
		return fmt.Errorf("replicate: save task %s: %w", t.ID, err)
	}
	return nil
}

// isTemp says whether a file of the task dir is the temp file of a write a
// crash interrupted: fsutil's ".<id>.json.tmp-*", or ".task-*" of versions
// before it.
func isTemp(name string) bool {
	return strings.HasPrefix(name, ".task-") || strings.HasPrefix(name, ".") && strings.Contains(name, ".json.tmp-")
}

// loadTasks reads every record; unreadable ones are skipped and removed.
func loadTasks(dir string) ([]Task, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []Task
	for _, e := range ents {
		n := e.Name()
		if isTemp(n) {
			os.Remove(filepath.Join(dir, n))
			continue
		}
		if !strings.HasSuffix(n, ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			continue
		}
		var t Task
		if json.Unmarshal(b, &t) != nil || t.ID+".json" != n {
			os.Remove(filepath.Join(dir, n))
			continue
		}
		out = append(out, t)
	}
	return out, nil
}

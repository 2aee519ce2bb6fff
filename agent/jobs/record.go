package jobs

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"time"

	"imagestore/internal/fsutil"
	"imagestore/internal/redact"
)

// A job's record is <Dir>/<32 hex>.json (the hash of its taskuuid); while
// its callback URL holds credentials and is undelivered, the full URL is
// in <Dir>/<32 hex>.callback (0600). Both are written atomically.

// load reads persisted jobs: unfinished ones are failed with ReasonInterrupted.
func (m *Manager) load() error {
	ents, err := os.ReadDir(m.dir)
	if err != nil {
		return err
	}
	now := time.Now()
	records := map[string]bool{}
	for _, e := range ents {
		records[e.Name()] = true
	}
	for _, e := range ents {
		name := e.Name()
		// Leftovers of a crash: temp files of an atomic write (".tmp-*"
		// from older versions, ".<name>.tmp-*" now), and side files whose
		// record is gone.
		if (strings.HasPrefix(name, ".") && strings.Contains(name, ".tmp-")) ||
			(strings.HasSuffix(name, ".callback") && !records[strings.TrimSuffix(name, ".callback")+".json"]) {
			removeFile(filepath.Join(m.dir, name))
			continue
		}
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(m.dir, name))
		if err != nil {
			return err
		}
		var in Info
		if err := json.Unmarshal(b, &in); err != nil || in.ID == "" {
			m.log.Warn("ignoring unreadable job record", "file", name, "err", err)
			continue
		}
		j := &Job{done: make(chan struct{}), info: in}
		// The full URL is in the side file; a record written before
		// redaction existed holds it in CallbackURL: redact it now.
		j.callback = in.CallbackURL
		if b, err := os.ReadFile(m.callbackPath(in.ID)); err == nil {
			j.callback = string(b)
		}
		j.info.CallbackURL = redact.URL(in.CallbackURL)
		rewrite := j.info.CallbackURL != in.CallbackURL
		j.bytesDone.Store(in.Done)
		j.bytesAll.Store(in.Total)
		close(j.done)
		m.jobs[in.ID] = j
		if !in.State.Finished() {
			j.info.State = Failed
			j.info.Error = ReasonInterrupted
			j.info.Ended = &now
			j.info.Result = failureBody(ReasonInterrupted)
			m.log.Warn("job interrupted by restart", "task", in.ID, "kind", in.Kind)
			rewrite = true
		}
		if rewrite {
			if err := m.persist(j); err != nil {
				return err
			}
		}
	}
	return nil
}

func (m *Manager) path(id string) string {
	// The id comes from a request header; hashing it makes any value a safe file name.
	h := sha256.Sum256([]byte(id))
	return filepath.Join(m.dir, hex.EncodeToString(h[:16])+".json")
}

// callbackPath is the side file holding a job's full callback URL.
func (m *Manager) callbackPath(id string) string {
	return strings.TrimSuffix(m.path(id), ".json") + ".callback"
}

func (m *Manager) persist(j *Job) error {
	j.persistMu.Lock()
	defer j.persistMu.Unlock()
	in := j.Info()
	full := j.callbackURL()
	b, err := json.MarshalIndent(in, "", "  ")
	if err != nil {
		return err
	}
	// The side file first, so a record that needs it never lacks it.
	cbPath := m.callbackPath(in.ID)
	if full != in.CallbackURL && !in.Callback.Delivered && !in.Callback.GivenUp {
		if err := fsutil.WriteFile(cbPath, []byte(full), 0o600); err != nil {
			return err
		}
	}
	if err := fsutil.WriteFile(m.path(in.ID), b, 0o600); err != nil {
		return err
	}
	if full == in.CallbackURL || in.Callback.Delivered || in.Callback.GivenUp {
		removeFile(cbPath)
	}
	return nil
}

// removeFile removes a file that may not exist.
func removeFile(path string) {
	_ = os.Remove(path)
}

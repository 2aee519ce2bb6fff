package nbd

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"imagestore/internal/fsutil"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// record is what survives a crash: enough to find our qemu-nbd again and
// to remove the target it served.
type record struct {
	ID         string    `json:"id"`
	PID        int       `json:"pid"`
	Port       int       `json:"port"`
	Path       string    `json:"path"`
	ExportName string    `json:"exportName,omitempty"`
	ReadOnly   bool      `json:"readOnly"`
	Target     bool      `json:"target"` // Path is a file we created
	Desc       string    `json:"desc,omitempty"`
	Started    time.Time `json:"started"`
	Expires    time.Time `json:"expires,omitzero"`
}

func recordOf(p *proc) record {
	return record{
		ID: p.srv.ID, PID: p.cmd.Process.Pid, Port: p.srv.Port, Path: p.srv.Path,
		ExportName: p.srv.ExportName, ReadOnly: p.srv.ReadOnly, Target: p.target,
		Desc: p.srv.Description, Started: p.srv.Started, Expires: p.srv.Expires,
	}
}

func writeRecord(path string, r record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("nbd: record: %w", err)
	}
	// The directory sync matters: without it a crash could lose the
	// record of a running qemu-nbd, which the next start could then not stop.
	if err := fsutil.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("nbd: record: %w", err)
	}
	return nil
}

// parseRecord decodes and sanity-checks a record file. Records are ours,
// but a torn or edited one must not make us kill or delete the wrong thing.
func parseRecord(b []byte) (record, error) {
	var r record
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return record{}, err
	}
	if len(r.ID) != 16 || strings.Trim(r.ID, "0123456789abcdef") != "" {
		return record{}, fmt.Errorf("bad id %q", r.ID)
	}
	if r.PID <= 1 {
		return record{}, fmt.Errorf("bad pid %d", r.PID)
	}
	if !filepath.IsAbs(r.Path) {
		return record{}, fmt.Errorf("bad path %q", r.Path)
	}
	if r.Target {
		// Only ever delete a file named the way CreateTargets names it.
		base := filepath.Base(r.Path)
		if r.ReadOnly || !strings.HasPrefix(r.Desc, "nbd-") || !strings.HasPrefix(base, r.Desc+"-") || !strings.HasSuffix(base, ".qcow2") {
			return record{}, fmt.Errorf("bad target %q for %q", r.Path, r.Desc)
		}
	}
	return r, nil
}

// cleanStale stops qemu-nbd servers a previous run left and removes the
// targets they served. A pid is only signalled if its command line is
// qemu-nbd with our pid file, so a reused pid is never hit.
func (m *Manager) cleanStale() {
	entries, err := os.ReadDir(m.opts.Dir)
	if err != nil {
		m.log.Warn("reading nbd dir", "err", err)
		return
	}
	for _, e := range entries {
		name := e.Name()
		full := filepath.Join(m.opts.Dir, name)
		switch {
		case strings.HasSuffix(name, ".json"):
			m.cleanRecord(full, strings.TrimSuffix(name, ".json"))
		case strings.HasSuffix(name, ".tmp"):
			removeQuiet(full)
		}
	}
	// Pid files whose record is gone (crash between start and record).
	entries, _ = os.ReadDir(m.opts.Dir)
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".pid") {
			m.killIfOurs(readPidFile(filepath.Join(m.opts.Dir, e.Name())), filepath.Join(m.opts.Dir, e.Name()))
			removeQuiet(filepath.Join(m.opts.Dir, e.Name()))
		}
	}
	// The keys of the servers just stopped: no server of ours runs now.
	removePSK(filepath.Join(m.opts.Dir, pskDirName))
}

func (m *Manager) cleanRecord(path, id string) {
	b, err := os.ReadFile(path)
	if err != nil {
		m.log.Warn("reading stale nbd record", "path", path, "err", err)
		return
	}
	r, err := parseRecord(b)
	if err != nil || r.ID != id {
		m.log.Warn("ignoring invalid nbd record", "path", path, "err", err)
		removeQuiet(path)
		return
	}
	pidFile := filepath.Join(m.opts.Dir, id+".pid")
	if m.killIfOurs(r.PID, pidFile) {
		m.log.Warn("stopped stale qemu-nbd", "pid", r.PID, "port", r.Port, "path", r.Path)
	}
	// Only ever delete a target in our target dir (an older version kept
	// targets in host upload dirs; those expire with their dir).
	if r.Target && filepath.Dir(r.Path) == m.opts.TargetDir {
		if err := os.Remove(r.Path); err == nil {
			m.log.Warn("removed stale nbd target", "path", r.Path, "desc", r.Desc)
		} else if !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("removing stale nbd target", "path", r.Path, "err", err)
		}
	}
	removeQuiet(pidFile)
	removeQuiet(path)
}

func readPidFile(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0
	}
	return pid
}

// killIfOurs stops pid if it is a qemu-nbd started with pidFile, and waits
// for it to go. It reports whether it signalled anything.
func (m *Manager) killIfOurs(pid int, pidFile string) bool {
	if pid <= 1 {
		return false
	}
	cl, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !isOurCmdline(cl, pidFile) {
		return false
	}
	_ = syscall.Kill(pid, syscall.SIGTERM) // lets it flush; the target is going anyway, but a chain is not ours to corrupt
	if waitGone(pid, 10*time.Second) {
		return true
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if !waitGone(pid, 10*time.Second) {
		m.log.Error("stale qemu-nbd did not exit", "pid", pid)
	}
	return true
}

// isOurCmdline reports whether a NUL-separated /proc cmdline is qemu-nbd
// with our pid file.
func isOurCmdline(cl []byte, pidFile string) bool {
	args := strings.Split(strings.TrimRight(string(cl), "\x00"), "\x00")
	if len(args) < 2 || filepath.Base(args[0]) != "qemu-nbd" {
		return false
	}
	for _, a := range args[1:] {
		if a == "--pid-file="+pidFile {
			return true
		}
	}
	return false
}

// waitGone polls until pid no longer exists or is a zombie (its parent,
// possibly an old manager in this same process, reaps it).
func waitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		if i := bytes.LastIndexByte(st, ')'); i >= 0 && i+2 < len(st) && st[i+2] == 'Z' {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

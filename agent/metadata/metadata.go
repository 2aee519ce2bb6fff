// Package metadata keeps the image-metadata file the management node
// writes for disaster recovery: newline-separated JSON image inventories,
// one line per image, in <root>/bs_file_info.json, so it travels with the
// store. The management node reads it back when a store is re-added with
// importImages. Every write is atomic (internal/fsutil).
package metadata

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"imagestore/internal/fsutil"
)

// FileName is the metadata file's name, as the management node's own
// store simulator names it.
const FileName = "bs_file_info.json"

// Options configure the service.
type Options struct {
	// Root is the store root; the file is Root/FileName.
	Root   string
	Logger *slog.Logger
}

// Service reads and writes the metadata file of one store.
type Service struct {
	root string
	path string
	log  *slog.Logger
	mu   sync.Mutex // orders read-modify-write cycles
}

// New returns the service over opts.Root.
func New(opts Options) (*Service, error) {
	if opts.Root == "" {
		return nil, errors.New("metadata: no root")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Service{root: opts.Root, path: filepath.Join(opts.Root, FileName), log: log}, nil
}

// Path is the metadata file's absolute path.
func (s *Service) Path() string { return s.path }

// CheckPath compares the management node's backupStoragePath (its url of
// this store) with the root. The file is kept under the root whatever it
// says; a mismatch is logged, since upload dirs and NFS paths depend on
// the two being equal.
func (s *Service) CheckPath(bsPath string) {
	if bsPath != "" && filepath.Clean(bsPath) != filepath.Clean(s.root) {
		s.log.Warn("backupStoragePath differs from the store root; image metadata is kept under the root",
			"backupStoragePath", bsPath, "root", s.root)
	}
}

// Generate creates an empty metadata file if there is none.
func (s *Service) Generate() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := os.Stat(s.path); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("metadata file: %w", err)
	}
	return s.write(nil)
}

// Exists reports whether the metadata file exists.
func (s *Service) Exists() (bool, error) {
	_, err := os.Stat(s.path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, os.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("metadata file: %w", err)
}

// Read returns the file's content ("" when there is none).
func (s *Service) Read() (string, error) {
	b, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("metadata file: %w", err)
	}
	return string(b), nil
}

// Dump writes data. all: data replaces the whole content. Otherwise each
// line of data replaces the lines of the same image (matched on the
// inventory's "uuid") or is appended.
func (s *Service) Dump(data string, all bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	add := lines(data)
	if all {
		return s.write(add)
	}
	old, err := s.readLines()
	if err != nil {
		return err
	}
	replace := map[string]bool{}
	for _, l := range add {
		if u := uuidOf(l); u != "" {
			replace[u] = true
		}
	}
	out := make([]string, 0, len(old)+len(add))
	for _, l := range old {
		if !replace[uuidOf(l)] {
			out = append(out, l)
		}
	}
	return s.write(append(out, add...))
}

// DeleteImage drops the lines of image imageUUID and returns how many.
// A line that is not a JSON object is dropped when it contains the uuid.
func (s *Service) DeleteImage(imageUUID string) (int, error) {
	if imageUUID == "" {
		return 0, errors.New("missing field imageUuid")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old, err := s.readLines()
	if err != nil {
		return 0, err
	}
	out := make([]string, 0, len(old))
	for _, l := range old {
		u := uuidOf(l)
		if u == imageUUID || (u == "" && strings.Contains(l, imageUUID)) {
			continue
		}
		out = append(out, l)
	}
	if len(out) == len(old) {
		return 0, nil
	}
	return len(old) - len(out), s.write(out)
}

func (s *Service) readLines() ([]string, error) {
	b, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("metadata file: %w", err)
	}
	return lines(string(b)), nil
}

func (s *Service) write(ls []string) error {
	var buf bytes.Buffer
	for _, l := range ls {
		buf.WriteString(l)
		buf.WriteByte('\n')
	}
	if err := fsutil.WriteFile(s.path, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("writing metadata file: %w", err)
	}
	return nil
}

// lines splits data into its non-blank lines.
func lines(data string) []string {
	var out []string
	for _, l := range strings.Split(data, "\n") {
		if l = strings.TrimRight(l, "\r"); strings.TrimSpace(l) != "" {
			out = append(out, l)
		}
	}
	return out
}

// uuidOf is the "uuid" of a line holding a JSON object, else "".
func uuidOf(line string) string {
	var v struct {
		UUID string `json:"uuid"`
	}
	if json.Unmarshal([]byte(line), &v) != nil {
		return ""
	}
	return v.UUID
}

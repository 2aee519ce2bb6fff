package nbdtarget

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"imagestore/agent/nbd"
)

// Targets is a group of writable targets made by one CreateTargets.
type Targets struct {
	// Description names the group for CancelTargets and ReleaseForImport
	// (the protocol's nbdDescription).
	Description string
	Servers     []nbd.Server // in the order of the sizes asked for
	// Paths are the targets' entries in the workspace (the protocol's
	// imagePaths), in the same order: <workspace>/<unique base name>.
	Paths []string
}

// CreateTargets creates one empty qcow2 (v3, so a host's zero writes are
// recorded as zero clusters) per size in the private target dir
// (<Dir>/targets, which hosts cannot reach, so nobody can swap a target
// for a symlink between create and serve), serves each writable over NBD,
// and hard-links each into workspace, directly, under its unique name:
// the management node imports a single-volume backup as
// <uploadDir>/<base name>. Imports read the private file, never the
// workspace entry (see TargetPath). The group is removed after ttl unless
// released first.
func (s *Service) CreateTargets(ctx context.Context, workspace string, sizes []int64, ttl time.Duration) (Targets, error) {
	m, err := s.manager()
	if err != nil {
		return Targets{}, err
	}
	if _, _, err := s.uploads.ConfineWorkspace(workspace); err != nil {
		return Targets{}, err
	}
	desc, servers, err := m.CreateTargets(ctx, sizes, ttl)
	if err != nil {
		return Targets{}, err
	}
	g := Targets{Description: desc, Servers: servers}
	for _, srv := range servers {
		p, err := s.uploads.LinkInto(workspace, srv.Path)
		if err != nil {
			s.removeLinks(g.Paths)
			if _, cerr := s.CancelTargets(ctx, desc); cerr != nil {
				s.log.Warn("cancelling nbd targets after a failed link", "desc", desc, "err", cerr)
			}
			return Targets{}, err
		}
		g.Paths = append(g.Paths, p)
	}
	s.mu.Lock()
	s.links[desc] = g.Paths
	s.mu.Unlock()
	return g, nil
}

func (s *Service) removeLinks(paths []string) {
	for _, p := range paths {
		if err := s.uploads.RemoveLink(p); err != nil {
			s.log.Warn("removing an nbd target's workspace entry", "path", p, "err", err)
		}
	}
}

// CancelTargets stops a target group's servers and removes the targets
// and their workspace entries. An unknown (expired, released) group gives
// false and no error, so retries are harmless.
func (s *Service) CancelTargets(ctx context.Context, desc string) (bool, error) {
	m, err := s.manager()
	if err != nil {
		return false, err
	}
	s.mu.Lock()
	links := s.links[desc]
	delete(s.links, desc)
	s.mu.Unlock()
	s.removeLinks(links)
	// Not cancelled with the request: a half-stopped group helps nobody.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
	defer cancel()
	switch err := m.Cancel(sctx, desc); {
	case errors.Is(err, nbd.ErrNotFound):
		return false, nil
	case err != nil:
		return false, err
	}
	return true, nil
}

// ReleaseForImport handles import-backup's processToRelease, which names
// a target group (desc "" = none): stop its servers (qemu-nbd flushes on
// SIGTERM) so the files are complete and nobody writes them while they
// are read. The targets stay until the manager's released retention.
func (s *Service) ReleaseForImport(ctx context.Context, desc string) error {
	if desc == "" {
		return nil
	}
	m, err := s.manager()
	if err != nil {
		return err
	}
	// Not the request's cancellation: a cancelled request must not leave
	// a half-stopped server behind.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
	defer cancel()
	s.mu.Lock()
	delete(s.links, desc) // the entries stay for the import; the upload dir's expiry removes them
	s.mu.Unlock()
	if _, err := m.Release(sctx, desc); err != nil {
		if errors.Is(err, nbd.ErrNotFound) {
			// Already released (a retried import) or expired (then the
			// import fails on the missing file, with a clear error).
			s.log.Warn("processToRelease: no such NBD target group", "desc", desc)
			return nil
		}
		return fmt.Errorf("processToRelease %s: %w", desc, err)
	}
	s.log.Info("nbd targets released for import", "desc", desc)
	return nil
}

// TargetPath reports whether path (optionally file://) names, by its base
// name, a released target (a regular file in the private target dir whose
// server was released by ReleaseForImport), and returns that file's path.
// import-backup reads the private file for the workspace entry the
// management node names (<uploadDir>/<base name of imagePaths[i]>),
// whatever a host put at that entry. The caller confines path to the
// upload dirs first.
func (s *Service) TargetPath(path string) (string, bool) {
	p := path
	if rest, ok := strings.CutPrefix(p, "file://"); ok {
		p = rest
	}
	m, err := s.manager()
	if err != nil {
		return "", false
	}
	return m.TargetPath(filepath.Join(m.TargetDir(), filepath.Base(p)))
}

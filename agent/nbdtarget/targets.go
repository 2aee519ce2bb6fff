package nbdtarget

import (
	"context"
	"errors"
	"fmt"
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
}

// CreateTargets creates one empty qcow2 per size in the private target
// dir (<Dir>/targets, which hosts cannot reach, so nobody can swap a
// target for a symlink between create and serve) and serves each writable
// over NBD. The group is removed after ttl unless released first.
func (s *Service) CreateTargets(ctx context.Context, sizes []int64, ttl time.Duration) (Targets, error) {
	m, err := s.manager()
	if err != nil {
		return Targets{}, err
	}
	desc, servers, err := m.CreateTargets(ctx, sizes, ttl)
	if err != nil {
		return Targets{}, err
	}
	return Targets{Description: desc, Servers: servers}, nil
}

// CancelTargets stops a target group's servers and removes the targets.
// An unknown (expired, released) group gives false and no error, so
// retries are harmless.
func (s *Service) CancelTargets(ctx context.Context, desc string) (bool, error) {
	m, err := s.manager()
	if err != nil {
		return false, err
	}
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

// TargetPath reports whether path (optionally file://) is a released
// target (a regular file in the target dir whose server was released by
// ReleaseForImport), and returns it cleaned. import-backup reads such a
// path although it is outside the upload dirs.
func (s *Service) TargetPath(path string) (string, bool) {
	p := path
	if rest, ok := strings.CutPrefix(p, "file://"); ok {
		p = rest
	}
	m, err := s.manager()
	if err != nil {
		return "", false
	}
	return m.TargetPath(p)
}

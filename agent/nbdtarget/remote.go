package nbdtarget

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"imagestore/agent/jobs"
	"imagestore/agent/nbd"
	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/transfer/nbdserve"
)

// Remote is a stored chain served writable over its own copy-on-write
// overlay (instant restore).
type Remote struct {
	URI         string // nbd://host:port/<export name>
	InstallPath string
	Server      nbd.Server
}

// ServeChain serves img's chain over NBD for a guest to run on (instant
// restore): qemu-nbd serves a fresh copy-on-write qcow2 overlay of its
// own whose backing is the top layer's blob, followed in place through
// the canonical relative backing names. The guest's writes and discards
// land in the overlay; the stored blobs are opened read-only and never
// change. The chain's blobs are held so GC cannot free them while served.
// Every call is a new export with its own overlay (two guests never share
// one); DeleteRemotes stops it and removes the overlay. host is the host
// name the URI carries.
func (s *Service) ServeChain(ctx context.Context, p jobs.Progress, img blobstore.Image, host string) (Remote, error) {
	m, err := s.manager()
	if err != nil {
		return Remote{}, err
	}
	if img.Format != "qcow2" {
		return Remote{}, fmt.Errorf("image %s has format %s; only qcow2 images can be served over NBD", img.Ref, img.Format)
	}
	p.SetImage("", img.InstallPath(), img.Format)
	name := exportName(img)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.forgetDead(m)
	// qemu-nbd follows each layer's backing name blindly: the chain is
	// held and checked (qcow2 only, each layer naming its parent's blob)
	// before it is handed over.
	_, release, err := s.layers.HoldChain(ctx, img.Ref)
	if errors.Is(err, layer.ErrNotQcow2) || errors.Is(err, layer.ErrInvalid) {
		return Remote{}, fmt.Errorf("image %s cannot be served over NBD: %w", img.Ref, err)
	}
	if err != nil {
		return Remote{}, err
	}
	path, err := s.layers.Blobs().BlobPath(img.Blob)
	if errors.Is(err, blobstore.ErrNoLocalPath) {
		// No file to hand qemu-nbd (S3): our own chain server instead.
		srv, stop, err := s.serveOverChainServer(ctx, m, img, name)
		if err != nil {
			release()
			return Remote{}, err
		}
		s.remotes[srv.ID] = &remote{installPath: img.InstallPath(), release: func() { stop(); release() }}
		return remoteOf(host, srv, img.InstallPath()), nil
	}
	if err != nil {
		release()
		return Remote{}, err
	}
	srv, err := m.ServeOverlay(ctx, path, name)
	if err != nil {
		release()
		return Remote{}, err
	}
	s.remotes[srv.ID] = &remote{installPath: img.InstallPath(), release: release}
	return remoteOf(host, srv, img.InstallPath()), nil
}

// chainDir holds the unix sockets of the chain servers (0700, private).
func (s *Service) chainDir() string { return filepath.Join(s.dir, "chains") }

// serveOverChainServer serves img's chain for a store without local
// paths: the chain is opened through our own qcow2 reader (ranged reads
// of the blobs, nothing read whole first, so a guest can boot within
// seconds whatever the chain's size) and served read-only by a
// transfer/nbdserve server on a private unix socket; qemu-nbd serves a
// fresh overlay backed by that socket. qemu never parses a stored byte:
// it sees the raw guest view our reader produces, and its overlay is its
// own. stop closes the chain server and the chain; call it once the
// qemu-nbd server has stopped.
func (s *Service) serveOverChainServer(ctx context.Context, m *nbd.Manager, img blobstore.Image, name string) (nbd.Server, func(), error) {
	start := time.Now()
	chain, closeChain, err := s.layers.OpenChainUnverified(ctx, img.Ref)
	if err != nil {
		return nbd.Server{}, nil, fmt.Errorf("opening the chain of %s: %w", img.Ref, err)
	}
	cs, err := nbdserve.New(nbdserve.Options{
		Export: nbdserve.Export{Name: "chain", Size: chain.VirtualSize(), Data: chain, Extents: chain.Extents},
		Logger: s.log.With("image", img.Ref.String()),
	})
	if err != nil {
		closeChain()
		return nbd.Server{}, nil, err
	}
	// The server lives as long as the export, not the request.
	l, err := cs.ListenUnix(context.WithoutCancel(ctx), s.chainDir())
	if err != nil {
		closeChain()
		return nbd.Server{}, nil, err
	}
	stop := func() {
		if err := l.Close(); err != nil {
			s.log.Warn("closing the chain server", "image", img.Ref.String(), "err", err)
		}
		closeChain()
	}
	srv, err := m.ServeOverlayNBD(ctx, l.URI(), chain.VirtualSize(), name)
	if err != nil {
		stop()
		return nbd.Server{}, nil, err
	}
	s.log.Info("chain served through our own reader (no local blob paths)", "image", img.Ref.String(),
		"layers", len(chain.Images), "virtualSize", chain.VirtualSize(), "socket", l.Socket, "port", srv.Port,
		"startMs", time.Since(start).Milliseconds())
	return srv, stop, nil
}

// forgetDead releases the chains of exports whose server died (mu held).
func (s *Service) forgetDead(m *nbd.Manager) {
	running := map[string]bool{}
	for _, srv := range m.List() {
		running[srv.ID] = true
	}
	for id, rt := range s.remotes {
		if !running[id] {
			rt.release()
			delete(s.remotes, id)
		}
	}
}

func remoteOf(host string, srv nbd.Server, installPath string) Remote {
	return Remote{URI: uri(host, srv.Port, srv.ExportName), InstallPath: installPath, Server: srv}
}

// exportName names an image's export: its name and id when those are safe
// in an NBD URI (no / ? & # % + or spaces: the host parses the URI as a
// URL query parameter), else its id.
func exportName(img blobstore.Image) string {
	ok := func(s string) bool {
		for _, c := range s {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
				return false
			}
		}
		return s != ""
	}
	if ok(img.Name) && ok(img.ID) && len(img.Name)+len(img.ID) < 250 {
		return img.Name + ":" + img.ID
	}
	return "image-" + strings.Map(func(c rune) rune {
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' {
			return c
		}
		return '-'
	}, strings.ToLower(img.ID))
}

func uri(host string, port int, export string) string {
	return "nbd://" + net.JoinHostPort(host, strconv.Itoa(port)) + "/" + export
}

// DeleteRemotes stops the exports matching targetURI (by port and export
// name; the host may be spelled differently; "" = any) and installPath
// ("" = any), removes their overlays and releases their chains. It
// returns how many running servers it stopped; servers that died
// meanwhile are forgotten.
func (s *Service) DeleteRemotes(ctx context.Context, targetURI, installPath string) (int, error) {
	m, err := s.manager()
	if err != nil {
		return 0, err
	}
	port, export := 0, ""
	if targetURI != "" {
		u, err := url.Parse(targetURI)
		if err != nil {
			return 0, fmt.Errorf("targetUri %q: %w", targetURI, err)
		}
		port, _ = strconv.Atoi(u.Port())
		export = strings.TrimPrefix(u.Path, "/")
	}
	// Not cancelled with the request: a half-stopped server helps nobody.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
	defer cancel()
	return s.stopRemotes(sctx, m, func(srv nbd.Server, rt *remote) bool {
		return (targetURI == "" || (srv.Port == port && srv.ExportName == export)) &&
			(installPath == "" || rt.installPath == installPath)
	})
}

func (s *Service) stopRemotes(ctx context.Context, m *nbd.Manager, match func(nbd.Server, *remote) bool) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	running := map[string]nbd.Server{}
	for _, srv := range m.List() {
		running[srv.ID] = srv
	}
	n := 0
	var errs []error
	for id, rt := range s.remotes {
		srv, ok := running[id]
		if ok && !match(srv, rt) {
			continue
		}
		if ok {
			if err := m.Stop(ctx, id); err != nil && !errors.Is(err, nbd.ErrNotFound) {
				errs = append(errs, err)
				continue
			}
			n++
		}
		rt.release()
		delete(s.remotes, id)
	}
	return n, errors.Join(errs...)
}

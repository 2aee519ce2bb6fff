package ingest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
)

// StoreSource is a template source URL, zstore://<bs-host>/<name>/<id>:
// the image name:id (a volume backup) held by the store at bs-host.
type StoreSource struct {
	Host string // as the URL has it, with its port if it names one
	Ref  blobstore.Ref
}

// ParseStoreURL parses zstore://<bs-host>/<name>/<id>.
func ParseStoreURL(u *url.URL) (StoreSource, error) {
	parts := strings.Split(strings.Trim(u.Path, "/"), "/")
	if u.Scheme != "zstore" || u.Host == "" || len(parts) != 2 {
		return StoreSource{}, fmt.Errorf("imgurl %s: want zstore://<bs-host>/<name>/<id>", u.Redacted())
	}
	src := StoreSource{Host: u.Host, Ref: blobstore.Ref{Name: parts[0], ID: parts[1]}}
	if err := src.Ref.Validate(); err != nil {
		return StoreSource{}, fmt.Errorf("imgurl %s: %w", u.Redacted(), err)
	}
	return src, nil
}

// importFromStore makes a template from a volume backup another store
// (or this one) holds: the chain is read here when this store holds it
// (bs-host is this store, or the image was copied here before; name:id
// names one image everywhere), else pulled from bs-host's registry
// (Options.PullChain, verifying req.CACert), then flattened into one
// standalone image recorded as ref (the request's name).
func (s *Service) importFromStore(ctx context.Context, req URLRequest, ref blobstore.Ref, u *url.URL, p jobs.Progress) (blobstore.Image, error) {
	src, err := ParseStoreURL(u)
	if err != nil {
		return blobstore.Image{}, err
	}
	_, err = s.opts.Store.GetImage(ctx, src.Ref)
	switch {
	case err == nil:
		s.log.Info("template from a store image held here", "source", src.Ref.String(), "host", src.Host)
	case !errors.Is(err, blobstore.ErrNotFound):
		return blobstore.Image{}, err
	case s.isThisStore(ctx, src.Host):
		return blobstore.Image{}, fmt.Errorf("imgurl %s: this store has no image %s: %w", u.Redacted(), src.Ref, err)
	case s.opts.PullChain == nil:
		return blobstore.Image{}, fmt.Errorf("imgurl %s: pulling from another store is not configured", u.Redacted())
	default:
		addr := src.Host
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(strings.Trim(addr, "[]"), firstNonEmpty(s.opts.RegistryPort, "8000"))
		}
		s.log.Info("template from another store: pulling the chain", "source", src.Ref.String(), "peer", addr)
		if err := s.opts.PullChain(ctx, addr, req.CACert, src.Ref); err != nil {
			return blobstore.Image{}, fmt.Errorf("pulling %s from %s: %w", src.Ref, addr, err)
		}
	}
	return s.CreateTemplate(ctx, TemplateRequest{
		Task: req.Task, InstallPath: src.Ref.InstallPath(), Name: ref.Name, ID: ref.ID,
		Format: "qcow2", Arch: req.Arch, Desc: req.Desc,
	}, p)
}

// isThisStore reports whether host (a name or an address, maybe with a
// port) is this store: one of this machine's addresses, and the port of
// this store's registry if it names one.
func (s *Service) isThisStore(ctx context.Context, host string) bool {
	if h, port, err := net.SplitHostPort(host); err == nil {
		if port != firstNonEmpty(s.opts.RegistryPort, "8000") {
			return false
		}
		host = h
	}
	host = strings.Trim(host, "[]")
	ips, err := net.DefaultResolver.LookupIPAddr(ctx, host)
	if err != nil {
		return false
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, ip := range ips {
		if ip.IP.IsLoopback() {
			return true
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip.IP) {
				return true
			}
		}
	}
	return false
}

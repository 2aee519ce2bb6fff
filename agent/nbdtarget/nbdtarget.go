// Package nbdtarget serves disks over NBD for KVM hosts: writable qcow2
// targets a host's backup job writes into (exportnbdimage), and stored
// chains served over a private copy-on-write overlay (remotetarget,
// instant restore: the guest writes, the stored blobs never change). The
// qemu-nbd processes themselves are run by agent/nbd.
package nbdtarget

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"imagestore/agent/config"
	"imagestore/agent/nbd"
	"imagestore/agent/uploads"
	"imagestore/layer"
)

// stopTimeout bounds stopping servers on cancel, delete and release.
const stopTimeout = time.Minute

// errUnavailable is Err of a nil Service.
var errUnavailable = errors.New("NBD unavailable on this agent")

// Options configure a Service.
type Options struct {
	Dir    string     // records, pid files, targets/ and tls/, e.g. <store root>/nbd
	Config config.NBD // port range, bind address, client auth
	// HasToken says the agent's protocol requires a bearer token: client
	// auth "auto" then means PSK, and NBD without a key gets a startup
	// warning, since NBD checks no token.
	HasToken bool
	// CertFile and KeyFile are the agent's HTTPS certificate (the leaf,
	// then its issuing CAs) and key. With them and without PSK every
	// server requires x509 TLS: NBD must not be the plaintext way in.
	CertFile, KeyFile string
	Layers            *layer.Store // the store served from
	// Uploads links each writable target into the workspace the request
	// names (the upload dir a KVM host and the management node see).
	Uploads *uploads.Uploads
	Logger  *slog.Logger
}

// Service runs the agent's NBD servers. Without qemu-nbd (or with a
// certificate QEMU cannot serve with) it still exists, and every call
// fails with the reason (Err).
type Service struct {
	mgr     *nbd.Manager
	err     error  // why mgr is nil
	dir     string // Options.Dir
	layers  *layer.Store
	uploads *uploads.Uploads
	log     *slog.Logger

	mu      sync.Mutex
	remotes map[string]*remote  // exports of stored chains, by server id
	links   map[string][]string // workspace entries of target groups, by description
}

// remote is an export of a stored chain; release lets GC free the
// chain's blobs again.
type remote struct {
	installPath string
	release     func()
}

// New starts the NBD manager, which stops servers and removes targets a
// previous run left behind.
func New(opts Options) *Service {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Service{dir: opts.Dir, layers: opts.Layers, uploads: opts.Uploads, log: opts.Logger, remotes: map[string]*remote{}, links: map[string][]string{}}
	psk := opts.Config.PSK(opts.HasToken)
	lo, hi, err := opts.Config.Ports()
	if err == nil && (opts.Layers == nil || opts.Uploads == nil) {
		err = errors.New("nbdtarget: Options.Layers and Options.Uploads are required")
	}
	tlsDir := ""
	if err == nil && opts.CertFile != "" && !psk {
		tlsDir = filepath.Join(opts.Dir, "tls")
		err = prepareTLS(tlsDir, opts.CertFile, opts.KeyFile)
	}
	if err == nil {
		// The chain servers' sockets (a store without local paths) die
		// with the agent; a previous run's are stale.
		if err = os.RemoveAll(s.chainDir()); err == nil {
			err = os.MkdirAll(s.chainDir(), 0o700)
		}
	}
	if err == nil {
		s.mgr, err = nbd.NewManager(nbd.Options{
			Dir: opts.Dir, PortMin: lo, PortMax: hi,
			Bind: opts.Config.Bind, Logger: opts.Logger, TLSDir: tlsDir, PSK: psk,
		})
	}
	if err != nil {
		s.err = fmt.Errorf("NBD unavailable on this agent: %w", err)
		s.log.Warn("nbd disabled", "err", err)
		return s
	}
	// Which credentials NBD clients need: the one thing a KVM host's QEMU
	// must match, so say it once at startup.
	mode := map[bool]string{true: "psk", false: "none"}[psk]
	s.log.Info("nbd ready", "portRange", opts.Config.PortRange, "clientAuth", mode, "x509", tlsDir != "")
	if !psk && opts.HasToken {
		// NBD has no bearer token: TLS (if any) encrypts and proves the
		// server, but any client that reaches a port can use its disk.
		s.log.Warn("nbd.clientAuth is none: anyone who can reach the nbd ports can read (and, for backup targets, write) the served disks; set nbd.clientAuth: psk, or firewall the port range to the KVM hosts",
			"portRange", opts.Config.PortRange, "tls", tlsDir != "")
	}
	return s
}

// prepareTLS lays out dir as QEMU's x509 credentials dir for qemu-nbd:
// server-cert.pem and server-key.pem link to the agent's TLS files, and
// ca-cert.pem holds the issuers that follow the leaf in certFile. QEMU
// checks the server certificate against ca-cert.pem and refuses a CA
// certificate as server certificate, so a self-signed certificate cannot
// serve NBD: tls.cert must be the leaf followed by its issuing CA(s).
func prepareTLS(dir, certFile, keyFile string) error {
	certAbs, err := filepath.Abs(certFile)
	if err != nil {
		return err
	}
	keyAbs, err := filepath.Abs(keyFile)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(certAbs)
	if err != nil {
		return fmt.Errorf("nbd tls: %w", err)
	}
	// Only CERTIFICATE blocks count: the first is the leaf, the rest its
	// issuers (a key or parameters block in the file is not the leaf).
	var issuers []byte
	certs := 0
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		if certs > 0 {
			issuers = append(issuers, pem.EncodeToMemory(blk)...)
		}
		certs++
	}
	if len(issuers) == 0 {
		return fmt.Errorf("nbd tls: %s holds no issuing CA certificate after the server certificate; QEMU needs it (append the CA to tls.cert) to serve NBD over TLS", certFile)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("nbd tls: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("nbd tls: %w", err)
	}
	if err := os.Symlink(certAbs, filepath.Join(dir, "server-cert.pem")); err != nil {
		return fmt.Errorf("nbd tls: %w", err)
	}
	if err := os.Symlink(keyAbs, filepath.Join(dir, "server-key.pem")); err != nil {
		return fmt.Errorf("nbd tls: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca-cert.pem"), issuers, 0o600); err != nil {
		return fmt.Errorf("nbd tls: %w", err)
	}
	return nil
}

// Err says why NBD is unavailable; nil when it is ready.
func (s *Service) Err() error {
	_, err := s.manager()
	return err
}

func (s *Service) manager() (*nbd.Manager, error) {
	if s == nil {
		return nil, errUnavailable
	}
	if s.mgr == nil {
		return nil, s.err
	}
	return s.mgr, nil
}

// Servers lists the running servers, by port (none when unavailable).
func (s *Service) Servers() []nbd.Server {
	m, err := s.manager()
	if err != nil {
		return nil
	}
	return m.List()
}

// Expire stops target groups past their expiry and removes their
// workspace entries.
func (s *Service) Expire(ctx context.Context, now time.Time) {
	m, err := s.manager()
	if err != nil {
		return
	}
	if m.Expire(ctx, now) == 0 {
		return
	}
	live := map[string]bool{}
	for _, srv := range m.List() {
		live[srv.Description] = true
	}
	var gone []string
	s.mu.Lock()
	for desc, links := range s.links {
		if !live[desc] {
			gone = append(gone, links...)
			delete(s.links, desc)
		}
	}
	s.mu.Unlock()
	s.removeLinks(gone)
}

// Close stops every server and releases the chains held.
func (s *Service) Close() {
	m, err := s.manager()
	if err != nil {
		return
	}
	if err := m.Close(); err != nil {
		s.log.Warn("closing nbd servers", "err", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, rt := range s.remotes {
		rt.release()
		delete(s.remotes, id)
	}
}

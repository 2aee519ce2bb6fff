// Package hostxfer moves volume data between the store and KVM hosts over
// SSH/SFTP: Pull reads one qcow2 layer from a host and commits it as a
// canonical layer on its parent; Write flattens a stored chain into one
// image on a host and proves by reading it back that the host holds what
// was sent. One Service keeps the SSH connection pool (shared with sftp://
// imports), remembers hosts that refused a second connection, and counts
// the bytes read from and written to hosts.
package hostxfer

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent/images"
	"imagestore/layer"
	"imagestore/transfer/sshfs"
)

// Options configure a Service.
type Options struct {
	// Layers commits pulled layers and opens the chains written to hosts
	// (required).
	Layers *layer.Store
	// Images looks up the parents and images requests name (required).
	Images *images.Service
	// KnownHostsFile checks the host key of a request without a
	// hostKeyFingerprint; "" refuses such requests.
	KnownHostsFile string
	// Parallelism is the streams of a pull that asks for none (the
	// agent's parallelismDegree); default 1. A pull uses at most
	// MaxParallelism.
	Parallelism int
	// Registerer gets the host read and written byte counters
	// (imagestore_host_read_bytes_total, imagestore_host_written_bytes_total);
	// nil: they are kept but not registered.
	Registerer prometheus.Registerer
	// Ingested and Exported, if set, count the host bytes a pull stored
	// and the bytes a write wrote (the agent's store-wide counters).
	Ingested, Exported prometheus.Counter
	// Pool, if set, is the SSH connection pool to use (and the caller's to
	// close); default: a pool of the Service's own, closed by Close.
	Pool   *sshfs.Pool
	Logger *slog.Logger // default: discard
}

// Service runs host transfers. It is safe for concurrent use.
type Service struct {
	layers         *layer.Store
	images         *images.Service
	knownHostsFile string
	parallelism    int
	pool           *sshfs.Pool
	ownPool        bool
	log            *slog.Logger
	reg            prometheus.Registerer
	readBytes      prometheus.Counter
	wroteBytes     prometheus.Counter
	ingested       prometheus.Counter // may be nil
	exported       prometheus.Counter // may be nil

	// oneLane holds the hosts (address and user) that refused a pull's
	// extra connection, and when: their pulls use one connection for
	// laneRefusalMemory, rather than each paying a failed dial.
	mu      sync.Mutex
	oneLane map[string]time.Time
}

// laneRefusalMemory is how long a host that refused an extra connection
// gets pulled over one.
const laneRefusalMemory = 10 * time.Minute

// New returns a Service, its counters registered on opts.Registerer.
func New(opts Options) (*Service, error) {
	if opts.Layers == nil || opts.Images == nil {
		return nil, errors.New("hostxfer: Options.Layers and Options.Images are required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Service{
		layers: opts.Layers, images: opts.Images, knownHostsFile: opts.KnownHostsFile,
		parallelism: max(opts.Parallelism, 1), pool: opts.Pool, log: log, reg: opts.Registerer,
		ingested: opts.Ingested, exported: opts.Exported, oneLane: map[string]time.Time{},
		readBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_host_read_bytes_total",
			Help: "Bytes read from KVM hosts over SFTP (qcow2 metadata and allocated clusters, retries included).",
		}),
		wroteBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_host_written_bytes_total",
			Help: "Bytes written to KVM hosts over SFTP by writetohost.",
		}),
	}
	if s.reg != nil {
		if err := s.reg.Register(s.readBytes); err != nil {
			return nil, fmt.Errorf("hostxfer: %w", err)
		}
		if err := s.reg.Register(s.wroteBytes); err != nil {
			s.reg.Unregister(s.readBytes)
			return nil, fmt.Errorf("hostxfer: %w", err)
		}
	}
	if s.pool == nil {
		s.pool, s.ownPool = sshfs.NewPool(sshfs.PoolOptions{Logger: log, Sessions: 2}), true
	}
	return s, nil
}

// Pool is the SSH connection pool (sftp:// imports share it).
func (s *Service) Pool() *sshfs.Pool { return s.pool }

// Close closes the Service's own pool (after the transfers that use it
// ended) and unregisters its counters.
func (s *Service) Close() error {
	var err error
	if s.ownPool {
		err = s.pool.Close()
	}
	if s.reg != nil {
		s.reg.Unregister(s.readBytes)
		s.reg.Unregister(s.wroteBytes)
	}
	return err
}

// Login is how to reach and log in to a host. Password and PrivateKey are
// secrets: never logged, never echoed.
type Login struct {
	Hostname           string
	Port               int // 0: 22
	Username           string
	Password           string
	PrivateKey         string // OpenSSH/PEM text
	HostKeyFingerprint string // "SHA256:…" pin; "": Options.KnownHostsFile
}

// host builds the connection target. Host keys are checked against the pin
// if given, else the configured known_hosts file; with neither the request
// is refused (there is no "accept any key" mode).
func (s *Service) host(l Login) (sshfs.Host, error) {
	if l.HostKeyFingerprint == "" && s.knownHostsFile == "" {
		return sshfs.Host{}, fmt.Errorf("%w: no hostKeyFingerprint given and knownHostsFile is not configured; refusing to trust %s's host key blindly", sshfs.ErrHostKey, l.Hostname)
	}
	port := l.Port
	if port == 0 {
		port = 22
	}
	return sshfs.Host{
		Addr:           net.JoinHostPort(l.Hostname, strconv.Itoa(port)),
		User:           l.Username,
		Password:       l.Password,
		PrivateKey:     []byte(l.PrivateKey),
		KnownHostsFile: s.knownHostsFile,
		Fingerprint:    l.HostKeyFingerprint,
	}, nil
}

// hostErr adds what the operator should check to the sshfs sentinels.
func hostErr(h sshfs.Host, path string, err error) error {
	switch {
	case errors.Is(err, sshfs.ErrHostKey):
		return fmt.Errorf("host key of %s not trusted (check knownHostsFile or hostKeyFingerprint): %w", h.Addr, err)
	case errors.Is(err, sshfs.ErrAuth):
		return fmt.Errorf("SSH login as %s@%s refused (check username, password or privateKey): %w", h.User, h.Addr, err)
	case errors.Is(err, sshfs.ErrUnreachable):
		return fmt.Errorf("cannot reach %s over SSH: %w", h.Addr, err)
	}
	return fmt.Errorf("%s:%s: %w", h.Addr, path, err)
}

func laneKey(h sshfs.Host) string { return h.Addr + "\x00" + h.User }

// lanes returns how many connections a pull from h may use.
func (s *Service) lanes(h sshfs.Host) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.oneLane[laneKey(h)]; ok {
		if time.Since(t) < laneRefusalMemory {
			return 1
		}
		delete(s.oneLane, laneKey(h))
	}
	return MaxLanes
}

// laneRefused remembers that h refused an extra connection.
func (s *Service) laneRefused(h sshfs.Host) {
	s.mu.Lock()
	s.oneLane[laneKey(h)] = time.Now()
	s.mu.Unlock()
}

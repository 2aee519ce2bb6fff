package agent

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/transfer/sshfs"
)

// Host transfers: the agent reads qcow2 layers from, and writes flattened
// chains to, KVM hosts over SSH/SFTP (docs/agent-protocol.md "Host transfers").

// hostFields are the SSH fields shared by the host transfer commands.
// Password and PrivateKey are secrets: never logged, never echoed.
type hostFields struct {
	Hostname           string `json:"hostname"`
	SSHPort            int    `json:"sshPort"`
	Username           string `json:"username"`
	Password           string `json:"password"`
	PrivateKey         string `json:"privateKey"`
	HostKeyFingerprint string `json:"hostKeyFingerprint"`
}

func (h *hostFields) validate() error {
	switch {
	case h.Hostname == "":
		return missing("hostname")
	case h.Username == "":
		return missing("username")
	case h.Password == "" && h.PrivateKey == "":
		return errors.New("missing field password or privateKey")
	case h.SSHPort < 0 || h.SSHPort > 65535:
		return fmt.Errorf("sshPort %d out of range", h.SSHPort)
	case h.HostKeyFingerprint != "" && !strings.HasPrefix(h.HostKeyFingerprint, "SHA256:"):
		return fmt.Errorf("hostKeyFingerprint %q: want the SHA256:... form ssh-keygen -lf prints", h.HostKeyFingerprint)
	}
	return nil
}

// sshHost builds the connection target. Host keys are checked against the
// pin if given, else the configured known_hosts file; with neither the
// request is refused (there is no "accept any key" mode).
func (a *Agent) sshHost(h hostFields) (sshfs.Host, error) {
	if h.HostKeyFingerprint == "" && a.cfg.KnownHostsFile == "" {
		return sshfs.Host{}, fmt.Errorf("%w: no hostKeyFingerprint given and knownHostsFile is not configured; refusing to trust %s's host key blindly", sshfs.ErrHostKey, h.Hostname)
	}
	port := h.SSHPort
	if port == 0 {
		port = 22
	}
	return sshfs.Host{
		Addr:           net.JoinHostPort(h.Hostname, strconv.Itoa(port)),
		User:           h.Username,
		Password:       h.Password,
		PrivateKey:     []byte(h.PrivateKey),
		KnownHostsFile: a.cfg.KnownHostsFile,
		Fingerprint:    h.HostKeyFingerprint,
	}, nil
}

// hostState is the per-agent state of host transfers: the SSH connection
// pool (reused across jobs) and the metrics.
type hostState struct {
	pool      *sshfs.Pool
	readBytes prometheus.Counter
	wrote     prometheus.Counter
	// oneLane holds the hosts (address and user) that refused a pull's
	// extra connection, and when: their pulls use one connection for
	// laneRefusalMemory, rather than each paying a failed dial.
	oneLane sync.Map // string → time.Time
}

// laneRefusalMemory is how long a host that refused an extra connection
// gets pulled over one.
const laneRefusalMemory = 10 * time.Minute

func laneKey(h sshfs.Host) string { return h.Addr + "\x00" + h.User }

// pullLanes returns how many connections a pull from h may use.
func (s *hostState) pullLanes(h sshfs.Host) int {
	if v, ok := s.oneLane.Load(laneKey(h)); ok && time.Since(v.(time.Time)) < laneRefusalMemory {
		return 1
	}
	return pullLanes
}

var hostStates sync.Map // *Agent → *hostState

// hosts returns the agent's host-transfer state, creating it (and
// registering its metrics) on first use.
func (a *Agent) hosts() *hostState {
	if v, ok := hostStates.Load(a); ok {
		return v.(*hostState)
	}
	s := &hostState{
		pool: sshfs.NewPool(sshfs.PoolOptions{Logger: a.log, Sessions: 2}),
		readBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_host_read_bytes_total",
			Help: "Bytes read from KVM hosts over SFTP (qcow2 metadata and allocated clusters, retries included).",
		}),
		wrote: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagestore_host_written_bytes_total",
			Help: "Bytes written to KVM hosts over SFTP by writetohost.",
		}),
	}
	v, loaded := hostStates.LoadOrStore(a, s)
	if loaded {
		_ = s.pool.Close()
		return v.(*hostState)
	}
	a.reg.MustRegister(s.readBytes, s.wrote)
	return s
}

// closeHosts closes the agent's SSH connections (tests; the daemon keeps
// them until exit, idle ones close by themselves).
func (a *Agent) closeHosts() {
	if v, ok := hostStates.LoadAndDelete(a); ok {
		s := v.(*hostState)
		_ = s.pool.Close()
		a.reg.Unregister(s.readBytes)
		a.reg.Unregister(s.wrote)
	}
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

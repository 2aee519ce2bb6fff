// Package sshtest starts a real OpenSSH sshd on a loopback port for tests.
//
// Each Server has its own freshly generated ed25519 host key and client key,
// its own sshd_config, pid file and authorized_keys in a temp directory, and
// logs in as the current user (root in CI). The sftp subsystem is
// internal-sftp so no sftp-server path is needed.
//
// Password authentication is enabled in the server but Server.Password is
// always empty: setting a known password would mean creating a system user
// (useradd/chpasswd), which is invasive and races between test processes.
// Tests of "wrong password" therefore use User with any password, which sshd
// refuses cleanly (the account has no usable password and PAM is off).
package sshtest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"imagestore/internal/lockedbuf"
)

// SSHDPath is the OpenSSH server binary the tests run.
const SSHDPath = "/usr/sbin/sshd"

// Server is a running sshd. All fields are read-only after Start.
type Server struct {
	Addr           string // "127.0.0.1:port"
	Host           string // "127.0.0.1"
	Port           int
	User           string // the current user, authorized by PrivateKey
	Password       string // always "" (see package doc); password auth is refused
	PrivateKey     []byte // OpenSSH PEM of the authorized client key
	Signer         ssh.Signer
	HostKey        ssh.PublicKey
	KnownHostsFile string // one line: "[127.0.0.1]:port ssh-ed25519 AAAA..."
	Fingerprint    string // "SHA256:..." of HostKey
	Dir            string // temp directory holding config, keys and logs

	cmd  *exec.Cmd
	log  *lockedbuf.Buffer
	done chan struct{}
}

// Log returns what sshd wrote to stderr so far.
func (s *Server) Log() string { return s.log.String() }

// ClientConfig returns an ssh.ClientConfig that authenticates with the
// server's client key and verifies its host key.
func (s *Server) ClientConfig() *ssh.ClientConfig {
	return &ssh.ClientConfig{
		User:            s.User,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(s.Signer)},
		HostKeyCallback: ssh.FixedHostKey(s.HostKey),
		Timeout:         10 * time.Second,
	}
}

// KillConnections kills every sshd process serving a connection (all
// descendants of the listener), leaving the listener running: clients see
// their connection drop.
func (s *Server) KillConnections(t testing.TB) {
	t.Helper()
	for _, pid := range descendants(s.cmd.Process.Pid) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// descendants lists the transitive children of pid. Connection children call
// setsid, so the process group alone does not find them.
func descendants(root int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// "pid (comm) state ppid ..."; comm may hold spaces and parens.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 2 {
			continue
		}
		ppid, err := strconv.Atoi(f[1])
		if err != nil {
			continue
		}
		children[ppid] = append(children[ppid], pid)
	}
	var out []int
	queue := []int{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// Start runs sshd and returns once it completes a real SSH handshake. It is
// stopped (with every connection child) when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	waitForSSHD(t)
	// sshd refuses to start without its privilege separation directory.
	if os.Geteuid() == 0 {
		_ = os.MkdirAll("/run/sshd", 0o755)
	}

	u, err := user.Current()
	if err != nil {
		t.Fatalf("sshtest: current user: %v", err)
	}
	dir := t.TempDir()
	// The temp dir is only for us; sshd with StrictModes no does not care,
	// but keep key files private anyway.
	hostPub, hostPEM := genKey(t)
	clientPub, clientPEM := genKey(t)
	writeFile(t, filepath.Join(dir, "host_ed25519"), hostPEM, 0o600)
	writeFile(t, filepath.Join(dir, "authorized_keys"), ssh.MarshalAuthorizedKey(clientPub), 0o600)
	signer, err := ssh.ParsePrivateKey(clientPEM)
	if err != nil {
		t.Fatalf("sshtest: parse client key: %v", err)
	}

	s := &Server{
		Host:        "127.0.0.1",
		User:        u.Username,
		PrivateKey:  clientPEM,
		Signer:      signer,
		HostKey:     hostPub,
		Fingerprint: ssh.FingerprintSHA256(hostPub),
		Dir:         dir,
	}

	var lastErr error
	for attempt := 0; attempt < 10; attempt++ {
		port := freePort(t)
		lastErr = s.launch(t, port)
		if lastErr == nil {
			return s
		}
	}
	t.Fatalf("sshtest: sshd did not start: %v", lastErr)
	return nil
}

// launch starts sshd on port; a bind race with another process makes sshd
// exit, which is reported as an error so Start can retry on a new port.
func (s *Server) launch(t testing.TB, port int) error {
	t.Helper()
	dir := s.Dir
	s.Port = port
	s.Addr = net.JoinHostPort(s.Host, strconv.Itoa(port))
	s.KnownHostsFile = filepath.Join(dir, "known_hosts")
	line := knownhosts.Line([]string{knownhosts.Normalize(s.Addr)}, s.HostKey)
	writeFile(t, s.KnownHostsFile, []byte(line+"\n"), 0o600)

	cfg := fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s
PidFile %s
AuthorizedKeysFile %s
PermitRootLogin yes
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication yes
PermitEmptyPasswords no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
MaxStartups 200
MaxSessions 100
MaxAuthTries 10
LoginGraceTime 60
ClientAliveInterval 0
UseDNS no
LogLevel VERBOSE
`, port, filepath.Join(dir, "host_ed25519"), filepath.Join(dir, "sshd.pid"),
		filepath.Join(dir, "authorized_keys"))
	cfgPath := filepath.Join(dir, "sshd_config")
	writeFile(t, cfgPath, []byte(cfg), 0o600)

	s.log = &lockedbuf.Buffer{}
	cmd := exec.Command(SSHDPath, "-D", "-e", "-f", cfgPath)
	cmd.Stdout = s.log
	cmd.Stderr = s.log
	// Its own process group keeps terminal signals to the test away from it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("sshtest: start sshd: %v", err)
	}
	s.cmd = cmd
	s.done = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(s.done)
	}()

	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-s.done:
			return fmt.Errorf("sshd exited: %s", s.log.String())
		default:
		}
		err := s.handshake()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			s.stop()
			t.Fatalf("sshtest: sshd on %s not ready after 30s: %v\nsshd log:\n%s", s.Addr, err, s.log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() {
		s.stop()
		if t.Failed() {
			t.Logf("sshtest: sshd %s log:\n%s", s.Addr, s.log.String())
		}
	})
	return nil
}

func (s *Server) handshake() error {
	c, err := ssh.Dial("tcp", s.Addr, s.ClientConfig())
	if err != nil {
		return err
	}
	return c.Close()
}

func (s *Server) stop() {
	pid := s.cmd.Process.Pid
	// Connection children outlive the listener and left its process group
	// (setsid), and once it exits they are reparented out of reach. So freeze
	// the listener (no new forks), kill its descendants, then kill it.
	_ = syscall.Kill(pid, syscall.SIGSTOP)
	for _, c := range descendants(pid) {
		_ = syscall.Kill(c, syscall.SIGKILL)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	<-s.done
}

// waitForSSHD waits for a background package install to provide sshd.
func waitForSSHD(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if _, err := os.Stat(SSHDPath); err == nil {
			return
		} else if !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			t.Fatalf("sshtest: %s unavailable (install openssh-server): %v", SSHDPath, err)
		}
		time.Sleep(time.Second)
	}
}

func genKey(t testing.TB) (ssh.PublicKey, []byte) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatalf("sshtest: generate key: %v", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatalf("sshtest: marshal key: %v", err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatalf("sshtest: public key: %v", err)
	}
	return sshPub, pem.EncodeToMemory(block)
}

// GenKey returns a fresh ed25519 key pair (public key, OpenSSH PEM private
// key) for tests that need a key the server does not know.
func GenKey(t testing.TB) (ssh.PublicKey, []byte) {
	t.Helper()
	return genKey(t)
}

func writeFile(t testing.TB, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("sshtest: listen: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

package sshtest

import (
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

func TestStartHandshakeAndSFTPSubsystem(t *testing.T) {
	s := Start(t)
	cb, err := knownhosts.New(s.KnownHostsFile)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(s.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ssh.Dial("tcp", s.Addr, &ssh.ClientConfig{
		User:            s.User,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: cb,
		Timeout:         10 * time.Second,
	})
	if err != nil {
		t.Fatalf("dial with known_hosts: %v", err)
	}
	defer c.Close()
	if got := ssh.FingerprintSHA256(s.HostKey); got != s.Fingerprint {
		t.Fatalf("fingerprint %s, want %s", got, s.Fingerprint)
	}
	sess, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	if err := sess.RequestSubsystem("sftp"); err != nil {
		t.Fatalf("sftp subsystem: %v", err)
	}
}

func TestRefusals(t *testing.T) {
	s := Start(t)
	_, otherKey := GenKey(t)
	other, err := ssh.ParsePrivateKey(otherKey)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		auth ssh.AuthMethod
	}{
		{"unknown key", ssh.PublicKeys(other)},
		{"password", ssh.Password("not-the-password")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := s.ClientConfig()
			cfg.Auth = []ssh.AuthMethod{tc.auth}
			c, err := ssh.Dial("tcp", s.Addr, cfg)
			if err == nil {
				c.Close()
				t.Fatal("login succeeded")
			}
		})
	}
	if s.Password != "" {
		t.Fatalf("Password = %q, want empty (not settable)", s.Password)
	}
}

// Each parallel subtest runs its own sshd; the handshake against its own host
// key proves no two of them ended up sharing a port.
func TestParallelServersAndKill(t *testing.T) {
	for i := 0; i < 4; i++ {
		t.Run("", func(t *testing.T) {
			t.Parallel()
			s := Start(t)
			c, err := ssh.Dial("tcp", s.Addr, s.ClientConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s.KillConnections(t)
			done := make(chan error, 1)
			go func() { done <- c.Wait() }()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				t.Fatal("connection survived KillConnections")
			}
			// The listener still serves new connections.
			c2, err := ssh.Dial("tcp", s.Addr, s.ClientConfig())
			if err != nil {
				t.Fatalf("redial after kill: %v", err)
			}
			c2.Close()
		})
	}
}

func TestCleanupStopsSSHD(t *testing.T) {
	var s *Server
	t.Run("inner", func(t *testing.T) {
		s = Start(t)
		c, err := ssh.Dial("tcp", s.Addr, s.ClientConfig())
		if err != nil {
			t.Fatal(err)
		}
		// Left open on purpose: cleanup must kill its serving process too.
		t.Cleanup(func() { c.Close() })
	})
	select {
	case <-s.done:
	default:
		t.Fatal("sshd still running after cleanup")
	}
	conn, err := net.DialTimeout("tcp", s.Addr, 2*time.Second)
	if err == nil {
		// Only another process reusing the port could accept here; ours
		// must not answer with its banner.
		conn.SetReadDeadline(time.Now().Add(time.Second))
		b, _ := io.ReadAll(io.LimitReader(conn, 64))
		conn.Close()
		if len(b) > 0 {
			t.Logf("port %s reused by another listener: %q", s.Addr, b)
		}
	}
}

package sshfs

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"imagestore/internal/testwait"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// passwordServer is an in-process SSH server that accepts exactly one
// user/password and nothing else (no public key, no keyboard-interactive),
// serving SFTP over the real filesystem. It exists because the OpenSSH test
// server (sshtest) cannot accept a password without a real system account.
type passwordServer struct {
	Addr        string
	User        string
	Password    string
	Fingerprint string // "SHA256:..." of the host key

	attempts   atomic.Int64 // PasswordCallback calls
	accepted   atomic.Int64 // PasswordCallback calls that succeeded
	keepalives atomic.Int64 // keepalive@openssh.com requests answered

	ln     net.Listener
	cfg    *ssh.ServerConfig
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

func startPasswordServer(t *testing.T, user, password string) *passwordServer {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	s := &passwordServer{
		User:        user,
		Password:    password,
		Fingerprint: ssh.FingerprintSHA256(signer.PublicKey()),
		conns:       map[net.Conn]struct{}{},
	}
	s.cfg = &ssh.ServerConfig{
		PasswordCallback: func(c ssh.ConnMetadata, pw []byte) (*ssh.Permissions, error) {
			s.attempts.Add(1)
			okUser := subtle.ConstantTimeCompare([]byte(c.User()), []byte(s.User)) == 1
			okPass := subtle.ConstantTimeCompare(pw, []byte(s.Password)) == 1
			if !okUser || !okPass {
				return nil, errors.New("password rejected")
			}
			s.accepted.Add(1)
			return nil, nil
		},
	}
	s.cfg.AddHostKey(signer)

	s.ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = s.ln.Addr().String()
	s.wg.Add(1)
	go s.acceptLoop(t)
	t.Cleanup(func() { s.close(t) })
	return s
}

func (s *passwordServer) acceptLoop(t *testing.T) {
	defer s.wg.Done()
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			return // listener closed
		}
		if !s.track(nc) {
			_ = nc.Close()
			return
		}
		s.wg.Add(1)
		go s.serveConn(t, nc)
	}
}

// track registers nc so close can cut it; false once the server is closing.
func (s *passwordServer) track(nc net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[nc] = struct{}{}
	return true
}

func (s *passwordServer) untrack(nc net.Conn) {
	s.mu.Lock()
	delete(s.conns, nc)
	s.mu.Unlock()
}

func (s *passwordServer) serveConn(t *testing.T, nc net.Conn) {
	defer s.wg.Done()
	defer s.untrack(nc)
	defer nc.Close()
	// Generous: only bounds a handshake a broken client never finishes.
	_ = nc.SetDeadline(time.Now().Add(60 * time.Second))
	sc, chans, reqs, err := ssh.NewServerConn(nc, s.cfg)
	if err != nil {
		return // refused credentials, or the client rejected our host key
	}
	_ = nc.SetDeadline(time.Time{})
	defer sc.Close()

	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for req := range reqs {
			if req.Type == "keepalive@openssh.com" {
				s.keepalives.Add(1)
				_ = req.Reply(true, nil) // no-op unless WantReply
				continue
			}
			_ = req.Reply(false, nil)
		}
	}()

	for nch := range chans {
		if nch.ChannelType() != "session" {
			_ = nch.Reject(ssh.UnknownChannelType, "only session channels")
			continue
		}
		ch, chReqs, err := nch.Accept()
		if err != nil {
			t.Errorf("accept session channel: %v", err)
			continue
		}
		s.wg.Add(1)
		go s.serveSession(t, ch, chReqs)
	}
	// chans is closed once the connection is gone.
}

func (s *passwordServer) serveSession(t *testing.T, ch ssh.Channel, reqs <-chan *ssh.Request) {
	defer s.wg.Done()
	defer ch.Close()
	var serving sync.WaitGroup
	defer serving.Wait()
	started := false
	for req := range reqs {
		var sub struct{ Name string }
		if req.Type != "subsystem" || started ||
			ssh.Unmarshal(req.Payload, &sub) != nil || sub.Name != "sftp" {
			_ = req.Reply(false, nil)
			continue
		}
		// pkg/sftp's server answers at most 32 KiB per read, below the
		// pool's 255 KiB requests (OpenSSH answers 256 KiB): the reads
		// below also prove that short answers inside the file are read on.
		srv, err := sftp.NewServer(ch)
		if err != nil {
			t.Errorf("sftp.NewServer: %v", err)
			_ = req.Reply(false, nil)
			continue
		}
		started = true
		_ = req.Reply(true, nil)
		serving.Add(1)
		go func() {
			defer serving.Done()
			if err := srv.Serve(); err != nil && !errors.Is(err, io.EOF) {
				t.Logf("sftp server: %v", err)
			}
			_ = srv.Close() // closes ch, which ends the request loop
		}()
	}
}

func (s *passwordServer) close(t *testing.T) {
	s.mu.Lock()
	s.closed = true
	conns := make([]net.Conn, 0, len(s.conns))
	for nc := range s.conns {
		conns = append(conns, nc)
	}
	s.mu.Unlock()
	_ = s.ln.Close()
	for _, nc := range conns {
		_ = nc.Close()
	}
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Error("password SSH server goroutines still running 30s after close")
	}
}

// checkNoGoroutineLeak fails the test if, once every cleanup registered
// after it has run, more goroutines are alive than when it was called.
// Library goroutines (ssh mux, sftp packet manager) exit shortly after their
// connection closes, so it polls rather than checking once.
func checkNoGoroutineLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(30 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutines: %d after the test, %d before:\n%s", runtime.NumGoroutine(), before, buf)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// TestPasswordLogin proves a correct password logs in end to end over the
// SSH protocol, and that wrong credentials and a wrong host key pin fail
// with the right sentinels. The OpenSSH-based tests only ever see a
// password refused.
// One function because every case runs against the one in-process SSH server it starts.
func TestPasswordLogin(t *testing.T) {
	checkNoGoroutineLeak(t)
	const user, password = "backup", "correct horse battery staple"
	s := startPasswordServer(t, user, password)
	name, data := randomFile(t, 1<<20+4321)
	otherPub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherKey, err := ssh.NewPublicKey(otherPub)
	if err != nil {
		t.Fatal(err)
	}
	otherFP := ssh.FingerprintSHA256(otherKey)

	tests := []struct {
		name string
		mod  func(h *Host)
		want error    // nil: the login must succeed
		subs []string // substrings the error must contain
		// wantAttempts is how many passwords the server must see; a
		// refused host key must stop the client before it sends one.
		wantAttempts int64
	}{
		{"correct password", func(*Host) {}, nil, nil, 1},
		{"wrong password", func(h *Host) { h.Password = "Tr0ub4dor&3" }, ErrAuth, []string{user + "@" + s.Addr, "refused"}, 1},
		{"wrong user", func(h *Host) { h.User = "mallory" }, ErrAuth, []string{"mallory@" + s.Addr}, 1},
		{"wrong pinned fingerprint", func(h *Host) { h.Fingerprint = otherFP }, ErrHostKey, []string{s.Fingerprint, otherFP, "pinned"}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// A short keepalive so the server's keepalive handling is
			// exercised; a missed reply has 5 s before the pool gives up.
			p, dials := newPool(t, PoolOptions{Keepalive: 100 * time.Millisecond})
			h := Host{Addr: s.Addr, User: user, Password: password, Fingerprint: s.Fingerprint}
			tc.mod(&h)
			attempts0, accepted0 := s.attempts.Load(), s.accepted.Load()
			ctx := context.Background()

			f, err := p.Open(ctx, h, name)
			if tc.want != nil {
				if err == nil {
					f.Close()
					t.Fatalf("Open succeeded, want %v", tc.want)
				}
				if !errors.Is(err, tc.want) {
					t.Fatalf("err = %v, want %v", err, tc.want)
				}
				for _, sub := range tc.subs {
					if !strings.Contains(err.Error(), sub) {
						t.Errorf("error %q lacks %q", err, sub)
					}
				}
				if strings.Contains(err.Error(), h.Password) {
					t.Errorf("error leaks the password: %v", err)
				}
				if got := s.attempts.Load() - attempts0; got != tc.wantAttempts {
					t.Errorf("server saw %d password attempts, want %d", got, tc.wantAttempts)
				}
				if got := s.accepted.Load() - accepted0; got != 0 {
					t.Errorf("server accepted %d passwords, want 0", got)
				}
				if n := p.numConns(); n != 0 {
					t.Errorf("%d connections pooled after a failed login", n)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open with the correct password: %v", err)
			}
			defer f.Close()
			if f.Size() != int64(len(data)) {
				t.Fatalf("Size = %d, want %d", f.Size(), len(data))
			}
			got := make([]byte, len(data))
			if n, err := f.ReadAt(got, 0); n != len(got) || (err != nil && !errors.Is(err, io.EOF)) {
				t.Fatalf("ReadAt: n=%d err=%v", n, err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("bytes read over SFTP differ from the file")
			}
			mid := make([]byte, 4096)
			if _, err := f.ReadAt(mid, 777777); err != nil || !bytes.Equal(mid, data[777777:777777+4096]) {
				t.Fatalf("ranged ReadAt: err=%v equal=%v", err, bytes.Equal(mid, data[777777:777777+4096]))
			}

			fi, err := p.Stat(ctx, h, name)
			if err != nil {
				t.Fatalf("Stat: %v", err)
			}
			if fi.Size() != int64(len(data)) || !fi.Mode().IsRegular() {
				t.Fatalf("Stat: size %d mode %v, want %d regular", fi.Size(), fi.Mode(), len(data))
			}

			// Writes work over the password session too.
			out := filepath.Join(t.TempDir(), "written")
			af, err := p.CreateAtomic(ctx, h, out)
			if err != nil {
				t.Fatalf("CreateAtomic: %v", err)
			}
			defer af.Abort()
			if _, err := af.Write(data[:12345]); err != nil {
				t.Fatalf("Write: %v", err)
			}
			if err := af.Commit(); err != nil {
				t.Fatalf("Commit: %v", err)
			}
			if b, err := os.ReadFile(out); err != nil || !bytes.Equal(b, data[:12345]) {
				t.Fatalf("written file: err=%v len=%d", err, len(b))
			}

			// The pool's keepalives reach the server and are answered, and
			// the connection stays usable.
			testwait.For(t, "a keepalive@openssh.com request", func() bool { return s.keepalives.Load() > 0 })
			if _, err := p.Stat(ctx, h, name); err != nil {
				t.Fatalf("Stat after keepalive: %v", err)
			}

			// Every connection authenticated by password and by nothing
			// else: the server offers no other method, and it counted one
			// accepted password per dial.
			d := dials.Load()
			if d < 1 {
				t.Fatalf("dials = %d", d)
			}
			if got := s.accepted.Load() - accepted0; got != d {
				t.Fatalf("server accepted %d passwords for %d dials", got, d)
			}
			if got := s.attempts.Load() - attempts0; got != d {
				t.Fatalf("server saw %d password attempts for %d dials", got, d)
			}
		})
	}
}

// countingConn counts the bytes a connection receives.
type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	return n, err
}

// A server that answers reads shorter than asked (pkg/sftp's server: at
// most 32 KiB, our requests 255 KiB) is read correctly, and each byte
// crosses the wire about once: pkg/sftp's pipelined read drops the other
// answers after a short one, which re-read 16 times the data before the
// file switched to packet-sized requests.
func TestShortAnswersReadOnce(t *testing.T) {
	checkNoGoroutineLeak(t)
	const user, password = "backup", "pw"
	s := startPasswordServer(t, user, password)
	const size = 16 << 20
	name, data := randomFile(t, size)
	var wire atomic.Int64
	d := &net.Dialer{}
	p := NewPool(PoolOptions{Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return countingConn{c, &wire}, nil
	}})
	t.Cleanup(func() { _ = p.Close() })
	f, err := p.Open(context.Background(), Host{Addr: s.Addr, User: user, Password: password, Fingerprint: s.Fingerprint}, name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	before := wire.Load()
	got := make([]byte, size)
	for off := 0; off < size; off += 8 << 20 { // the pull's chunk size
		if n, err := f.ReadAt(got[off:off+8<<20], int64(off)); n != 8<<20 || (err != nil && !errors.Is(err, io.EOF)) {
			t.Fatalf("ReadAt at %d: n=%d err=%v", off, n, err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("bytes read differ from the file")
	}
	if moved := wire.Load() - before; moved > size*5/4 {
		t.Fatalf("%d bytes received for a %d-byte file (%.1fx); want each byte read about once", moved, size, float64(moved)/size)
	}
}

package sshfs

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
	"golang.org/x/sync/errgroup"

	"imagestore/internal/testwait"
	"imagestore/transfer/faultproxy"
	"imagestore/transfer/sshtest"
)

func hostOf(s *sshtest.Server) Host {
	return Host{Addr: s.Addr, User: s.User, PrivateKey: s.PrivateKey, KnownHostsFile: s.KnownHostsFile}
}

// newPool returns a pool closed at test end and a counter of its dials.
func newPool(t *testing.T, opts PoolOptions) (*Pool, *atomic.Int64) {
	t.Helper()
	var dials atomic.Int64
	d := &net.Dialer{}
	opts.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return d.DialContext(ctx, network, addr)
	}
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 20 * time.Second
	}
	p := NewPool(opts)
	t.Cleanup(func() { _ = p.Close() })
	return p, &dials
}

func randomFile(t *testing.T, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	name := filepath.Join(t.TempDir(), "disk.qcow2")
	if err := os.WriteFile(name, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return name, data
}

func randInt(n int64) int64 {
	v, _ := rand.Int(rand.Reader, big.NewInt(n))
	return v.Int64()
}

func checkRanges(t *testing.T, f io.ReaderAt, data []byte, workers, reads int) {
	t.Helper()
	var g errgroup.Group
	for w := 0; w < workers; w++ {
		g.Go(func() error {
			for i := 0; i < reads; i++ {
				off := randInt(int64(len(data)))
				n := randInt(int64(len(data))-off) + 1
				if n > 256<<10 {
					n = 256 << 10
				}
				buf := make([]byte, n)
				got, err := f.ReadAt(buf, off)
				if err != nil && !(errors.Is(err, io.EOF) && off+int64(got) == int64(len(data))) {
					return err
				}
				if int64(got) != n || !bytes.Equal(buf, data[off:off+n]) {
					return errors.New("range mismatch")
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

func TestReadFullAndConcurrentRanges(t *testing.T) {
	s := sshtest.Start(t)
	p, dials := newPool(t, PoolOptions{})
	name, data := randomFile(t, 3<<20+12345)
	ctx := context.Background()

	f, err := p.Open(ctx, hostOf(s), name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Size() != int64(len(data)) {
		t.Fatalf("Size = %d, want %d", f.Size(), len(data))
	}
	got := make([]byte, f.Size())
	if n, err := f.ReadAt(got, 0); n != len(got) || (err != nil && !errors.Is(err, io.EOF)) || !bytes.Equal(got, data) {
		t.Fatalf("full read: n=%d err=%v equal=%v", n, err, bytes.Equal(got, data))
	}
	checkRanges(t, f, data, 8, 8)
	// Past the end is io.EOF, not a connection error.
	if n, err := f.ReadAt(make([]byte, 10), int64(len(data))-4); n != 4 || !errors.Is(err, io.EOF) {
		t.Fatalf("read at end: n=%d err=%v", n, err)
	}
	// A second file on the same host shares the connection.
	f2, err := p.Open(ctx, hostOf(s), name)
	if err != nil {
		t.Fatal(err)
	}
	f2.Close()
	if _, err := p.Stat(ctx, hostOf(s), name); err != nil {
		t.Fatal(err)
	}
	if d := dials.Load(); d != 1 {
		t.Fatalf("dials = %d, want 1 (connection reuse)", d)
	}
	if _, err := p.Open(ctx, hostOf(s), filepath.Dir(name)); err == nil {
		t.Fatal("opening a directory succeeded")
	}
	if _, err := p.Open(ctx, hostOf(s), name+".missing"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v, want ErrNotExist", err)
	}
}

func TestHostKeyPolicy(t *testing.T) {
	s := sshtest.Start(t)
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	otherPub, _ := sshtest.GenKey(t)
	changed := filepath.Join(dir, "changed")
	line := knownhosts.Line([]string{knownhosts.Normalize(s.Addr)}, otherPub)
	if err := os.WriteFile(changed, []byte(line+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		mod     func(h *Host)
		wantErr []string // substrings; nil = success
	}{
		{"known_hosts ok", func(h *Host) {}, nil},
		{"pinned ok", func(h *Host) { h.KnownHostsFile = ""; h.Fingerprint = s.Fingerprint }, nil},
		{"unknown", func(h *Host) { h.KnownHostsFile = empty }, []string{"not in", s.Fingerprint, "ssh-keyscan"}},
		{"changed", func(h *Host) { h.KnownHostsFile = changed }, []string{"host key changed", s.Fingerprint, ssh.FingerprintSHA256(otherPub)}},
		{"wrong pin", func(h *Host) { h.KnownHostsFile = ""; h.Fingerprint = ssh.FingerprintSHA256(otherPub) }, []string{"pinned", s.Fingerprint}},
		{"no policy", func(h *Host) { h.KnownHostsFile = "" }, []string{"no known_hosts file or fingerprint"}},
		{"missing known_hosts", func(h *Host) { h.KnownHostsFile = filepath.Join(dir, "nope") }, []string{"nope"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, _ := newPool(t, PoolOptions{})
			h := hostOf(s)
			tc.mod(&h)
			_, err := p.Stat(context.Background(), h, s.Dir)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrHostKey) {
				t.Fatalf("err = %v, want ErrHostKey", err)
			}
			for _, sub := range tc.wantErr {
				if !strings.Contains(err.Error(), sub) {
					t.Errorf("error %q lacks %q", err, sub)
				}
			}
		})
	}
}

func TestAuthAndReachability(t *testing.T) {
	s := sshtest.Start(t)
	_, otherKey := sshtest.GenKey(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := ln.Addr().String()
	ln.Close()
	const secret = "hunter2-secret"
	tests := []struct {
		name string
		mod  func(h *Host)
		want error
	}{
		{"wrong key", func(h *Host) { h.PrivateKey = otherKey }, ErrAuth},
		{"wrong password", func(h *Host) { h.PrivateKey = nil; h.Password = secret }, ErrAuth},
		{"no credentials", func(h *Host) { h.PrivateKey = nil }, ErrAuth},
		{"garbage key", func(h *Host) { h.PrivateKey = []byte("not a key") }, ErrAuth},
		{"closed port", func(h *Host) { h.Addr = closedAddr; h.Fingerprint = s.Fingerprint }, ErrUnreachable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, _ := newPool(t, PoolOptions{DialTimeout: 10 * time.Second})
			h := hostOf(s)
			tc.mod(&h)
			start := time.Now()
			_, err := p.Stat(context.Background(), h, s.Dir)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), "PRIVATE KEY") {
				t.Fatalf("error leaks a secret: %v", err)
			}
			if el := time.Since(start); el > 9*time.Second {
				t.Fatalf("took %v", el)
			}
		})
	}
}

func TestRedialAfterKilledConnection(t *testing.T) {
	s := sshtest.Start(t)
	p, dials := newPool(t, PoolOptions{})
	name, data := randomFile(t, 1<<20)
	ctx := context.Background()
	f, err := p.Open(ctx, hostOf(s), name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s.KillConnections(t)
	// The open file reconnects and keeps reading.
	checkRanges(t, f, data, 4, 5)
	// At least one redial; a loaded machine may need a second one when the
	// kill lands while the first redial is still being set up.
	d1 := dials.Load()
	if d1 < 2 {
		t.Fatalf("dials = %d, want at least 2", d1)
	}
	// New calls use the redialled connection.
	if _, err := p.Stat(ctx, hostOf(s), name); err != nil {
		t.Fatal(err)
	}
	s.KillConnections(t)
	testwait.For(t, "dead connection dropped", func() bool { return p.numConns() == 0 })
	if _, err := p.Stat(ctx, hostOf(s), name); err != nil {
		t.Fatal(err)
	}
	if d := dials.Load(); d <= d1 {
		t.Fatalf("dials = %d, want more than %d after the second kill", d, d1)
	}
}

func TestReadThroughCuttingProxy(t *testing.T) {
	s := sshtest.Start(t)
	px := faultproxy.New(t, s.Addr)
	p, dials := newPool(t, PoolOptions{})
	name, data := randomFile(t, 4<<20)
	h := hostOf(s)
	h.Addr, h.KnownHostsFile, h.Fingerprint = px.Addr(), "", s.Fingerprint
	f, err := p.Open(context.Background(), h, name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	px.CutAfter(1 << 20)
	px.CutNext(2)
	px.CloseConns() // the first cut: later connections get cut after 1 MiB
	got := make([]byte, f.Size())
	if _, err := io.ReadFull(io.NewSectionReader(f, 0, f.Size()), got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("data differs after reconnects")
	}
	if px.Cuts() != 3 || dials.Load() != 4 {
		t.Fatalf("cuts=%d dials=%d, want 3 and 4", px.Cuts(), dials.Load())
	}
}

func TestIdleClose(t *testing.T) {
	s := sshtest.Start(t)
	// Keepalive of 1 s (reply timeout ≥ 5 s): with tens of milliseconds a
	// loaded machine under -race could miss a reply and drop the in-use
	// connection, which is not what this test is about.
	p, dials := newPool(t, PoolOptions{IdleTimeout: 100 * time.Millisecond, Keepalive: time.Second})
	ctx := context.Background()
	sc, release, err := p.Client(ctx, hostOf(s))
	if err != nil {
		t.Fatal(err)
	}
	// In use: a keepalive is sent (at 1 s), and the connection is never
	// reaped although it is far past IdleTimeout.
	time.Sleep(1500 * time.Millisecond)
	if _, err := sc.Getwd(); err != nil {
		t.Fatal(err)
	}
	if p.numConns() != 1 {
		t.Fatal("connection in use was closed")
	}
	release()
	release() // idempotent
	testwait.For(t, "idle close", func() bool { return p.numConns() == 0 })
	if _, err := p.Stat(ctx, hostOf(s), s.Dir); err != nil {
		t.Fatal(err)
	}
	if d := dials.Load(); d != 2 {
		t.Fatalf("dials = %d, want 2", d)
	}
}

func TestCreateAtomic(t *testing.T) {
	s := sshtest.Start(t)
	p, _ := newPool(t, PoolOptions{})
	ctx := context.Background()
	dir := t.TempDir()
	payload := make([]byte, 3<<20+7)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	entries := func() []string {
		es, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range es {
			names = append(names, e.Name())
		}
		return names
	}
	tests := []struct {
		name   string
		commit bool
	}{{"commit", true}, {"abort", false}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			final := filepath.Join(dir, "out-"+tc.name)
			if err := os.WriteFile(final, []byte("old"), 0o600); err != nil {
				t.Fatal(err)
			}
			af, err := p.CreateAtomic(ctx, hostOf(s), final)
			if err != nil {
				t.Fatal(err)
			}
			defer af.Abort()
			if _, err := io.Copy(af, bytes.NewReader(payload[:1<<20])); err != nil {
				t.Fatal(err)
			}
			if _, err := af.WriteAt(payload[1<<20:], 1<<20); err != nil {
				t.Fatal(err)
			}
			var tmp string
			for _, e := range entries() {
				if strings.HasPrefix(e, ".out-"+tc.name+".tmp-") {
					tmp = e
				}
			}
			if tmp == "" {
				t.Fatalf("no temp file in %v", entries())
			}
			if b, _ := os.ReadFile(final); string(b) != "old" {
				t.Fatal("final path changed before commit")
			}
			if tc.commit {
				if err := af.Commit(); err != nil {
					t.Fatal(err)
				}
				if err := af.Commit(); err == nil {
					t.Fatal("second Commit succeeded")
				}
				b, err := os.ReadFile(final)
				if err != nil || !bytes.Equal(b, payload) {
					t.Fatalf("committed content wrong: err=%v len=%d", err, len(b))
				}
			} else {
				if err := af.Abort(); err != nil {
					t.Fatal(err)
				}
				if b, _ := os.ReadFile(final); string(b) != "old" {
					t.Fatal("abort touched the final path")
				}
			}
			if err := af.Abort(); err != nil {
				t.Fatalf("Abort after finish: %v", err)
			}
			if _, err := os.Stat(filepath.Join(dir, tmp)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("temp file left behind: %v", err)
			}
		})
	}
	if err := p.Remove(ctx, hostOf(s), filepath.Join(dir, "out-commit")); err != nil {
		t.Fatal(err)
	}
}

// Concurrent first use of a host dials once.
func TestConcurrentFirstUseDialsOnce(t *testing.T) {
	s := sshtest.Start(t)
	p, dials := newPool(t, PoolOptions{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := p.Stat(context.Background(), hostOf(s), s.Dir)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if d := dials.Load(); d != 1 {
		t.Fatalf("dials = %d, want 1", d)
	}
}

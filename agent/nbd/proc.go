package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// readyTimeout bounds how long a new qemu-nbd may take to answer the NBD
// handshake; opening a long chain on a loaded host can take a while.
const readyTimeout = 30 * time.Second

// proc is one qemu-nbd process we started.
type proc struct {
	srv     Server
	cmd     *exec.Cmd
	target  bool // a file we created; removed on cancel and stale cleanup
	overlay bool // a copy-on-write overlay we created; removed once the server stops
	pidFile string
	recFile string
	pskDir  string // the server's tls-creds-psk dir; "" without a key
	stderr  *tailLog
	done    chan struct{} // closed once cmd.Wait returned

	// Guarded by Manager.mu.
	stopping   bool
	unexpected bool // exited before anyone asked it to

	waitErr error // written before done is closed

}

type startSpec struct {
	path       string
	exportName string
	readOnly   bool
	target     bool
	overlay    bool
	desc       string
	expires    time.Time
	psk        string // hex key clients must present; "" for none
}

// start binds a port from the range, runs qemu-nbd on it via socket
// activation and waits until it answers the NBD handshake.
func (m *Manager) start(ctx context.Context, spec startSpec) (*proc, error) {
	ln, port, err := m.reservePort(ctx)
	if err != nil {
		return nil, err
	}
	id := newID()
	p := &proc{
		srv: Server{
			ID: id, Port: port, Path: spec.path, ExportName: spec.exportName,
			ReadOnly: spec.readOnly, Started: time.Now(), Expires: spec.expires,
			Description: spec.desc, TLS: m.opts.TLSDir != "" || spec.psk != "", PSK: spec.psk,
		},
		target:  spec.target,
		overlay: spec.overlay,
		pidFile: filepath.Join(m.opts.Dir, id+".pid"),
		recFile: filepath.Join(m.opts.Dir, id+".json"),
		done:    make(chan struct{}),
	}
	p.stderr = &tailLog{m: m, id: id}

	lf, err := ln.File()
	ln.Close() // lf is a dup; qemu-nbd gets it, we keep nothing open
	if err != nil {
		m.releasePort(port)
		return nil, fmt.Errorf("nbd: listener fd: %w", err)
	}
	args, err := m.serverArgs(p, spec)
	if err != nil {
		lf.Close()
		m.releasePort(port)
		return nil, err
	}
	// systemd socket activation needs LISTEN_PID = the server's own pid,
	// which only exists after fork; sh sets it and execs qemu-nbd in place.
	shArgs := append([]string{"-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"`, m.qemuNBD}, args...)
	cmd := exec.Command("/bin/sh", shArgs...)
	cmd.Env = append(envWithoutListen(), "LISTEN_FDS=1")
	cmd.ExtraFiles = []*os.File{lf} // fd 3
	cmd.Stderr = p.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // a terminal's ^C is not for it
	p.cmd = cmd
	err = cmd.Start()
	lf.Close()
	if err != nil {
		m.releasePort(port)
		removePSK(p.pskDir)
		return nil, fmt.Errorf("nbd: start qemu-nbd: %w", err)
	}
	m.mu.Lock()
	closed := m.closed
	m.servers[id] = p
	m.mu.Unlock()
	go m.reap(p)
	if closed { // Close ran while we started and did not see p
		_ = m.stopProc(context.Background(), p)
		return nil, ErrClosed
	}

	if err := writeRecord(p.recFile, recordOf(p)); err != nil {
		_ = m.stopProc(context.Background(), p)
		return nil, err
	}
	if err := m.waitReady(ctx, p); err != nil {
		_ = m.stopProc(context.Background(), p)
		return nil, err
	}
	return p, nil
}

// serverArgs is qemu-nbd's command line for p (without the socket, which
// comes by activation); with a PSK it writes the key file p.pskDir holds.
func (m *Manager) serverArgs(p *proc, spec startSpec) ([]string, error) {
	args := []string{"-f", "qcow2", "--persistent",
		fmt.Sprintf("--shared=%d", m.opts.Shared), "--pid-file=" + p.pidFile}
	// In QEMU option syntax a comma is escaped by doubling it.
	switch {
	case spec.psk != "":
		p.pskDir = filepath.Join(m.opts.Dir, pskDirName, p.srv.ID)
		if err := writePSK(p.pskDir, spec.psk); err != nil {
			return nil, err
		}
		args = append(args, "--object", "tls-creds-psk,id=tls0,endpoint=server,dir="+
			strings.ReplaceAll(p.pskDir, ",", ",,"), "--tls-creds=tls0")
	case m.opts.TLSDir != "":
		args = append(args, "--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="+
			strings.ReplaceAll(m.opts.TLSDir, ",", ",,"), "--tls-creds=tls0")
	}
	switch {
	case spec.readOnly:
		args = append(args, "--read-only", "--export-name="+spec.exportName)
	case spec.overlay:
		// A guest runs on it: its discards punch the overlay (backing
		// files are opened read-only whatever the client sends).
		args = append(args, "--cache=writeback", "--discard=unmap", "--export-name="+spec.exportName)
	default:
		// A backup target: scratch until the import copies it into a
		// blob (which is made durable there). unsafe drops the
		// fdatasyncs qcow2 would otherwise run each time new clusters'
		// metadata depends on a refcount update, and the client's
		// flushes, which made the host's backup wait on this disk's
		// write-back; a clean (SIGTERM) exit still writes the qcow2
		// metadata out before the import reads the file.
		args = append(args, "--cache=unsafe")
	}
	return append(args, spec.path), nil
}

func envWithoutListen() []string {
	var env []string
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "LISTEN_") {
			env = append(env, e)
		}
	}
	return env
}

// reservePort binds the first port of the range that is neither ours nor
// taken by anyone else. Binding it ourselves is the in-use check and leaves
// no window for another process to grab it before qemu-nbd serves it.
func (m *Manager) reservePort(ctx context.Context) (*net.TCPListener, int, error) {
	network := "tcp"
	if ip := net.ParseIP(m.opts.Bind); ip != nil {
		network = "tcp6"
		if ip.To4() != nil {
			network = "tcp4"
		}
	}
	var lc net.ListenConfig
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, 0, ErrClosed
	}
	var lastErr error
	for port := m.opts.PortMin; port <= m.opts.PortMax; port++ {
		if m.ports[port] {
			continue
		}
		ln, err := lc.Listen(ctx, network, net.JoinHostPort(m.opts.Bind, fmt.Sprint(port)))
		if err != nil {
			lastErr = err
			continue
		}
		m.ports[port] = true
		return ln.(*net.TCPListener), port, nil
	}
	if lastErr != nil {
		return nil, 0, fmt.Errorf("%w %d-%d on %s (last: %v)", ErrNoPort, m.opts.PortMin, m.opts.PortMax, m.opts.Bind, lastErr)
	}
	return nil, 0, fmt.Errorf("%w %d-%d on %s: all in use by our servers", ErrNoPort, m.opts.PortMin, m.opts.PortMax, m.opts.Bind)
}

func (m *Manager) releasePort(port int) {
	m.mu.Lock()
	delete(m.ports, port)
	m.mu.Unlock()
}

// reap waits for the process and forgets it; an exit nobody asked for is
// logged loudly, since a host's backup job or a booting VM just lost its disk.
func (m *Manager) reap(p *proc) {
	p.waitErr = p.cmd.Wait()
	// done is closed last, so whoever waits on it (Close) knows this
	// goroutine has finished logging and touching files.
	defer close(p.done)
	// qemu-nbd reads keys.psk at every TLS handshake, so the key may only
	// go once the server has exited; it dies with the server.
	removePSK(p.pskDir)
	m.mu.Lock()
	if m.servers[p.srv.ID] == p {
		delete(m.servers, p.srv.ID)
	}
	delete(m.ports, p.srv.Port)
	unexpected := !p.stopping
	p.unexpected = unexpected
	m.mu.Unlock()
	if unexpected {
		m.log.Error("qemu-nbd exited unexpectedly", "id", p.srv.ID, "port", p.srv.Port,
			"path", p.srv.Path, "err", p.waitErr, "stderr", p.stderr.tail())
		if !p.target {
			// Nothing else will ever stop a read-only server's record,
			// nor serve an overlay again.
			removeQuiet(p.recFile)
			removeQuiet(p.pidFile)
			if p.overlay {
				removeQuiet(p.srv.Path)
			}
		}
	}
}

// stopProc sends SIGTERM so qemu-nbd flushes and closes the image, and
// waits; after stopTimeout or ctx it kills. Safe to call more than once.
func (m *Manager) stopProc(ctx context.Context, p *proc) error {
	m.mu.Lock()
	p.stopping = true
	m.mu.Unlock()
	var killed bool
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(stopTimeout)
		select {
		case <-p.done:
		case <-ctx.Done():
			killed = true
		case <-t.C:
			killed = true
		}
		t.Stop()
		if killed {
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
	m.mu.Lock()
	unexpected := p.unexpected
	m.mu.Unlock()
	var err error
	switch {
	case killed:
		err = fmt.Errorf("nbd: qemu-nbd on port %d killed before it finished flushing %s", p.srv.Port, p.srv.Path)
	case unexpected:
		err = fmt.Errorf("nbd: qemu-nbd on port %d had exited unexpectedly (%v): %s", p.srv.Port, p.waitErr, p.stderr.tail())
	case p.waitErr != nil:
		err = fmt.Errorf("nbd: qemu-nbd on port %d: %w: %s", p.srv.Port, p.waitErr, p.stderr.tail())
	}
	if p.target {
		err = settleTarget(p.srv.Path, err)
	}
	// The record goes last: until a target is durable (or removed), a
	// restart after a crash still finds it as stale and removes it.
	removeQuiet(p.recFile)
	removeQuiet(p.pidFile)
	if p.overlay {
		removeQuiet(p.srv.Path)
	}
	return err
}

// settleTarget makes a stopped backup target safe to import. A target is
// served with --cache=unsafe, so only a clean exit writes its qcow2
// metadata, and nothing of it is on disk yet: after a clean exit it is
// fsynced, so a crash of this machine before or during the import cannot
// leave a torn file a retried import would read; after an unclean exit
// (killed, crashed) its metadata may be missing, so it is removed and the
// import fails on the missing file instead of storing a torn backup.
func settleTarget(path string, stopErr error) error {
	if stopErr == nil {
		f, err := os.Open(path)
		if err == nil {
			err = f.Sync()
			f.Close()
		}
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		stopErr = fmt.Errorf("nbd: making backup target %s durable: %w", path, err)
	}
	removeQuiet(path)
	return fmt.Errorf("%w; the target was removed (its bytes cannot be trusted)", stopErr)
}

// pskDirName is the folder of Options.Dir holding one tls-creds-psk dir
// per running server.
const pskDirName = "psk"

// writePSK lays out dir as a QEMU tls-creds-psk dir: keys.psk holds
// "identity:hexkey", readable by the agent's user only, and dh-params.pem
// the standard ffdhe2048 group, which spares each qemu-nbd start
// generating DH parameters (0.1-0.6 s of CPU measured per start).
func writePSK(dir, key string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("nbd: psk dir: %w", err)
	}
	for name, b := range map[string]string{"keys.psk": PSKIdentity + ":" + key + "\n", "dh-params.pem": ffdhe2048} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(b), 0o600); err != nil {
			removePSK(dir)
			return fmt.Errorf("nbd: psk: %w", err)
		}
	}
	return nil
}

// ffdhe2048 is the RFC 7919 2048-bit finite-field DH group in PKCS#3 PEM
// (openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048).
const ffdhe2048 = `-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
`

func removePSK(dir string) {
	if dir != "" {
		_ = os.RemoveAll(dir)
	}
}

func removeQuiet(path string) {
	_ = os.Remove(path)
}

// waitReady polls until qemu-nbd answers the NBD handshake.
func (m *Manager) waitReady(ctx context.Context, p *proc) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	addr := net.JoinHostPort(dialHost(m.opts.Bind), fmt.Sprint(p.srv.Port))
	delay := 10 * time.Millisecond
	for {
		err := probe(ctx, addr)
		if err == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("nbd: qemu-nbd for %s exited at start (%v): %s", p.srv.Path, p.waitErr, p.stderr.tail())
		case <-ctx.Done():
			return fmt.Errorf("nbd: qemu-nbd for %s not ready on %s: %w (last probe: %v)", p.srv.Path, addr, ctx.Err(), err)
		case <-time.After(delay):
		}
		if delay < 200*time.Millisecond {
			delay *= 2
		}
	}
}

// dialHost turns a wildcard bind address into a loopback one we can dial.
func dialHost(bind string) string {
	ip := net.ParseIP(bind)
	switch {
	case ip == nil:
		return bind
	case ip.IsUnspecified() && ip.To4() != nil:
		return "127.0.0.1"
	case ip.IsUnspecified():
		return "::1"
	}
	return bind
}

// NBD fixed-newstyle handshake constants (NBD protocol, "Newstyle negotiation").
const (
	nbdMagic      = "NBDMAGIC"
	nbdOptMagic   = "IHAVEOPT"
	nbdOptAbort   = 2
	nbdFlagFixed  = 1 // NBD_FLAG_FIXED_NEWSTYLE / NBD_FLAG_C_FIXED_NEWSTYLE
	nbdFlagNoZero = 2 // NBD_FLAG_NO_ZEROES / NBD_FLAG_C_NO_ZEROES
)

// probe reads the server greeting and then ends the negotiation politely
// with NBD_OPT_ABORT, so qemu-nbd does not log a failed client.
func probe(ctx context.Context, addr string) error {
	d := net.Dialer{Timeout: 2 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var greet [18]byte
	if _, err := io.ReadFull(c, greet[:]); err != nil {
		return fmt.Errorf("reading NBD greeting: %w", err)
	}
	if err := checkGreeting(greet[:]); err != nil {
		return err
	}
	serverFlags := binary.BigEndian.Uint16(greet[16:])
	var msg [20]byte
	binary.BigEndian.PutUint32(msg[0:], uint32(serverFlags&(nbdFlagFixed|nbdFlagNoZero)))
	copy(msg[4:], nbdOptMagic)
	binary.BigEndian.PutUint32(msg[12:], nbdOptAbort)
	binary.BigEndian.PutUint32(msg[16:], 0)
	if _, err := c.Write(msg[:]); err != nil {
		return fmt.Errorf("sending NBD_OPT_ABORT: %w", err)
	}
	// The reply (an ACK) is optional for the server; wait briefly for it
	// or the close so qemu-nbd sees an orderly end.
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	_, _ = io.Copy(io.Discard, io.LimitReader(c, 64))
	return nil
}

// checkGreeting validates the 18-byte fixed-newstyle server greeting.
func checkGreeting(b []byte) error {
	if len(b) < 18 {
		return fmt.Errorf("short NBD greeting (%d bytes)", len(b))
	}
	if string(b[:8]) != nbdMagic {
		return fmt.Errorf("not an NBD server: greeting %q", b[:8])
	}
	if string(b[8:16]) != nbdOptMagic {
		return fmt.Errorf("NBD server is not newstyle: %q", b[8:16])
	}
	if binary.BigEndian.Uint16(b[16:18])&nbdFlagFixed == 0 {
		return errors.New("NBD server is not fixed-newstyle")
	}
	return nil
}

// tailLog logs qemu-nbd's stderr line by line and keeps the last few KiB
// for error messages.
type tailLog struct {
	m    *Manager
	id   string
	mu   sync.Mutex
	buf  []byte // incomplete line
	last []byte
}

const tailMax = 4096

func (t *tailLog) Write(b []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, b...)
	for {
		i := bytes.IndexByte(t.buf, '\n')
		if i < 0 {
			break
		}
		line := string(t.buf[:i])
		t.buf = t.buf[i+1:]
		t.m.log.Info("qemu-nbd", "id", t.id, "stderr", line)
		t.last = append(t.last, line...)
		t.last = append(t.last, '\n')
	}
	if len(t.buf) > tailMax { // a line without end; keep memory bounded
		t.last = append(t.last, t.buf...)
		t.buf = t.buf[:0]
	}
	if len(t.last) > tailMax {
		t.last = append([]byte(nil), t.last[len(t.last)-tailMax:]...)
	}
	return len(b), nil
}

func (t *tailLog) tail() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(string(t.last) + string(t.buf))
}

// Package nbd runs and tracks qemu-nbd servers for the agent: writable qcow2
// targets a KVM host's QEMU backup job writes into (exportnbdimage), and
// stored chains served over a private copy-on-write overlay a guest runs
// on (export/remotetarget, instant restore).
//
// We own every qemu-nbd process (no --fork): the listening socket is bound
// by us and handed over with systemd socket activation, so a port is either
// ours or skipped, with no window in which another process can take it.
// Each server has a record file in Options.Dir so that a restarted agent
// can find and stop servers a crashed predecessor left running.
package nbd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// Errors callers branch on; each is wrapped with the detail.
var (
	ErrNotFound = errors.New("nbd: not found")
	ErrNoPort   = errors.New("nbd: no free port in range")
	ErrInvalid  = errors.New("nbd: invalid argument")
	ErrClosed   = errors.New("nbd: manager closed")
)

// Options configure a Manager.
type Options struct {
	Dir              string // working dir for server records and pid files, e.g. <root>/nbd
	PortMin, PortMax int    // configured port range, inclusive
	Bind             string // address qemu-nbd listens on; default "0.0.0.0"
	QemuNBD          string // default "qemu-nbd" from PATH
	QemuImg          string // default "qemu-img" from PATH (creates targets)
	Shared           int    // clients per server (qemu-nbd --shared); default 0 = unlimited
	// TargetDir holds writable targets; default <Dir>/targets. It must not
	// be reachable by the hosts: qemu-img and qemu-nbd open targets by
	// name, so whoever can write the directory could swap a target for a
	// symlink between create and serve.
	TargetDir string
	// ReleasedRetention is how long a released target is kept for its
	// import (counted from Release, or from the file's last change after
	// a restart); default 24h. Expire removes older ones.
	ReleasedRetention time.Duration
	// TLSDir, if set, makes every server require TLS: qemu-nbd gets
	// --object tls-creds-x509,endpoint=server,verify-peer=off,dir=TLSDir
	// (server-cert.pem, server-key.pem, ca-cert.pem, as QEMU names them).
	// Clients need no certificate: TLS encrypts and authenticates the
	// server, not the client.
	TLSDir string
	// PSK makes every server require TLS with a pre-shared key (QEMU's
	// tls-creds-psk) of its own: each group of writable targets and each
	// read-only export gets a random 256-bit key, returned in Server.PSK,
	// which a client must present under the identity PSKIdentity. Unlike
	// TLSDir this authenticates the client: without the key nobody can
	// read or write the served disk. When set, TLSDir is not used (qemu-nbd
	// takes one set of credentials).
	PSK    bool
	Logger *slog.Logger
}

// PSKIdentity is the TLS-PSK identity (QEMU's tls-creds-psk "username")
// clients present with Server.PSK.
const PSKIdentity = "imagestore"

// Server describes one running (or just stopped) qemu-nbd server.
type Server struct {
	ID          string
	Port        int
	Path        string // the served file
	ExportName  string // "" for writable targets (the NBD default export)
	ReadOnly    bool
	Started     time.Time
	Expires     time.Time // zero = never
	Description string    // the group token (nbdDescription) of a writable target; "" for read-only
	TLS         bool      // clients must use TLS (Options.TLSDir or Options.PSK)
	// PSK is the hex pre-shared key clients must present (Options.PSK);
	// "" when the server takes no key. A secret: never logged.
	PSK string
}

// stopTimeout bounds how long a stop waits for qemu-nbd to flush and exit
// after SIGTERM before it is killed.
const stopTimeout = 30 * time.Second

// Manager runs qemu-nbd servers. All methods are safe for concurrent use.
type Manager struct {
	opts    Options
	log     *slog.Logger
	qemuNBD string
	qemuImg string

	mu       sync.Mutex
	closed   bool
	ports    map[int]bool      // reserved by us (starting or running)
	servers  map[string]*proc  // by server id
	groups   map[string]*group // by description token
	creating map[string]bool   // groups being created or released: never swept
}

type group struct {
	desc    string
	expires time.Time
	procs   []*proc
}

// NewManager prepares Dir, resolves the qemu binaries and stops servers and
// removes targets that a previous run left behind.
func NewManager(opts Options) (*Manager, error) {
	if opts.Dir == "" {
		return nil, fmt.Errorf("%w: empty Dir", ErrInvalid)
	}
	if opts.PortMin <= 0 || opts.PortMax > 65535 || opts.PortMax < opts.PortMin {
		return nil, fmt.Errorf("%w: port range %d-%d", ErrInvalid, opts.PortMin, opts.PortMax)
	}
	if opts.Shared < 0 {
		return nil, fmt.Errorf("%w: Shared %d", ErrInvalid, opts.Shared)
	}
	if opts.Bind == "" {
		opts.Bind = "0.0.0.0"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ReleasedRetention <= 0 {
		opts.ReleasedRetention = 24 * time.Hour
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("nbd: dir: %w", err)
	}
	opts.Dir = filepath.Clean(dir)
	if opts.TargetDir == "" {
		opts.TargetDir = filepath.Join(opts.Dir, "targets")
	}
	if opts.TargetDir, err = filepath.Abs(opts.TargetDir); err != nil {
		return nil, fmt.Errorf("nbd: target dir: %w", err)
	}
	m := &Manager{
		opts:     opts,
		log:      opts.Logger.With("component", "nbd"),
		ports:    map[int]bool{},
		servers:  map[string]*proc{},
		groups:   map[string]*group{},
		creating: map[string]bool{},
	}
	if m.qemuNBD, err = lookTool(opts.QemuNBD, "qemu-nbd"); err != nil {
		return nil, err
	}
	if m.qemuImg, err = lookTool(opts.QemuImg, "qemu-img"); err != nil {
		return nil, err
	}
	for _, d := range []string{opts.Dir, opts.TargetDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("nbd: %w", err)
		}
	}
	// Overlays live only as long as their server; none runs yet.
	if err := os.RemoveAll(m.overlayDir()); err != nil {
		return nil, fmt.Errorf("nbd: %w", err)
	}
	if err := os.Mkdir(m.overlayDir(), 0o700); err != nil {
		return nil, fmt.Errorf("nbd: %w", err)
	}
	// Only we may create or rename entries in the target dir.
	if err := os.Chmod(opts.TargetDir, 0o700); err != nil {
		return nil, fmt.Errorf("nbd: %w", err)
	}
	m.cleanStale()
	m.sweepTargets(time.Now())
	return m, nil
}

// TargetDir is where writable targets live.
func (m *Manager) TargetDir() string { return m.opts.TargetDir }

// TargetPath reports whether path names a released target of this
// manager: a regular file (not a symlink) directly in TargetDir, named
// as CreateTargets names targets, whose group is no longer served. It
// returns the cleaned absolute path.
func (m *Manager) TargetPath(path string) (string, bool) {
	if !filepath.IsAbs(path) {
		return "", false
	}
	p := filepath.Clean(path)
	if filepath.Dir(p) != m.opts.TargetDir {
		return "", false
	}
	desc, ok := targetDesc(filepath.Base(p))
	if !ok {
		return "", false
	}
	m.mu.Lock()
	_, active := m.groups[desc]
	creating := m.creating[desc]
	m.mu.Unlock()
	if active || creating {
		return "", false
	}
	fi, err := os.Lstat(p)
	if err != nil || !fi.Mode().IsRegular() {
		return "", false
	}
	return p, true
}

// targetDesc parses a target file name "nbd-<16 hex>-<n>.qcow2".
func targetDesc(base string) (string, bool) {
	rest, ok := strings.CutSuffix(base, ".qcow2")
	if !ok || len(rest) < len("nbd-0123456789abcdef-0") || !strings.HasPrefix(rest, "nbd-") {
		return "", false
	}
	desc, n := rest[:20], rest[20:]
	if strings.Trim(desc[4:], "0123456789abcdef") != "" || len(n) < 2 || n[0] != '-' || strings.Trim(n[1:], "0123456789") != "" {
		return "", false
	}
	return desc, true
}

// sweepTargets removes target files that no group serves and that were
// released (or last changed) longer than ReleasedRetention ago.
func (m *Manager) sweepTargets(now time.Time) int {
	entries, err := os.ReadDir(m.opts.TargetDir)
	if err != nil {
		m.log.Warn("reading nbd target dir", "err", err)
		return 0
	}
	n := 0
	for _, e := range entries {
		desc, ok := targetDesc(e.Name())
		if !ok {
			continue
		}
		m.mu.Lock()
		busy := m.groups[desc] != nil || m.creating[desc]
		m.mu.Unlock()
		fi, err := e.Info()
		if busy || err != nil || now.Sub(fi.ModTime()) < m.opts.ReleasedRetention {
			continue
		}
		if err := os.Remove(filepath.Join(m.opts.TargetDir, e.Name())); err == nil {
			n++
			m.log.Info("removed released nbd target past retention", "path", e.Name())
		} else if !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("removing released nbd target", "path", e.Name(), "err", err)
		}
	}
	return n
}

func lookTool(configured, def string) (string, error) {
	if configured == "" {
		configured = def
	}
	p, err := exec.LookPath(configured)
	if err != nil {
		return "", fmt.Errorf("nbd: %s: %w", configured, err)
	}
	return p, nil
}

// newPSK returns a fresh hex key when servers take one, else "".
func (m *Manager) newPSK() string {
	if !m.opts.PSK {
		return ""
	}
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return hex.EncodeToString(b[:])
}

func newID() string {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return hex.EncodeToString(b[:])
}

// CreateTargets creates one empty qcow2 per size in TargetDir and serves
// each writable on its own port. desc is the token naming the group for
// Release and Cancel. expiry <= 0 means the group never expires.
func (m *Manager) CreateTargets(ctx context.Context, sizes []int64, expiry time.Duration) (desc string, servers []Server, err error) {
	if len(sizes) == 0 {
		return "", nil, fmt.Errorf("%w: no sizes", ErrInvalid)
	}
	for _, s := range sizes {
		if s <= 0 {
			return "", nil, fmt.Errorf("%w: size %d", ErrInvalid, s)
		}
	}
	if err := m.checkOpen(); err != nil {
		return "", nil, err
	}

	desc = "nbd-" + newID()
	m.mu.Lock()
	m.creating[desc] = true
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.creating, desc)
		m.mu.Unlock()
	}()
	g := &group{desc: desc}
	psk := m.newPSK() // one key for the group: one backup job's disks
	if expiry > 0 {
		g.expires = time.Now().Add(expiry)
	}
	var created []string
	fail := func(err error) (string, []Server, error) {
		for _, p := range g.procs {
			m.stopProc(context.Background(), p)
		}
		for _, f := range created {
			if rerr := os.Remove(f); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				m.log.Warn("removing target after failed create", "path", f, "err", rerr)
			}
		}
		return "", nil, err
	}
	for i, size := range sizes {
		path := filepath.Join(m.opts.TargetDir, fmt.Sprintf("%s-%d.qcow2", desc, i))
		if err := m.createQcow2(ctx, path, size); err != nil {
			return fail(err)
		}
		created = append(created, path)
		p, err := m.start(ctx, startSpec{path: path, desc: desc, expires: g.expires, target: true, psk: psk})
		if err != nil {
			return fail(err)
		}
		g.procs = append(g.procs, p)
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return fail(ErrClosed)
	}
	m.groups[desc] = g
	m.mu.Unlock()
	for _, p := range g.procs {
		servers = append(servers, p.srv)
	}
	m.log.Info("nbd targets serving", "desc", desc, "count", len(servers))
	return desc, servers, nil
}

func (m *Manager) createQcow2(ctx context.Context, path string, size int64) error {
	// qemu-img create truncates an existing file; the random group token
	// makes a clash impossible, but refuse rather than clobber.
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("nbd: target %s already exists", path)
	}
	// compat=1.1 (qcow2 v3): a host's zero writes become zero clusters,
	// which import keeps as zeros over the parent (v2 has no zero flag).
	cmd := exec.CommandContext(ctx, m.qemuImg, "create", "-q", "-f", "qcow2", "-o", "compat=1.1", path, fmt.Sprint(size))
	if out, err := cmd.CombinedOutput(); err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("nbd: qemu-img create %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Release stops a group's servers and keeps the target files, which the
// caller then imports. The group is forgotten.
func (m *Manager) Release(ctx context.Context, desc string) ([]Server, error) {
	// Pinned (as while creating) until the files are touched, so a sweep
	// cannot take an old target between the two.
	m.mu.Lock()
	g, ok := m.groups[desc]
	if ok {
		delete(m.groups, desc)
		m.creating[desc] = true
	}
	m.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w: nbd description %q", ErrNotFound, desc)
	}
	defer func() {
		m.mu.Lock()
		delete(m.creating, desc)
		m.mu.Unlock()
	}()
	var servers []Server
	var errs []error
	now := time.Now()
	for _, p := range g.procs {
		if err := m.stopProc(ctx, p); err != nil {
			errs = append(errs, err)
		}
		// Retention counts from now.
		if err := os.Chtimes(p.srv.Path, now, now); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("nbd: %w", err))
		}
		servers = append(servers, p.srv)
	}
	m.log.Info("nbd targets released", "desc", desc)
	return servers, errors.Join(errs...)
}

// Cancel stops a group's servers and removes its target files.
func (m *Manager) Cancel(ctx context.Context, desc string) error {
	g, err := m.takeGroup(desc)
	if err != nil {
		return err
	}
	err = m.cancelGroup(ctx, g)
	m.log.Info("nbd targets cancelled", "desc", desc)
	return err
}

func (m *Manager) takeGroup(desc string) (*group, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	g, ok := m.groups[desc]
	if !ok {
		return nil, fmt.Errorf("%w: nbd description %q", ErrNotFound, desc)
	}
	delete(m.groups, desc)
	return g, nil
}

func (m *Manager) cancelGroup(ctx context.Context, g *group) error {
	var errs []error
	for _, p := range g.procs {
		if err := m.stopProc(ctx, p); err != nil {
			errs = append(errs, err)
		}
		if err := os.Remove(p.srv.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("nbd: remove target: %w", err))
		}
	}
	return errors.Join(errs...)
}

// overlayDir holds the copy-on-write overlays of ServeOverlay.
func (m *Manager) overlayDir() string { return filepath.Join(m.opts.Dir, "overlays") }

// ServeOverlay serves a fresh copy-on-write qcow2 overlay over backing (a
// qcow2 chain top whose backing names resolve in place) writable under
// exportName: a guest's writes and discards land in the overlay
// (<Dir>/overlays/<id>.qcow2, private), while qemu-nbd opens backing and
// its chain read-only, so they never change. Each call makes its own
// overlay; it is removed once its server stops (Stop, Close, an
// unexpected exit, or the next NewManager).
func (m *Manager) ServeOverlay(ctx context.Context, backing, exportName string) (Server, error) {
	if err := validExportName(exportName); err != nil {
		return Server{}, err
	}
	abs, err := filepath.Abs(backing)
	if err != nil {
		return Server{}, fmt.Errorf("nbd: path: %w", err)
	}
	if fi, err := os.Stat(abs); err != nil {
		return Server{}, fmt.Errorf("nbd: %w", err)
	} else if !fi.Mode().IsRegular() {
		return Server{}, fmt.Errorf("%w: %s is not a regular file", ErrInvalid, abs)
	}
	return m.serveOverlay(ctx, exportName, abs, "-b", abs, "-F", "qcow2")
}

// ServeOverlayNBD is ServeOverlay over a raw NBD export instead of a
// file: backingURI is nbd+unix:///<export>?socket=<path> (the agent's own
// chain server, transfer/nbdserve, serving a stored chain's guest view
// read through our qcow2 reader), size its virtual size. The overlay is
// created without opening the backing (qemu-img create -u); qemu-nbd
// connects to it when it starts and keeps the connection while it runs,
// so the backing server must outlive the returned server.
func (m *Manager) ServeOverlayNBD(ctx context.Context, backingURI string, size int64, exportName string) (Server, error) {
	if err := validExportName(exportName); err != nil {
		return Server{}, err
	}
	if !strings.HasPrefix(backingURI, "nbd+unix:///") || !strings.Contains(backingURI, "?socket=/") || size <= 0 {
		return Server{}, fmt.Errorf("%w: overlay backing %q of size %d (want nbd+unix:///<export>?socket=<absolute path>)", ErrInvalid, backingURI, size)
	}
	return m.serveOverlay(ctx, exportName, backingURI, "-u", "-b", backingURI, "-F", "raw", "-o", fmt.Sprintf("size=%d", size))
}

// serveOverlay creates a fresh overlay with qemu-img create's backing
// arguments and serves it under exportName.
func (m *Manager) serveOverlay(ctx context.Context, exportName, backing string, backingArgs ...string) (Server, error) {
	if err := m.checkOpen(); err != nil {
		return Server{}, err
	}
	ovl := filepath.Join(m.overlayDir(), "ovl-"+newID()+".qcow2")
	args := append([]string{"create", "-q", "-f", "qcow2", "-o", "compat=1.1"}, backingArgs...)
	cmd := exec.CommandContext(ctx, m.qemuImg, append(args, ovl)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		removeQuiet(ovl)
		return Server{}, fmt.Errorf("nbd: qemu-img create overlay over %s: %w: %s", backing, err, strings.TrimSpace(string(out)))
	}
	p, err := m.start(ctx, startSpec{path: ovl, exportName: exportName, overlay: true, psk: m.newPSK()})
	if err != nil {
		removeQuiet(ovl)
		return Server{}, err
	}
	m.log.Info("nbd overlay export serving", "id", p.srv.ID, "port", p.srv.Port, "export", exportName, "backing", backing)
	return p.srv, nil
}

// validExportName keeps names safe to put in an nbd:// URI path.
func validExportName(name string) error {
	if name == "" || len(name) > 255 {
		return fmt.Errorf("%w: export name length %d", ErrInvalid, len(name))
	}
	for _, c := range name {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.', c == ':':
		default:
			return fmt.Errorf("%w: export name %q: character %q", ErrInvalid, name, c)
		}
	}
	return nil
}

// Stop stops one server by id. Stopping a target's server leaves its group
// (and file) in place for Release or Cancel.
func (m *Manager) Stop(ctx context.Context, id string) error {
	m.mu.Lock()
	p, ok := m.servers[id]
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: nbd server %q", ErrNotFound, id)
	}
	return m.stopProc(ctx, p)
}

// List returns the running servers, sorted by port.
func (m *Manager) List() []Server {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Server, 0, len(m.servers))
	for _, p := range m.servers {
		out = append(out, p.srv)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Port < out[j].Port })
	return out
}

// Count reports running servers for metrics: writable targets, and
// exports of stored chains (read-only or over an overlay).
func (m *Manager) Count() (writable, readonly int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.servers {
		if p.srv.ReadOnly || p.overlay {
			readonly++
		} else {
			writable++
		}
	}
	return writable, readonly
}

// Expire stops and removes the target groups whose expiry is before now
// and returns how many groups it removed. Released targets older than
// ReleasedRetention are removed too (not counted).
func (m *Manager) Expire(ctx context.Context, now time.Time) int {
	defer m.sweepTargets(now)
	m.mu.Lock()
	var expired []*group
	for d, g := range m.groups {
		if !g.expires.IsZero() && g.expires.Before(now) {
			expired = append(expired, g)
			delete(m.groups, d)
		}
	}
	m.mu.Unlock()
	for _, g := range expired {
		if err := m.cancelGroup(ctx, g); err != nil {
			m.log.Warn("expiring nbd targets", "desc", g.desc, "err", err)
		} else {
			m.log.Info("nbd targets expired", "desc", g.desc)
		}
	}
	return len(expired)
}

// Close stops every server. Unreleased targets are removed: the backup job
// that was writing them cannot complete without their server.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	groups := make([]*group, 0, len(m.groups))
	for _, g := range m.groups {
		groups = append(groups, g)
	}
	m.groups = map[string]*group{}
	procs := make([]*proc, 0, len(m.servers))
	for _, p := range m.servers {
		procs = append(procs, p)
	}
	m.mu.Unlock()

	// All at once, so closing takes one stop timeout at most, not one per
	// server.
	ctx := context.Background()
	errs := make([]error, len(groups)+len(procs))
	var wg sync.WaitGroup
	for i, g := range groups {
		wg.Go(func() { errs[i] = m.cancelGroup(ctx, g) })
	}
	for i, p := range procs {
		wg.Go(func() { errs[len(groups)+i] = m.stopProc(ctx, p) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (m *Manager) checkOpen() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	return nil
}

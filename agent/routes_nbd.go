package agent

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent/nbd"
	"imagestore/blobstore"
	"imagestore/transfer/replicate"
)

// releaseProcess handles import-backup's processToRelease, which names an
// exportnbdimage target group: stop its servers (qemu-nbd flushes on
// SIGTERM) so the file is complete and nobody writes it while we read.
func (a *Agent) releaseProcess(desc string) error {
	if desc == "" {
		return nil
	}
	m, err := a.nbd.manager()
	if err != nil {
		return err
	}
	// Not the request's context: a cancelled request must not leave a
	// half-stopped server behind.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := m.Release(ctx, desc); err != nil {
		if errors.Is(err, nbd.ErrNotFound) {
			// Already released (a retried import) or expired (then the
			// import fails on the missing file, with a clear error).
			a.log.Warn("processToRelease: no such NBD target group", "desc", desc)
			return nil
		}
		return fmt.Errorf("processToRelease %s: %w", desc, err)
	}
	a.log.Info("nbd targets released for import", "desc", desc)
	return nil
}

// nbdStopTimeout bounds stopping servers at shutdown and on delete.
const nbdStopTimeout = time.Minute

// nbdState holds the agent's NBD servers: writable backup targets
// (exportnbdimage) and read-only exports of stored chains (remotetarget).
// Its methods are nil-safe so an agent built without it keeps working.
type nbdState struct {
	mgr *nbd.Manager
	err error // why mgr is nil (e.g. qemu-nbd missing)
	log interface {
		Warn(string, ...any)
	}

	mu      sync.Mutex
	remotes map[string]*remoteTarget // by server id
}

// remoteTarget is a read-only export of a stored chain; release lets GC
// free the chain's blobs again.
type remoteTarget struct {
	installPath string
	uri         string
	release     func()
}

// newNBDState starts the NBD manager, which stops servers and removes
// targets a previous run left behind. Without qemu-nbd the agent still
// runs; NBD commands then fail with the reason.
func newNBDState(a *Agent) *nbdState {
	s := &nbdState{log: a.log, remotes: map[string]*remoteTarget{}}
	lo, hi, err := a.cfg.NBD.Ports()
	dir := filepath.Join(a.root, "nbd")
	tlsDir, psk := "", a.cfg.NBD.PSK(a.cfg.Token != "")
	if err == nil && a.cfg.TLS.Cert != "" && !psk {
		// The agent speaks HTTPS: NBD must not be the plaintext way in.
		tlsDir = filepath.Join(dir, "tls")
		err = prepareNBDTLS(tlsDir, a.cfg.TLS.Cert, a.cfg.TLS.Key)
	}
	if err == nil {
		s.mgr, err = nbd.NewManager(nbd.Options{
			Dir: dir, PortMin: lo, PortMax: hi,
			Bind: a.cfg.NBD.Bind, Logger: a.log, TLSDir: tlsDir, PSK: psk,
		})
	}
	mode := map[bool]string{true: "psk", false: "none"}[psk]
	if err != nil {
		s.err = fmt.Errorf("NBD unavailable on this agent: %w", err)
		a.log.Warn("nbd disabled", "err", err)
	} else {
		// Which credentials NBD clients need: the one thing a KVM host's
		// QEMU must match, so say it once at startup.
		a.log.Info("nbd ready", "portRange", a.cfg.NBD.PortRange, "clientAuth", mode, "x509", tlsDir != "")
	}
	if err == nil && !psk && a.cfg.Token != "" {
		// NBD has no bearer token: TLS (if any) encrypts and proves the
		// server, but any client that reaches a port can use its disk.
		a.log.Warn("nbd.clientAuth is none: anyone who can reach the nbd ports can read (and, for backup targets, write) the served disks; set nbd.clientAuth: psk, or firewall the port range to the KVM hosts",
			"portRange", a.cfg.NBD.PortRange, "tls", tlsDir != "")
	}
	a.reg.MustRegister(&nbdCollector{s: s})
	return s
}

// prepareNBDTLS lays out dir as QEMU's x509 credentials dir for qemu-nbd:
// server-cert.pem and server-key.pem link to the agent's TLS files, and
// ca-cert.pem holds the issuers that follow the leaf in certFile. QEMU
// checks the server certificate against ca-cert.pem and refuses a CA
// certificate as server certificate, so a self-signed certificate cannot
// serve NBD: tls.cert must be the leaf followed by its issuing CA(s).
func prepareNBDTLS(dir, certFile, keyFile string) error {
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

func (s *nbdState) manager() (*nbd.Manager, error) {
	if s == nil {
		return nil, errors.New("NBD unavailable on this agent")
	}
	if s.mgr == nil {
		return nil, s.err
	}
	return s.mgr, nil
}

// expire stops target groups past their expiry.
func (s *nbdState) expire(ctx context.Context, now time.Time) {
	if m, err := s.manager(); err == nil {
		m.Expire(ctx, now)
	}
}

// close stops every server the agent runs and releases the chains held.
func (s *nbdState) close() {
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

// nbdCollector reports running servers by kind at scrape time.
type nbdCollector struct{ s *nbdState }

var descNBDServers = prometheus.NewDesc("imagestore_agent_nbd_servers",
	"Running qemu-nbd servers by kind: target (writable backup targets) or remote (read-only chain exports).", []string{"kind"}, nil)

func (c *nbdCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descNBDServers }

func (c *nbdCollector) Collect(ch chan<- prometheus.Metric) {
	m, err := c.s.manager()
	if err != nil {
		return
	}
	w, r := m.Count()
	ch <- prometheus.MustNewConstMetric(descNBDServers, prometheus.GaugeValue, float64(w), "target")
	ch <- prometheus.MustNewConstMetric(descNBDServers, prometheus.GaugeValue, float64(r), "remote")
}

type exportNBDReq struct {
	Workspace  string    `json:"workspace"`
	Sizes      []flexInt `json:"sizes"`
	ExpireHour flexInt   `json:"expireHour"`
}

func (q *exportNBDReq) validate() error {
	if q.Workspace == "" {
		return missing("workspace")
	}
	if len(q.Sizes) == 0 {
		return missing("sizes")
	}
	for i, s := range q.Sizes {
		if s <= 0 {
			return fmt.Errorf("sizes[%d] = %d: must be positive", i, s)
		}
	}
	if q.ExpireHour < 0 {
		return fmt.Errorf("expireHour %d is negative", q.ExpireHour)
	}
	return nil
}

type exportNBDReply struct {
	ImagePaths     []string `json:"imagePaths"`
	Ports          []int    `json:"ports"`
	NBDDescription string   `json:"nbdDescription"`
	TLS            bool     `json:"tls"` // clients must connect with TLS (tls-creds)
	nbdKey
}

// nbdKey is the pre-shared key a client must present (nbd.clientAuth psk):
// QEMU's tls-creds-psk with username pskIdentity and, in its keys.psk,
// "pskIdentity:psk". Empty when the servers take no key.
type nbdKey struct {
	PSKIdentity string `json:"pskIdentity,omitempty"`
	PSK         string `json:"psk,omitempty"`
}

func nbdKeyOf(s nbd.Server) nbdKey {
	if s.PSK == "" {
		return nbdKey{}
	}
	return nbdKey{PSKIdentity: nbd.PSKIdentity, PSK: s.PSK}
}

// exportNBDImage creates empty qcow2 targets in the agent's private target
// dir and serves each writable over NBD for a KVM host's backup job. The
// targets expire with the workspace's upload dir (or after expireHour).
func (a *Agent) exportNBDImage(w http.ResponseWriter, r *http.Request) {
	var req exportNBDReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "exportnbdimage", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		m, err := a.nbd.manager()
		if err != nil {
			return nil, err
		}
		// The workspace only sets the default expiry: targets are created
		// in <root>/nbd/targets, which hosts cannot reach, so nobody can
		// swap a target for a symlink between create and serve.
		_, updir, err := a.confineWorkspace(req.Workspace)
		if err != nil {
			return nil, err
		}
		ttl := a.cfg.UploadDirExpiry
		if exp, err := a.uploads.Expiry(updir); err == nil {
			ttl = time.Until(exp)
		}
		if req.ExpireHour > 0 {
			ttl = time.Duration(req.ExpireHour) * time.Hour
		}
		if ttl <= 0 {
			return nil, fmt.Errorf("workspace %s: its upload dir has expired", req.Workspace)
		}
		sizes := make([]int64, len(req.Sizes))
		for i, s := range req.Sizes {
			sizes[i] = int64(s)
		}
		desc, servers, err := m.CreateTargets(ctx, sizes, ttl)
		if err != nil {
			return nil, err
		}
		rep := exportNBDReply{NBDDescription: desc}
		for _, s := range servers {
			rep.ImagePaths = append(rep.ImagePaths, s.Path)
			rep.Ports = append(rep.Ports, s.Port)
			rep.TLS = s.TLS
			rep.nbdKey = nbdKeyOf(s) // one key for the group
		}
		return rep, nil
	})
}

// nbdTargetPath reports whether path is a released NBD target of this
// agent (a regular file in <root>/nbd/targets whose server was released by
// processToRelease), and returns it cleaned. import-backup reads such a
// path although it is outside the upload dirs.
func (a *Agent) nbdTargetPath(path string) (string, bool) {
	p := path
	if rest, ok := strings.CutPrefix(p, "file://"); ok {
		p = rest
	}
	m, err := a.nbd.manager()
	if err != nil {
		return "", false
	}
	return m.TargetPath(p)
}

// confineWorkspace resolves ws (after symlinks) and checks it is a
// directory inside an upload dir; it returns it and that upload dir.
func (a *Agent) confineWorkspace(ws string) (string, string, error) {
	return a.uploads.ConfineWorkspace(ws)
}

type cancelNBDReq struct {
	NBDDescription string `json:"nbdDescription"`
}

func (q *cancelNBDReq) validate() error {
	if q.NBDDescription == "" {
		return missing("nbdDescription")
	}
	return nil
}

type cancelNBDReply struct {
	Cancelled bool `json:"cancelled"` // false when the targets were already gone
}

// cancelNBDImage stops a target group's servers and removes the targets.
// Cancelling an unknown (expired, released) group succeeds with
// cancelled:false, so retries are harmless.
func (a *Agent) cancelNBDImage(w http.ResponseWriter, r *http.Request) {
	var req cancelNBDReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "exportnbdimage-cancel", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		m, err := a.nbd.manager()
		if err != nil {
			return nil, err
		}
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), nbdStopTimeout)
		defer cancel()
		switch err := m.Cancel(sctx, req.NBDDescription); {
		case errors.Is(err, nbd.ErrNotFound):
			return cancelNBDReply{}, nil
		case err != nil:
			return nil, err
		}
		return cancelNBDReply{Cancelled: true}, nil
	})
}

type remoteTargetReq struct {
	InstallPath      string `json:"installPath"`
	RemoteTargetType string `json:"remoteTargetType"`
	Hostname         string `json:"hostname"`
}

func (q *remoteTargetReq) validate() error {
	if q.InstallPath == "" {
		return missing("installPath")
	}
	if q.RemoteTargetType != "" && !strings.EqualFold(q.RemoteTargetType, "NBD") {
		return fmt.Errorf("remoteTargetType %q not supported (NBD)", q.RemoteTargetType)
	}
	if strings.ContainsAny(q.Hostname, "/@?# ") {
		return fmt.Errorf("hostname %q is not a host name", q.Hostname)
	}
	return nil
}

type remoteTargetReply struct {
	TargetURI   string `json:"targetUri"`
	Port        int    `json:"port"`
	ExportName  string `json:"exportName"`
	InstallPath string `json:"installPath"`
	// TLS: connect with TLS. QEMU has no URI for that: clients use
	// targetUri's host, port and export with tls-creds (see the protocol doc).
	TLS bool `json:"tls"`
	nbdKey
}

func remoteReply(host string, srv nbd.Server, installPath string) remoteTargetReply {
	return remoteTargetReply{TargetURI: nbdURI(host, srv.Port, srv.ExportName), Port: srv.Port, ExportName: srv.ExportName,
		InstallPath: installPath, TLS: srv.TLS, nbdKey: nbdKeyOf(srv)}
}

// exportRemoteTarget serves a stored chain read-only over NBD, in place:
// qemu-nbd opens the top layer's blob and follows the canonical relative
// backing names through the blob directory. The chain's blobs are held
// so GC cannot free them while served. Exporting an already served image
// returns the running server.
func (a *Agent) exportRemoteTarget(w http.ResponseWriter, r *http.Request) {
	var req remoteTargetReq
	err := decode(r, &req)
	host := req.Hostname
	if host == "" {
		host = hostOnly(r.Host)
	}
	a.async(w, r, JobSpec{Kind: "remotetarget", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		m, err := a.nbd.manager()
		if err != nil {
			return nil, err
		}
		img, err := a.lookupImage(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		if img.Format != "qcow2" {
			return nil, fmt.Errorf("image %s has format %s; only qcow2 images can be served over NBD", img.Ref, img.Format)
		}
		job.SetImage("", img.InstallPath(), img.Format)
		chain, err := a.store.Chain(ctx, img.Ref)
		if err != nil {
			return nil, err
		}
		return a.nbd.serveChain(ctx, m, a.store, img, chain, host)
	})
}

// serveChain starts (or finds) the read-only server of img; chain is
// img's chain, top first (blobstore.Chain).
func (s *nbdState) serveChain(ctx context.Context, m *nbd.Manager, store *blobstore.Store, img blobstore.Image, chain []blobstore.Image, host string) (remoteTargetReply, error) {
	name := nbdExportName(img)
	s.mu.Lock()
	defer s.mu.Unlock()
	running := map[string]nbd.Server{}
	for _, srv := range m.List() {
		running[srv.ID] = srv
	}
	for id, rt := range s.remotes {
		srv, ok := running[id]
		if !ok { // the server died: forget it and serve anew
			rt.release()
			delete(s.remotes, id)
			continue
		}
		if rt.installPath == img.InstallPath() {
			return remoteReply(host, srv, rt.installPath), nil
		}
	}
	blobs := make([]digest.Digest, len(chain))
	base := make([]blobstore.Image, len(chain))
	for i, c := range chain {
		blobs[i] = c.Blob
		base[len(chain)-1-i] = c
	}
	release := store.Hold(blobs...)
	// qemu-nbd follows each layer's backing name blindly; records made by
	// import and replicate.Apply were checked, but a store written by an
	// older version or by hand may hold anything. Check again, held.
	for _, c := range base {
		if c.Format != "qcow2" {
			release()
			return remoteTargetReply{}, fmt.Errorf("image %s: layer %s has format %s; only qcow2 chains can be served over NBD", img.Ref, c.Ref, c.Format)
		}
	}
	if err := replicate.CheckLayers(ctx, store, base); err != nil {
		release()
		return remoteTargetReply{}, fmt.Errorf("image %s cannot be served over NBD: %w", img.Ref, err)
	}
	path, err := store.BlobPath(img.Blob)
	if err != nil {
		release()
		return remoteTargetReply{}, err
	}
	srv, err := m.ServeReadOnly(ctx, path, name)
	if err != nil {
		release()
		return remoteTargetReply{}, err
	}
	rep := remoteReply(host, srv, img.InstallPath())
	s.remotes[srv.ID] = &remoteTarget{installPath: img.InstallPath(), uri: rep.TargetURI, release: release}
	return rep, nil
}

// nbdExportName names an image's export: its name and id when those are
// safe in an NBD URI, else its id.
func nbdExportName(img blobstore.Image) string {
	ok := func(s string) bool {
		for _, c := range s {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
				return false
			}
		}
		return s != ""
	}
	if ok(img.Name) && ok(img.ID) && len(img.Name)+len(img.ID) < 250 {
		return img.Name + ":" + img.ID
	}
	return "image-" + strings.Map(func(c rune) rune {
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' {
			return c
		}
		return '-'
	}, strings.ToLower(img.ID))
}

func nbdURI(host string, port int, export string) string {
	return "nbd://" + net.JoinHostPort(host, strconv.Itoa(port)) + "/" + export
}

// hostOnly strips the port from a Host header.
func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return strings.Trim(hostport, "[]")
}

type deleteRemoteReq struct {
	TargetURI   string `json:"targetUri"`
	InstallPath string `json:"installPath"`
}

func (q *deleteRemoteReq) validate() error {
	if q.TargetURI == "" && q.InstallPath == "" {
		return missing("targetUri")
	}
	if q.TargetURI != "" {
		u, err := url.Parse(q.TargetURI)
		if err != nil || u.Scheme != "nbd" || u.Port() == "" {
			return fmt.Errorf("targetUri %q is not an nbd://host:port/export URI", q.TargetURI)
		}
	}
	return nil
}

type deleteRemoteReply struct {
	Deleted int `json:"deleted"`
}

// deleteRemoteTarget stops the read-only servers matching targetUri (by
// port and export name; the host may be spelled differently) or
// installPath, and releases their chains. No match succeeds with deleted:0.
func (a *Agent) deleteRemoteTarget(w http.ResponseWriter, r *http.Request) {
	var req deleteRemoteReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "remotetarget-delete", Err: err}, func(ctx context.Context, job *Job) (any, error) {
		m, err := a.nbd.manager()
		if err != nil {
			return nil, err
		}
		port, export := 0, ""
		if req.TargetURI != "" {
			u, _ := url.Parse(req.TargetURI)
			port, _ = strconv.Atoi(u.Port())
			export = strings.TrimPrefix(u.Path, "/")
		}
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), nbdStopTimeout)
		defer cancel()
		n, err := a.nbd.stopRemotes(sctx, m, func(srv nbd.Server, rt *remoteTarget) bool {
			return (req.TargetURI == "" || (srv.Port == port && srv.ExportName == export)) &&
				(req.InstallPath == "" || rt.installPath == req.InstallPath)
		})
		if err != nil {
			return nil, err
		}
		return deleteRemoteReply{Deleted: n}, nil
	})
}

func (s *nbdState) stopRemotes(ctx context.Context, m *nbd.Manager, match func(nbd.Server, *remoteTarget) bool) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	running := map[string]nbd.Server{}
	for _, srv := range m.List() {
		running[srv.ID] = srv
	}
	n := 0
	var errs []error
	for id, rt := range s.remotes {
		srv, ok := running[id]
		if ok && !match(srv, rt) {
			continue
		}
		if ok {
			if err := m.Stop(ctx, id); err != nil && !errors.Is(err, nbd.ErrNotFound) {
				errs = append(errs, err)
				continue
			}
			n++
		}
		rt.release()
		delete(s.remotes, id)
	}
	return n, errors.Join(errs...)
}

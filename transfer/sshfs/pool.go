// Package sshfs reads and writes files on remote hosts over SFTP, keeping
// verified SSH connections per host (and identity, and lane) open and reused.
//
// Host keys are always verified: against Host.Fingerprint when it is set (a
// pin; known_hosts is then not consulted), otherwise against
// Host.KnownHostsFile. With neither, every connection is refused: there is
// no insecure default.
package sshfs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// Host names a remote account. Password and PrivateKey are secrets: they are
// never logged and never appear in errors.
type Host struct {
	Addr           string // host:port (port 22 if omitted)
	User           string
	Password       string // never logged
	PrivateKey     []byte // PEM (OpenSSH or PKCS#1/8), unencrypted; never logged
	KnownHostsFile string // required unless Fingerprint is set
	Fingerprint    string // "SHA256:..." pins the host key
	// Lane picks one of several pooled connections to the same host (0 is
	// the default one). Parallel streams on separate lanes each get their
	// own TCP connection, sshd process and SSH channel windows, which the
	// streams of one connection share.
	Lane int
}

// Errors callers branch on; returned errors wrap one of them.
var (
	ErrHostKey     = errors.New("sshfs: host key verification failed")
	ErrAuth        = errors.New("sshfs: authentication failed")
	ErrUnreachable = errors.New("sshfs: host unreachable")
)

// PoolOptions tune a Pool; zero values get defaults.
type PoolOptions struct {
	DialTimeout time.Duration // TCP connect + SSH handshake; default 15s
	Keepalive   time.Duration // keepalive@openssh.com interval; default 15s; <0 disables
	IdleTimeout time.Duration // close connections unused this long; default 5m; <0 never
	Logger      *slog.Logger  // default slog.Default()
	// Dial opens the TCP connection (default net.Dialer). Useful to wrap the
	// connection, e.g. with a rate limiter, or to count dials in tests.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Sessions is how many SFTP sessions each connection keeps, handed out
	// round-robin so parallel readers do not share one request queue;
	// default 2.
	Sessions int
}

// Pool keeps one SSH connection per (address, user, identity, host key
// policy, lane), reused across calls, with keepalives and idle close. It is
// safe for concurrent use.
type Pool struct {
	opts PoolOptions
	log  *slog.Logger

	mu      sync.Mutex
	conns   map[string]*conn
	dialing map[string]*dialCall
	closed  bool

	stop chan struct{}
	wg   sync.WaitGroup
}

type dialCall struct {
	done chan struct{}
	c    *conn
	err  error
}

// conn is one live SSH connection and its SFTP sessions.
type conn struct {
	key    string
	addr   string
	client *ssh.Client
	dead   chan struct{} // closed once the SSH connection is gone

	mu       sync.Mutex
	sftps    []*sftp.Client
	next     int
	refs     int
	lastUsed time.Time
}

// NewPool returns an empty pool; Close it to drop every connection.
func NewPool(opts PoolOptions) *Pool {
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 15 * time.Second
	}
	if opts.Keepalive == 0 {
		opts.Keepalive = 15 * time.Second
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = 5 * time.Minute
	}
	if opts.Sessions <= 0 {
		opts.Sessions = 2
	}
	if opts.Dial == nil {
		d := &net.Dialer{KeepAlive: 30 * time.Second}
		opts.Dial = d.DialContext
	}
	p := &Pool{
		opts:    opts,
		log:     opts.Logger,
		conns:   map[string]*conn{},
		dialing: map[string]*dialCall{},
		stop:    make(chan struct{}),
	}
	if p.log == nil {
		p.log = slog.Default()
	}
	if opts.IdleTimeout > 0 {
		p.wg.Add(1)
		go p.reapIdle()
	}
	return p
}

// Close closes every connection; later calls fail.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	conns := p.conns
	p.conns = map[string]*conn{}
	p.mu.Unlock()
	close(p.stop)
	for _, c := range conns {
		c.close()
	}
	p.wg.Wait()
	return nil
}

var errPoolClosed = errors.New("sshfs: pool closed")

// Client returns an SFTP client on the pooled connection for h, dialling it
// if needed. Call release when done with it; the client must not be closed.
func (p *Pool) Client(ctx context.Context, h Host) (*sftp.Client, func(), error) {
	c, sc, err := p.acquire(ctx, h)
	if err != nil {
		return nil, nil, err
	}
	var once sync.Once
	return sc, func() { once.Do(c.release) }, nil
}

// get returns a live, referenced connection for h.
func (p *Pool) get(ctx context.Context, h Host) (*conn, error) {
	h.Addr = withPort(h.Addr)
	key := poolKey(h)
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, errPoolClosed
		}
		if c, ok := p.conns[key]; ok {
			select {
			case <-c.dead:
				delete(p.conns, key)
			default:
				c.acquire()
				p.mu.Unlock()
				return c, nil
			}
		}
		// One dial per key at a time; the others wait for its result.
		if d, ok := p.dialing[key]; ok {
			p.mu.Unlock()
			select {
			case <-d.done:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if d.err != nil {
				return nil, d.err
			}
			continue
		}
		d := &dialCall{done: make(chan struct{})}
		p.dialing[key] = d
		p.mu.Unlock()

		c, err := p.dial(ctx, h, key)
		p.mu.Lock()
		delete(p.dialing, key)
		d.c, d.err = c, err
		close(d.done)
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		if p.closed {
			p.mu.Unlock()
			c.close()
			return nil, errPoolClosed
		}
		p.conns[key] = c
		c.acquire()
		p.mu.Unlock()
		p.wg.Add(1)
		go p.watch(c)
		return c, nil
	}
}

// drop forgets c (if still pooled) and closes it, so the next call redials.
func (p *Pool) drop(c *conn) {
	p.mu.Lock()
	if p.conns[c.key] == c {
		delete(p.conns, c.key)
	}
	p.mu.Unlock()
	c.close()
}

// watch sends keepalives until the connection dies, then unpools it.
func (p *Pool) watch(c *conn) {
	defer p.wg.Done()
	go func() {
		_ = c.client.Wait()
		close(c.dead)
	}()
	var tick <-chan time.Time
	if p.opts.Keepalive > 0 {
		t := time.NewTicker(p.opts.Keepalive)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-c.dead:
			p.drop(c)
			return
		case <-p.stop:
			c.close()
			<-c.dead
			return
		case <-tick:
			if !p.keepalive(c) {
				p.log.Warn("sshfs: keepalive failed, dropping connection", "addr", c.addr)
				p.drop(c)
			}
		}
	}
}

// keepalive reports whether the server answered a keepalive@openssh.com
// request (any reply, even a refusal, proves it is alive) in time.
func (p *Pool) keepalive(c *conn) bool {
	res := make(chan error, 1)
	go func() {
		_, _, err := c.client.SendRequest("keepalive@openssh.com", true, nil)
		res <- err
	}()
	timeout := 2 * p.opts.Keepalive
	if timeout < 5*time.Second {
		timeout = 5 * time.Second
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-res:
		return err == nil
	case <-t.C:
		return false
	case <-c.dead:
		return false
	}
}

func (p *Pool) reapIdle() {
	defer p.wg.Done()
	every := p.opts.IdleTimeout / 4
	if every < 50*time.Millisecond {
		every = 50 * time.Millisecond
	}
	if every > time.Minute {
		every = time.Minute
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			var idle []*conn
			p.mu.Lock()
			for k, c := range p.conns {
				if c.idleSince(now) >= p.opts.IdleTimeout {
					delete(p.conns, k)
					idle = append(idle, c)
				}
			}
			p.mu.Unlock()
			for _, c := range idle {
				p.log.Debug("sshfs: closing idle connection", "addr", c.addr)
				c.close()
			}
		}
	}
}

func (c *conn) acquire() {
	c.mu.Lock()
	c.refs++
	c.lastUsed = time.Now()
	c.mu.Unlock()
}

func (c *conn) release() {
	c.mu.Lock()
	c.refs--
	c.lastUsed = time.Now()
	c.mu.Unlock()
}

// idleSince is how long c has been unreferenced (0 while in use).
func (c *conn) idleSince(now time.Time) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refs > 0 {
		return 0
	}
	return now.Sub(c.lastUsed)
}

// session returns the next SFTP session, opening sessions lazily up to n.
func (c *conn) session(n int) (*sftp.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.sftps) < n {
		sc, err := sftp.NewClient(c.client,
			sftp.UseConcurrentReads(true),
			sftp.UseConcurrentWrites(true),
			sftp.MaxConcurrentRequestsPerFile(64),
			// OpenSSH serves reads and writes far larger than 32 KiB; bigger
			// requests halve the per-request overhead on fast links.
			sftp.MaxPacketUnchecked(sftpPacket),
		)
		if err != nil {
			if len(c.sftps) > 0 {
				// Sessions may be capped (MaxSessions); reuse what we have.
				return c.pick(), nil
			}
			return nil, err
		}
		c.sftps = append(c.sftps, sc)
		return sc, nil
	}
	return c.pick(), nil
}

// sftpPacket is the SFTP read/write request size. OpenSSH's limit is 256 KiB
// for reads (it shortens longer ones) and accepts writes up to its 256 KiB
// packet limit minus headers.
const sftpPacket = 255 << 10

func (c *conn) pick() *sftp.Client {
	sc := c.sftps[c.next%len(c.sftps)]
	c.next++
	return sc
}

func (c *conn) close() {
	c.mu.Lock()
	sftps := c.sftps
	c.sftps = nil
	c.mu.Unlock()
	for _, sc := range sftps {
		_ = sc.Close()
	}
	_ = c.client.Close()
}

// dial connects and authenticates, mapping failures to the sentinels.
func (p *Pool) dial(ctx context.Context, h Host, key string) (*conn, error) {
	cfg, err := clientConfig(h)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.opts.DialTimeout)
	defer cancel()
	nc, err := p.opts.Dial(ctx, "tcp", h.Addr)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrUnreachable, h.Addr, err)
	}
	// The handshake honours the deadline and ctx (closing the conn unblocks it).
	deadline, _ := ctx.Deadline()
	_ = nc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = nc.Close() })
	sc, chans, reqs, err := ssh.NewClientConn(nc, h.Addr, cfg)
	stopped := stop()
	if err != nil {
		_ = nc.Close()
		return nil, classify(ctx, h, err)
	}
	if !stopped {
		_ = sc.Close()
		return nil, fmt.Errorf("%w: %s: %w", ErrUnreachable, h.Addr, ctx.Err())
	}
	_ = nc.SetDeadline(time.Time{})
	p.log.Debug("sshfs: connected", "addr", h.Addr, "user", h.User)
	return &conn{
		key:      key,
		addr:     h.Addr,
		client:   ssh.NewClient(sc, chans, reqs),
		dead:     make(chan struct{}),
		lastUsed: time.Now(),
	}, nil
}

func classify(ctx context.Context, h Host, err error) error {
	var hk *hostKeyError
	switch {
	case errors.As(err, &hk):
		return hk // already wraps ErrHostKey with a full explanation
	case strings.Contains(err.Error(), "unable to authenticate"):
		return fmt.Errorf("%w: %s@%s: server refused the credentials", ErrAuth, h.User, h.Addr)
	case ctx.Err() != nil:
		return fmt.Errorf("%w: %s: SSH handshake: %w", ErrUnreachable, h.Addr, ctx.Err())
	default:
		return fmt.Errorf("%w: %s: SSH handshake: %w", ErrUnreachable, h.Addr, err)
	}
}

func clientConfig(h Host) (*ssh.ClientConfig, error) {
	cb, algos, err := hostKeyCallback(h)
	if err != nil {
		return nil, err
	}
	var auth []ssh.AuthMethod
	if len(h.PrivateKey) > 0 {
		signer, err := ssh.ParsePrivateKey(h.PrivateKey)
		if err != nil {
			// The parse error never quotes key material.
			return nil, fmt.Errorf("%w: parse private key for %s@%s: %w", ErrAuth, h.User, h.Addr, err)
		}
		auth = append(auth, ssh.PublicKeys(signer))
	}
	if h.Password != "" {
		pw := h.Password
		auth = append(auth, ssh.Password(pw),
			ssh.KeyboardInteractive(func(_, _ string, qs []string, _ []bool) ([]string, error) {
				ans := make([]string, len(qs))
				for i := range ans {
					ans[i] = pw
				}
				return ans, nil
			}))
	}
	if len(auth) == 0 {
		return nil, fmt.Errorf("%w: %s@%s: no private key or password given", ErrAuth, h.User, h.Addr)
	}
	return &ssh.ClientConfig{
		User:              h.User,
		Auth:              auth,
		HostKeyCallback:   cb,
		HostKeyAlgorithms: algos,
	}, nil
}

// poolKey identifies a connection: hashes keep secrets out of map keys.
func poolKey(h Host) string {
	sum := sha256.New()
	for _, s := range []string{h.Addr, h.User, h.Password, string(h.PrivateKey), h.KnownHostsFile, h.Fingerprint} {
		fmt.Fprintf(sum, "%d:%s", len(s), s)
	}
	fmt.Fprintf(sum, "lane:%d", h.Lane)
	return hex.EncodeToString(sum.Sum(nil))
}

func withPort(addr string) string {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return net.JoinHostPort(strings.Trim(addr, "[]"), "22")
	}
	return addr
}

// numConns is how many connections are pooled (for tests).
func (p *Pool) numConns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

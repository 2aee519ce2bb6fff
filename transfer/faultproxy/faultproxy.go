// Package faultproxy is a TCP proxy for tests that cuts connections after a
// number of forwarded bytes, to exercise resume and clean-failure paths,
// and can corrupt a byte on the way (FlipAt).
package faultproxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Proxy forwards connections from Addr() to a target. Cutting is off until
// CutAfter is called.
//
// A connection's byte count is the sum of both directions (client→server
// plus server→client). When it would exceed the CutAfter limit, exactly the
// remaining bytes are forwarded and then both sides are closed (a cut).
type Proxy struct {
	target string
	ln     net.Listener

	mu       sync.Mutex
	cutAfter int64 // 0 = never cut
	flipAt   int64 // <0 = never corrupt
	cutsLeft int   // <0 = unlimited
	cuts     int
	conns    int
	live     map[*link]struct{}
	links    []*link // every accepted connection, in order
	closed   bool

	wg sync.WaitGroup
}

// New listens on 127.0.0.1:0 and forwards to target; it closes when the test
// ends.
func New(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("faultproxy: listen: %v", err)
	}
	p := &Proxy{target: target, ln: ln, cutsLeft: -1, flipAt: -1, live: map[*link]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// Addr is the proxy's "127.0.0.1:port".
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// CutAfter makes connections accepted from now on be cut once n bytes (both
// directions together) have gone through them. n <= 0 turns cutting off.
func (p *Proxy) CutAfter(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n < 0 {
		n = 0
	}
	p.cutAfter = n
}

// FlipAt makes connections accepted from now on corrupt one byte: the one
// at offset n of what the client sends (counted from the connection's
// first byte) reaches the server with its lowest bit flipped. n < 0 turns
// it off.
func (p *Proxy) FlipAt(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.flipAt = max(n, -1)
}

// CutNext limits cutting to the next k cuts; after that connections pass
// through whole. k < 0 means unlimited (the default).
func (p *Proxy) CutNext(k int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cutsLeft = k
}

// Cuts is how many connections have been cut so far.
func (p *Proxy) Cuts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cuts
}

// Conns is how many connections have been accepted so far.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns
}

// ConnBytes is, for every connection accepted so far in order, the bytes
// forwarded through it (both directions).
func (p *Proxy) ConnBytes() []int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]int64, len(p.links))
	for i, l := range p.links {
		out[i] = l.bytes.Load()
	}
	return out
}

// CloseConns closes every live connection now, each counted as a cut,
// leaving the listener up.
func (p *Proxy) CloseConns() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for l := range p.live {
		l.close()
		p.cuts++
	}
}

// Close stops listening, closes every live connection and waits for the
// forwarding goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	err := p.ln.Close()
	for l := range p.live {
		l.close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			_ = c.Close()
			return
		}
		p.conns++
		l := &link{client: c}
		p.live[l] = struct{}{}
		p.links = append(p.links, l)
		limit, flip := p.cutAfter, p.flipAt
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(l, limit, flip)
	}
}

// link is one proxied connection pair.
type link struct {
	mu     sync.Mutex
	client net.Conn
	server net.Conn // nil until dialled
	closed bool
	bytes  atomic.Int64 // forwarded, both directions
}

func (l *link) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	_ = l.client.Close()
	if l.server != nil {
		_ = l.server.Close()
	}
}

// budget is one connection's shared byte allowance.
type budget struct {
	mu        sync.Mutex
	limit     int64 // 0 = unlimited
	used      int64
	unlimited bool // set once the proxy's cut quota ran out for this conn
}

// take returns how many of n bytes may be forwarded and whether the
// connection must be cut afterwards.
func (p *Proxy) take(b *budget, n int) (int, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.limit == 0 || b.unlimited {
		return n, false
	}
	if b.used+int64(n) < b.limit {
		b.used += int64(n)
		return n, false
	}
	p.mu.Lock()
	if p.cutsLeft == 0 {
		p.mu.Unlock()
		b.unlimited = true
		return n, false
	}
	if p.cutsLeft > 0 {
		p.cutsLeft--
	}
	p.cuts++
	p.mu.Unlock()
	allowed := int(b.limit - b.used)
	b.used = b.limit
	b.unlimited = true // count the cut once; both sides get closed now
	return allowed, true
}

func (p *Proxy) serve(l *link, limit, flip int64) {
	defer p.wg.Done()
	defer func() {
		l.close()
		p.mu.Lock()
		delete(p.live, l)
		p.mu.Unlock()
	}()
	server, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	l.mu.Lock()
	l.server = server
	closed := l.closed
	l.mu.Unlock()
	if closed {
		_ = server.Close()
		return
	}
	b := &budget{limit: limit}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(server, l.client, b, l, flip) }()
	go func() { defer wg.Done(); p.pipe(l.client, server, b, l, -1) }()
	wg.Wait()
}

// pipe copies src to dst under the connection budget. On EOF it half-closes
// dst so protocols that rely on shutdown still work; on any error or cut it
// closes both sides. The byte at offset flip of src (if >= 0) goes out
// with its lowest bit flipped.
func (p *Proxy) pipe(dst, src net.Conn, b *budget, l *link, flip int64) {
	closeBoth := l.close
	buf := make([]byte, 32<<10)
	var pos int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if flip >= pos && flip < pos+int64(n) {
				buf[flip-pos] ^= 1
			}
			pos += int64(n)
			allowed, cut := p.take(b, n)
			if allowed > 0 {
				l.bytes.Add(int64(allowed))
				if _, werr := dst.Write(buf[:allowed]); werr != nil {
					closeBoth()
					return
				}
			}
			if cut {
				closeBoth()
				return
			}
		}
		if err != nil {
			tc, ok := dst.(*net.TCPConn)
			if !errors.Is(err, io.EOF) || !ok {
				closeBoth()
				return
			}
			_ = tc.CloseWrite()
			return
		}
	}
}

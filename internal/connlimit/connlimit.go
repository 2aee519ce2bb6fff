// Package connlimit caps how many connections a listener has open at once.
//
// Accept waits while the cap is reached instead of accepting and closing:
// clients beyond the cap stay in the kernel's accept backlog and are served
// as soon as a connection closes, rather than being refused.
package connlimit

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// Listener is a net.Listener that has at most Limit connections open.
// Wrap the TCP listener with it and put TLS outside
// (tls.NewListener(connlimit.New(tcp, n), cfg)): net/http recognises only a
// *tls.Conn as TLS, and closing the tls.Conn closes, and so releases, ours.
type Listener struct {
	net.Listener
	slots chan struct{} // one token per connection open or being accepted
	open  atomic.Int64  // connections accepted and not yet closed
	done  chan struct{} // closed by Close: a waiting Accept returns
	once  sync.Once
}

// New caps ln at limit open connections; limit must be positive.
func New(ln net.Listener, limit int) (*Listener, error) {
	if limit < 1 {
		return nil, fmt.Errorf("connlimit: limit %d, must be positive", limit)
	}
	return &Listener{Listener: ln, slots: make(chan struct{}, limit), done: make(chan struct{})}, nil
}

// Accept waits for a free slot, then for a connection. It returns
// net.ErrClosed once Close was called, also while waiting for a slot.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.done:
		return nil, fmt.Errorf("connlimit: accept: %w", net.ErrClosed)
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	l.open.Add(1)
	return &conn{Conn: c, l: l}, nil
}

// Close closes the listener and wakes an Accept waiting for a slot.
// Connections already accepted stay open.
func (l *Listener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// Open is the number of accepted connections not yet closed.
func (l *Listener) Open() int { return int(l.open.Load()) }

// Limit is the cap New was given.
func (l *Listener) Limit() int { return cap(l.slots) }

func (l *Listener) release() {
	l.open.Add(-1)
	<-l.slots
}

// conn gives its slot back on the first Close; net/http closes a
// connection more than once (and tls.Conn passes each Close down).
type conn struct {
	net.Conn
	l    *Listener
	once sync.Once
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.l.release)
	return err
}

// ReadFrom and CloseWrite pass on what net/http looks for on the
// connection it serves: ReadFrom is how a plain-HTTP response body from a
// file goes out by sendfile (export downloads), CloseWrite the FIN it sends
// before closing after an error (so the client reads the answer instead of
// a reset). Embedding net.Conn alone would hide both.

func (c *conn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	// Only Write: io.Copy would otherwise find this ReadFrom again.
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

func (c *conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return fmt.Errorf("connlimit: close write: %w", errors.ErrUnsupported)
}

package connlimit

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imagestore/internal/testcert"
	"imagestore/internal/testwait"
)

// notWithin is how long a "did not happen" check waits. A broken cap
// accepts within milliseconds; a loaded machine can only make such a check
// pass wrongly, never fail wrongly. Checks that something does happen wait
// up to testwait.Deadline.
const notWithin = time.Second

type accepted struct {
	c   net.Conn
	err error
}

func acceptAsync(l net.Listener) <-chan accepted {
	ch := make(chan accepted, 1)
	go func() {
		c, err := l.Accept()
		ch <- accepted{c, err}
	}()
	return ch
}

// mustAccept waits for one Accept to return a connection.
func mustAccept(t *testing.T, l net.Listener) net.Conn {
	t.Helper()
	return await(t, acceptAsync(l), "accept")
}

func await(t *testing.T, ch <-chan accepted, what string) net.Conn {
	t.Helper()
	select {
	case a := <-ch:
		if a.err != nil {
			t.Fatalf("%s: %v", what, a.err)
		}
		t.Cleanup(func() { closeConn(t, a.c) })
		return a.c
	case <-time.After(testwait.Deadline):
		t.Fatalf("%s: no connection after %v", what, testwait.Deadline)
		return nil
	}
}

// closeConn closes an accepted connection, also one closed before: a
// second release would block, or take another connection's slot.
func closeConn(t *testing.T, c net.Conn) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); c.Close() }()
	select {
	case <-done:
	case <-time.After(testwait.Deadline):
		t.Errorf("Close of %v did not return", c.LocalAddr())
	}
}

func notAccepted(t *testing.T, ch <-chan accepted, why string) {
	t.Helper()
	select {
	case a := <-ch:
		if a.c != nil {
			a.c.Close()
		}
		t.Fatalf("accepted (err %v) %s", a.err, why)
	case <-time.After(notWithin):
	}
}

// countingListener counts the connections the kernel handed out.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (c *countingListener) Accept() (net.Conn, error) {
	conn, err := c.Listener.Accept()
	if err == nil {
		c.n.Add(1)
	}
	return conn, err
}

func listenTCP(t *testing.T, limit int) *Listener {
	l, _ := listenCounting(t, limit)
	return l
}

func listenCounting(t *testing.T, limit int) (*Listener, *countingListener) {
	t.Helper()
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	inner := &countingListener{Listener: tcp}
	l, err := New(inner, limit)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, inner
}

// dial connects a client; the kernel completes the handshake whether or
// not the server accepts, so clients beyond the cap wait in the backlog.
func dial(t *testing.T, l net.Listener) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestNewRejectsNonPositive(t *testing.T) {
	for _, limit := range []int{0, -1} {
		if l, err := New(&fakeListener{}, limit); err == nil {
			t.Errorf("New(%d) = %v, want an error", limit, l)
		}
	}
}

func TestCapHolds(t *testing.T) {
	for _, limit := range []int{1, 2, 5} {
		t.Run(fmt.Sprint(limit), func(t *testing.T) {
			l, inner := listenCounting(t, limit)
			if l.Limit() != limit {
				t.Fatalf("Limit() = %d, want %d", l.Limit(), limit)
			}
			var conns []net.Conn
			for range limit + 1 {
				dial(t, l)
			}
			for range limit {
				conns = append(conns, mustAccept(t, l))
			}
			if got := l.Open(); got != limit {
				t.Fatalf("Open() = %d after %d accepts, want %d", got, limit, limit)
			}
			pending := acceptAsync(l)
			notAccepted(t, pending, fmt.Sprintf("with %d of %d open", limit, limit))
			// Not taken from the kernel either: it stays in the backlog.
			if got := inner.n.Load(); got != int64(limit) {
				t.Fatalf("%d connections taken from the kernel, want %d", got, limit)
			}
			closeConn(t, conns[0])
			await(t, pending, "accept after a close")
			if got := l.Open(); got != limit {
				t.Fatalf("Open() = %d, want %d", got, limit)
			}
		})
	}
}

func TestCloseReleasesOnce(t *testing.T) {
	for _, closes := range []int{1, 2, 3} {
		t.Run(fmt.Sprint(closes), func(t *testing.T) {
			l := listenTCP(t, 2)
			dial(t, l)
			dial(t, l)
			a := mustAccept(t, l)
			mustAccept(t, l)
			for range closes {
				closeConn(t, a)
			}
			if got := l.Open(); got != 1 {
				t.Fatalf("Open() = %d after closing one of two connections %d times, want 1", got, closes)
			}
			// One slot is free: one more client is served, the next waits.
			dial(t, l)
			dial(t, l)
			mustAccept(t, l)
			notAccepted(t, acceptAsync(l), "beyond the cap after a repeated Close")
		})
	}
}

func TestCloseWakesWaitingAccept(t *testing.T) {
	l := listenTCP(t, 1)
	client := dial(t, l)
	c := mustAccept(t, l)
	pending := acceptAsync(l)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case a := <-pending:
		if !errors.Is(a.err, net.ErrClosed) {
			t.Fatalf("Accept after Close: %v, %v; want net.ErrClosed", a.c, a.err)
		}
	case <-time.After(testwait.Deadline):
		t.Fatal("Accept waiting for a slot did not return after Close")
	}
	// What was accepted stays open.
	if _, err := client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("accepted connection after the listener closed: %v", err)
	}
}

func TestAcceptErrorReleasesSlot(t *testing.T) {
	f := newFakeListener()
	f.errs <- errors.New("too many open files")
	l, err := New(f, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := l.Accept(); err == nil {
		t.Fatal("the inner listener's error was not returned")
	}
	f.dial()
	mustAccept(t, l)
	if got := l.Open(); got != 1 {
		t.Fatalf("Open() = %d, want 1", got)
	}
}

// TestConnPassesOn: what net/http looks for on a connection (ReadFrom for
// sendfile, CloseWrite before closing) reaches the inner connection, and
// works when the inner connection has neither.
func TestConnPassesOn(t *testing.T) {
	for _, tc := range []struct {
		name       string
		pair       func(t *testing.T) (server, client net.Conn)
		closeWrite bool // the inner connection has CloseWrite
	}{
		{"tcp", func(t *testing.T) (net.Conn, net.Conn) {
			l := listenTCP(t, 1)
			client := dial(t, l)
			return mustAccept(t, l), client
		}, true},
		{"pipe", func(t *testing.T) (net.Conn, net.Conn) {
			f := newFakeListener()
			l, err := New(f, 1)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			client := f.dial()
			t.Cleanup(func() { client.Close() })
			return mustAccept(t, l), client
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			server, client := tc.pair(t)
			rf, ok := server.(io.ReaderFrom)
			if !ok {
				t.Fatal("accepted connection has no ReadFrom")
			}
			got := make(chan string, 1)
			go func() {
				b, _ := io.ReadAll(client)
				got <- string(b)
			}()
			if n, err := rf.ReadFrom(strings.NewReader("hello")); n != 5 || err != nil {
				t.Fatalf("ReadFrom = %d, %v", n, err)
			}
			cw, ok := server.(interface{ CloseWrite() error })
			if !ok {
				t.Fatal("accepted connection has no CloseWrite")
			}
			err := cw.CloseWrite()
			if tc.closeWrite {
				if err != nil {
					t.Fatalf("CloseWrite: %v", err)
				}
			} else {
				if !errors.Is(err, errors.ErrUnsupported) {
					t.Fatalf("CloseWrite without one inside: %v, want ErrUnsupported", err)
				}
				server.Close() // a pipe ends only so
			}
			select {
			case s := <-got:
				if s != "hello" {
					t.Fatalf("client read %q", s)
				}
			case <-time.After(testwait.Deadline):
				t.Fatal("client saw no end of stream")
			}
		})
	}
}

// TestUnderTLS: under tls.NewListener, HTTP requests arrive as TLS (net/http
// sees its *tls.Conn), and a second client is served once the first, an
// idle keep-alive connection, goes away.
func TestUnderTLS(t *testing.T) {
	ca := testcert.NewCA(t)
	pair := ca.Issue(t, "127.0.0.1")
	cert, err := tls.X509KeyPair(pair.CertPEM(), pair.KeyPEM())
	if err != nil {
		t.Fatal(err)
	}
	l := listenTCP(t, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, r.TLS != nil)
	})}
	go srv.Serve(tls.NewListener(l, &tls.Config{Certificates: []tls.Certificate{cert}}))
	t.Cleanup(func() { srv.Close() })

	url := "https://" + l.Addr().String() + "/"
	client := func() (*http.Client, *http.Transport) {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr}, tr
	}
	get := func(c *http.Client) <-chan string {
		ch := make(chan string, 1)
		go func() {
			res, err := c.Get(url)
			if err != nil {
				ch <- err.Error()
				return
			}
			defer res.Body.Close()
			b, _ := io.ReadAll(res.Body)
			ch <- string(b)
		}()
		return ch
	}
	first, firstTr := client()
	if s := <-get(first); s != "true" {
		t.Fatalf("first client: %q, want true (a request seen as TLS)", s)
	}
	// first's connection is now idle in its pool, holding the one slot.
	second, _ := client()
	ans := get(second)
	select {
	case s := <-ans:
		t.Fatalf("second client answered (%q) while the first held the only slot", s)
	case <-time.After(notWithin):
	}
	firstTr.CloseIdleConnections()
	select {
	case s := <-ans:
		if s != "true" {
			t.Fatalf("second client: %q", s)
		}
	case <-time.After(testwait.Deadline):
		t.Fatal("second client not served after the first disconnected")
	}
	testwait.For(t, "one connection open", func() bool { return l.Open() == 1 })
}

// fakeListener hands out one end of a net.Pipe per dial, after returning
// the errors queued in errs.
type fakeListener struct {
	conns  chan net.Conn
	errs   chan error
	once   sync.Once
	closed chan struct{}
}

func newFakeListener() *fakeListener {
	return &fakeListener{conns: make(chan net.Conn, 4), errs: make(chan error, 4), closed: make(chan struct{})}
}

func (f *fakeListener) dial() net.Conn {
	client, server := net.Pipe()
	f.conns <- server
	return client
}

func (f *fakeListener) Accept() (net.Conn, error) {
	select {
	case err := <-f.errs:
		return nil, err
	default:
	}
	select {
	case c := <-f.conns:
		return c, nil
	case <-f.closed:
		return nil, net.ErrClosed
	}
}

func (f *fakeListener) Close() error {
	f.once.Do(func() { close(f.closed) })
	return nil
}

func (f *fakeListener) Addr() net.Addr { return &net.UnixAddr{Name: "pipe", Net: "unix"} }

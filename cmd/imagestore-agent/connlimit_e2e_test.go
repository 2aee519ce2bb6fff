package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"imagestore/internal/testwait"
)

// rawClient is one keep-alive HTTP/1.1 connection, so the test knows
// exactly which connections the daemon has open.
type rawClient struct {
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawClient{c: c, br: bufio.NewReader(c)}
}

func (r *rawClient) send(t *testing.T, path string) {
	t.Helper()
	if _, err := fmt.Fprintf(r.c, "GET %s HTTP/1.1\r\nHost: store\r\n\r\n", path); err != nil {
		t.Fatal(err)
	}
}

// answer reads one whole response and returns its status; the connection
// stays open (keep-alive).
func (r *rawClient) answer(t *testing.T, what string) int {
	t.Helper()
	if err := r.c.SetReadDeadline(time.Now().Add(waitLong)); err != nil {
		t.Fatal(err)
	}
	res, err := http.ReadResponse(r.br, nil)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	var body strings.Builder
	if _, err := bufio.NewReader(res.Body).WriteTo(&body); err != nil {
		t.Fatalf("%s: body: %v", what, err)
	}
	res.Body.Close()
	if res.Close {
		t.Fatalf("%s: the daemon closes the connection after answering: no keep-alive to test", what)
	}
	return res.StatusCode
}

// TestE2EConnectionCap: with each port capped at 2, two idle keep-alive
// clients hold a port; a third client waits (its connection is not
// accepted, so its request is not read) until one of the two disconnects,
// then it is served.
func TestE2EConnectionCap(t *testing.T) {
	d := startDaemon(t, daemonOpts{extra: "maxConnections: 2\nregistryMaxConnections: 2\n"})
	// A "did not happen" window: an uncapped daemon answers /health in
	// milliseconds; load can only make the check pass wrongly.
	const notWithin = 2 * time.Second
	for _, tc := range []struct {
		port, addr, path string
	}{
		{"agent", strings.TrimPrefix(d.url, "http://"), "/health"},
		{"registry", regAddr(t, d), "/v2/"},
	} {
		t.Run(tc.port, func(t *testing.T) {
			a, b := dialRaw(t, tc.addr), dialRaw(t, tc.addr)
			a.send(t, tc.path)
			want := a.answer(t, "first client")
			b.send(t, tc.path)
			if got := b.answer(t, "second client"); got != want {
				t.Fatalf("second client: %d, first got %d", got, want)
			}
			gauge := fmt.Sprintf("imagestore_open_connections{port=%q}", tc.port)
			if tc.port == "registry" { // the agent port has room to scrape
				if v := scrapeValue(t, d, gauge); v != 2 {
					t.Fatalf("%s = %v with two clients connected, want 2", gauge, v)
				}
			}

			third := dialRaw(t, tc.addr) // the kernel completes the handshake: backlog
			third.send(t, tc.path)
			if err := third.c.SetReadDeadline(time.Now().Add(notWithin)); err != nil {
				t.Fatal(err)
			}
			if n, err := third.br.Peek(1); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("third client read %q, %v while two idle clients held the port; want no answer", n, err)
			}

			a.c.Close()
			if got := third.answer(t, "third client after the first left"); got != want {
				t.Fatalf("third client: %d, want %d", got, want)
			}
			// The second client's connection was kept throughout.
			b.send(t, tc.path)
			if got := b.answer(t, "second client again"); got != want {
				t.Fatalf("second client again: %d, want %d", got, want)
			}
			if tc.port == "registry" {
				testwait.For(t, gauge+" back at 2", func() bool { return scrapeValue(t, d, gauge) == 2 })
				if v := scrapeValue(t, d, `imagestore_max_connections{port="registry"}`); v != 2 {
					t.Fatalf("imagestore_max_connections = %v, want 2", v)
				}
			}
		})
	}
}

package faultproxy

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// serve runs a target server until the test ends: "src" writes size bytes
// and closes; "echo" copies input back.
func serve(t *testing.T, mode string, size int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				switch mode {
				case "src":
					_, _ = c.Write(pattern(size))
				case "echo":
					_, _ = io.Copy(c, c)
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}

func fetch(t *testing.T, addr string) []byte {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil && !isReset(err) {
		t.Fatalf("read: %v", err)
	}
	return b
}

func isReset(err error) bool {
	_, ok := err.(*net.OpError)
	return ok
}

func TestCutSequence(t *testing.T) {
	const size = 300 << 10
	tests := []struct {
		name     string
		cutAfter int64
		cutNext  int
		conns    int
		wantLens []int
		wantCuts int
	}{
		{"pass-through", 0, -1, 2, []int{size, size}, 0},
		{"cut every conn", 1000, -1, 3, []int{1000, 1000, 1000}, 3},
		{"cut next two only", 4096, 2, 4, []int{4096, 4096, size, size}, 2},
		{"limit beyond stream", size + 1, -1, 1, []int{size}, 0},
		{"cut at exact buffer size", 32 << 10, 1, 2, []int{32 << 10, size}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := New(t, serve(t, "src", size))
			p.CutAfter(tc.cutAfter)
			p.CutNext(tc.cutNext)
			for i := 0; i < tc.conns; i++ {
				got := fetch(t, p.Addr())
				if len(got) != tc.wantLens[i] {
					t.Fatalf("conn %d: got %d bytes, want %d", i, len(got), tc.wantLens[i])
				}
				if !bytes.Equal(got, pattern(size)[:len(got)]) {
					t.Fatalf("conn %d: corrupted bytes", i)
				}
			}
			if got := p.Cuts(); got != tc.wantCuts {
				t.Fatalf("Cuts() = %d, want %d", got, tc.wantCuts)
			}
			if got := p.Conns(); got != tc.conns {
				t.Fatalf("Conns() = %d, want %d", got, tc.conns)
			}
		})
	}
}

// Bytes in both directions count against the same limit.
func TestCutCountsBothDirections(t *testing.T) {
	p := New(t, serve(t, "echo", 0))
	p.CutAfter(100)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(pattern(60)); err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(c)
	if len(got) != 40 {
		t.Fatalf("echoed %d bytes, want 40 (60 up + 40 down = 100)", len(got))
	}
	if p.Cuts() != 1 {
		t.Fatalf("Cuts() = %d, want 1", p.Cuts())
	}
}

func TestCloseAndCloseConns(t *testing.T) {
	p := New(t, serve(t, "echo", 0))
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	// A round trip proves the link is up before it is closed.
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	p.CloseConns()
	if _, err := io.ReadAll(c); err != nil && !isReset(err) {
		t.Fatal(err)
	}
	if p.Cuts() != 1 {
		t.Fatalf("Cuts() = %d after CloseConns, want 1", p.Cuts())
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestUnreachableTarget(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	p := New(t, dead)
	if got := fetch(t, p.Addr()); len(got) != 0 {
		t.Fatalf("got %d bytes from a dead target", len(got))
	}
}

// ConnBytes counts what each connection forwarded, in accept order.
func TestConnBytes(t *testing.T) {
	p := New(t, serve(t, "src", 100000))
	if got := p.ConnBytes(); len(got) != 0 {
		t.Fatalf("ConnBytes before any connection = %v", got)
	}
	if got := fetch(t, p.Addr()); len(got) != 100000 {
		t.Fatalf("fetched %d bytes", len(got))
	}
	p.CutAfter(5000)
	_ = fetch(t, p.Addr())
	var got []int64
	deadline := time.Now().Add(10 * time.Second)
	for { // the counts settle when the forwarding goroutines finish
		got = p.ConnBytes()
		if len(got) == 2 && got[0] == 100000 && got[1] == 5000 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(got) != 2 || got[0] != 100000 || got[1] != 5000 {
		t.Fatalf("ConnBytes = %v, want [100000 5000]", got)
	}
}

// FlipAt corrupts exactly the one byte at its offset of what the client
// sends, on every connection accepted after it, and nothing once off.
func TestFlipAt(t *testing.T) {
	const size = 100 << 10
	p := New(t, serve(t, "echo", 0))
	send := func() []byte {
		c, err := net.Dial("tcp", p.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		go func() { _, _ = c.Write(pattern(size)); _ = c.(*net.TCPConn).CloseWrite() }()
		b, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, at := range []int64{0, 40000, size - 1} {
		p.FlipAt(at)
		got := send()
		want := pattern(size)
		want[at] ^= 1
		if !bytes.Equal(got, want) {
			t.Fatalf("flip at %d: the echo differs elsewhere too (or not at all)", at)
		}
	}
	p.FlipAt(-1)
	if !bytes.Equal(send(), pattern(size)) {
		t.Fatal("FlipAt(-1) still corrupts")
	}
}

package ftp_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"imagestore/internal/testwait"
	"imagestore/transfer/ftp"
	"imagestore/transfer/ftp/ftptest"
)

func dial(t *testing.T, raw string) (*ftp.Conn, *url.URL) {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ftp.Dial(context.Background(), u, ftp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, u
}

// TestDownloadFromVsftpd reads a file from a real vsftpd whole and from
// an offset (a resumed download), sizes it, and gets a permanent error
// for a missing file.
func TestDownloadFromVsftpd(t *testing.T) {
	t.Parallel()
	srv := ftptest.Start(t)
	data := bytes.Repeat([]byte("0123456789abcdef"), 100000)
	if err := os.WriteFile(filepath.Join(srv.Dir, "disk.raw"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	c, u := dial(t, srv.URL("disk.raw"))
	ctx := context.Background()
	path := ftp.Path(u)
	if path != "disk.raw" {
		t.Fatalf("Path(%s) = %q: an ftp URL's path is relative to the login directory", u, path)
	}
	if n, err := c.Size(ctx, path); err != nil || n != int64(len(data)) {
		t.Fatalf("Size = %d, %v", n, err)
	}
	for _, off := range []int64{0, 12345, int64(len(data)) - 1} {
		r, err := c.Retr(ctx, path, off)
		if err != nil {
			t.Fatalf("Retr at %d: %v\n%s", off, err, srv.Log())
		}
		got, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatalf("end of transfer at %d: %v", off, err)
		}
		if !bytes.Equal(got, data[off:]) {
			t.Fatalf("Retr at %d: %d bytes, want %d", off, len(got), len(data)-int(off))
		}
	}
	_, err := c.Retr(ctx, "missing", 0)
	var re *ftp.ReplyError
	if !errors.As(err, &re) || !re.Permanent() {
		t.Fatalf("missing file: %v", err)
	}
	if _, err := c.Size(ctx, "missing"); !errors.As(err, &re) {
		t.Fatalf("Size of a missing file: %v", err)
	}
	// Logging in with a user the server refuses fails with its reply.
	bad, _ := url.Parse("ftp://root:pw@" + srv.Addr + "/disk.raw")
	if _, err := ftp.Dial(ctx, bad, ftp.Options{}); err == nil || strings.Contains(err.Error(), "pw") {
		t.Fatalf("login as a refused user: %v", err)
	}
}

func TestParsePassive(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		epsv bool
		text string
		port int
	}{
		{true, "Entering Extended Passive Mode (|||30031|)", 30031},
		{true, "Entering Extended Passive Mode (!!!21!)", 21},
		{true, "Entering Extended Passive Mode (|||0|)", 0},
		{true, "Entering Extended Passive Mode (|1|127.0.0.1|30031|)", 0},
		{true, "no parens", 0},
		{false, "Entering Passive Mode (127,0,0,1,117,47).", 117*256 + 47},
		{false, "Entering Passive Mode 10,0,0,1,4,1", 1025},
		{false, "Entering Passive Mode (1,2,3,4,256,1)", 0},
		{false, "Entering Passive Mode (1,2,3,4,5)", 0},
	} {
		parse := ftp.ParsePASV
		if tc.epsv {
			parse = ftp.ParseEPSV
		}
		p, err := parse(tc.text)
		if tc.port == 0 {
			if !errors.Is(err, ftp.ErrProtocol) {
				t.Errorf("%q: %d %v, want ErrProtocol", tc.text, p, err)
			}
			continue
		}
		if err != nil || p != tc.port {
			t.Errorf("%q: %d %v, want %d", tc.text, p, err, tc.port)
		}
	}
}

func TestReadReply(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   string
		code int
		text string
		bad  bool
	}{
		{"220 hello\r\n", 220, "hello", false},
		{"230-line one\r\n more\r\n230 done\r\n", 230, "line one\n more\ndone", false},
		{"200\r\n", 200, "", false},
		{"2x0 nope\r\n", 0, "", true},
		{"099 low\r\n", 0, "", true},
		{"220 no newline", 0, "", true},
		{strings.Repeat("a", 5000) + "\r\n", 0, "", true},
		{"220-" + strings.Repeat("x\r\n", 600), 0, "", true},
	} {
		code, text, err := ftp.ReadReply(bufio.NewReaderSize(strings.NewReader(tc.in), 4096))
		if tc.bad != (err != nil) || code != tc.code || text != tc.text {
			t.Errorf("%.30q: %d %q %v", tc.in, code, text, err)
		}
	}
}

// FuzzReply: any bytes from a server give a reply or an error, never a
// panic, and a parsed passive port is a valid port.
func FuzzReply(f *testing.F) {
	for _, s := range []string{"220 hi\r\n", "230-a\r\n230 b\r\n", "227 Entering Passive Mode (1,2,3,4,5,6)\r\n", "229 (|||1|)\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		_, text, err := ftp.ReadReply(bufio.NewReaderSize(bytes.NewReader(b), 4096))
		if err != nil {
			return
		}
		for _, parse := range []func(string) (int, error){ftp.ParsePASV, ftp.ParseEPSV} {
			if p, err := parse(text); err == nil && (p <= 0 || p > 65535) {
				t.Fatalf("port %d from %q", p, text)
			}
		}
	})
}

// stalledServer is an FTP server that logs anyone in and answers RETR
// with 150, then opens the data connection and never sends a byte: a
// server stuck mid-transfer. accepted is closed when the data connection
// is up.
func stalledServer(t *testing.T) (addr string, accepted <-chan struct{}) {
	t.Helper()
	ctl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	data, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctl.Close(); data.Close() })
	up := make(chan struct{})
	go func() {
		c, err := ctl.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var held net.Conn
		defer func() {
			if held != nil {
				held.Close()
			}
		}()
		fmt.Fprint(c, "220 stalled\r\n")
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			switch verb, _, _ := strings.Cut(strings.TrimSpace(line), " "); verb {
			case "USER":
				fmt.Fprint(c, "230 in\r\n")
			case "TYPE":
				fmt.Fprint(c, "200 binary\r\n")
			case "EPSV":
				fmt.Fprintf(c, "229 passive (|||%d|)\r\n", data.Addr().(*net.TCPAddr).Port)
			case "RETR":
				fmt.Fprint(c, "150 sending\r\n")
				if held, err = data.Accept(); err != nil {
					return
				}
				close(up)
			case "QUIT":
				fmt.Fprint(c, "221 bye\r\n")
				return
			default:
				fmt.Fprint(c, "502 no\r\n")
			}
		}
	}()
	return ctl.Addr().String(), up
}

// TestRetrCancelStopsStalledRead: cancelling the context of a RETR ends
// a read blocked on a data connection that gets no bytes at once, with
// the context's error, not after the (hour-long) read timeout.
func TestRetrCancelStopsStalledRead(t *testing.T) {
	t.Parallel()
	addr, accepted := stalledServer(t)
	u, _ := url.Parse("ftp://" + addr + "/disk.raw")
	c, err := ftp.Dial(context.Background(), u, ftp.Options{Timeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, err := c.Retr(ctx, ftp.Path(u), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	<-accepted
	done := make(chan error, 1)
	go func() {
		_, err := r.Read(make([]byte, 4096))
		done <- err
	}()
	// Cancel once the read is parked on the socket, so it is the blocked
	// read that must see ctx end (not the check before reading).
	testwait.For(t, "the read to block on the data connection", func() bool {
		buf := make([]byte, 1<<20)
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, "[IO wait") && strings.Contains(g, "ftp.(*reader).Read") {
				return true
			}
		}
		return false
	})
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("read after cancel: %v, want context.Canceled", err)
		}
	case <-time.After(2 * time.Minute): // only a watchdog: the bug waits an hour
		t.Fatal("cancel did not reach the read blocked on the data connection")
	}
}

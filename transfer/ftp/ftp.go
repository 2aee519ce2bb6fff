// Package ftp is the small FTP client URL imports need (RFC 959, with EPSV
// from RFC 2428 and SIZE/REST from RFC 3659): log in, learn a file's size
// and read it from an offset in binary mode over a passive data
// connection, so a cut download resumes where it stopped.
//
// Everything the server sends is untrusted: replies are read line by line
// with a bounded length and count, and a passive address must be the
// control connection's host (a server cannot point the data connection
// elsewhere, RFC 2577).
package ftp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Limits on a reply: a longer line or more lines is a protocol error.
const (
	maxLine  = 4096
	maxLines = 512
)

// Errors callers branch on.
var (
	// ErrProtocol: the server's reply is malformed or unexpected.
	ErrProtocol = errors.New("ftp: protocol error")
)

// ReplyError is a negative reply (4xx transient, 5xx permanent).
type ReplyError struct {
	Code int
	Text string
}

func (e *ReplyError) Error() string { return fmt.Sprintf("ftp: %d %s", e.Code, e.Text) }

// Permanent reports whether retrying the same command cannot help (5xx).
func (e *ReplyError) Permanent() bool { return e.Code >= 500 }

// Options configure Dial.
type Options struct {
	// Timeout bounds the dial and each reply (default 1 minute).
	Timeout time.Duration
	// Dialer dials the control and data connections (default net.Dialer).
	Dialer interface {
		DialContext(ctx context.Context, network, addr string) (net.Conn, error)
	}
}

// Conn is a logged-in control connection. It is not safe for concurrent
// use: one transfer at a time.
type Conn struct {
	c    net.Conn
	r    *bufio.Reader
	host string // the control connection's host, for passive data connections
	opts Options
}

// Dial connects to u's host (port 21 by default) and logs in with u's
// user and password (anonymous without a user), in binary mode. The
// password is never part of an error.
func Dial(ctx context.Context, u *url.URL, opts Options) (*Conn, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = time.Minute
	}
	if opts.Dialer == nil {
		opts.Dialer = &net.Dialer{Timeout: opts.Timeout}
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "21")
	}
	nc, err := opts.Dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("ftp: %w", err)
	}
	c := &Conn{c: nc, r: bufio.NewReaderSize(nc, maxLine), host: u.Hostname(), opts: opts}
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Now()) })
	defer stop()
	if err := c.login(u); err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

func (c *Conn) login(u *url.URL) error {
	if _, err := c.expect(2); err != nil { // 220 greeting
		return err
	}
	user, pass := "anonymous", "anonymous@"
	if u.User != nil {
		user = u.User.Username()
		if p, ok := u.User.Password(); ok {
			pass = p
		} else {
			pass = ""
		}
	}
	code, _, err := c.cmd("USER " + user)
	if err != nil {
		return err
	}
	if code/100 == 3 {
		if code, text, err := c.cmdSecret("PASS", pass); err != nil {
			return err
		} else if code/100 != 2 {
			return &ReplyError{code, text}
		}
	} else if code/100 != 2 {
		return &ReplyError{Code: code, Text: "USER refused"}
	}
	if code, text, err := c.cmd("TYPE I"); err != nil {
		return err
	} else if code/100 != 2 {
		return &ReplyError{code, text}
	}
	return nil
}

// Size returns path's size in bytes (SIZE, in binary mode).
func (c *Conn) Size(ctx context.Context, path string) (int64, error) {
	stop := context.AfterFunc(ctx, func() { _ = c.c.SetDeadline(time.Now()) })
	defer stop()
	code, text, err := c.cmd("SIZE " + path)
	if err != nil {
		return 0, err
	}
	if code != 213 {
		return 0, &ReplyError{code, text}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(text), 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: SIZE reply %q", ErrProtocol, text)
	}
	return n, nil
}

// Retr opens path for reading from offset (REST, then RETR) over a
// passive data connection. Close the reader to end the transfer; it
// returns the server's verdict on the transfer when the whole file was
// read.
func (c *Conn) Retr(ctx context.Context, path string, offset int64) (io.ReadCloser, error) {
	stop := context.AfterFunc(ctx, func() { _ = c.c.SetDeadline(time.Now()) })
	defer stop()
	data, err := c.passive(ctx)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (io.ReadCloser, error) { data.Close(); return nil, err }
	if offset > 0 {
		code, text, err := c.cmd("REST " + strconv.FormatInt(offset, 10))
		if err != nil {
			return fail(err)
		}
		if code != 350 {
			return fail(&ReplyError{code, text})
		}
	}
	code, text, err := c.cmd("RETR " + path)
	if err != nil {
		return fail(err)
	}
	if code/100 != 1 {
		return fail(&ReplyError{code, text})
	}
	// ctx ends a read blocked on the data connection at once, not after
	// Timeout: the AfterFunc above stops when Retr returns.
	stopData := context.AfterFunc(ctx, func() { _ = data.SetDeadline(time.Now()) })
	return &reader{c: c, data: data, ctx: ctx, stop: stopData}, nil
}

// reader is a RETR in progress.
type reader struct {
	c    *Conn
	data net.Conn
	ctx  context.Context
	stop func() bool // unties ctx from data
	eof  bool
}

func (r *reader) Read(p []byte) (int, error) {
	_ = r.data.SetReadDeadline(time.Now().Add(r.c.opts.Timeout))
	// Checked after the deadline is set: a ctx that ended before has its
	// AfterFunc's deadline overwritten, so it must be seen here.
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := r.data.Read(p)
	if err == io.EOF {
		r.eof = true
	}
	if err != nil && err != io.EOF {
		if cerr := r.ctx.Err(); cerr != nil {
			return n, cerr
		}
	}
	return n, err
}

// Close ends the transfer; after a complete read it checks the 226.
func (r *reader) Close() error {
	r.stop()
	r.data.Close()
	if !r.eof {
		return nil
	}
	_, err := r.c.expect(2)
	return err
}

// passive opens a data connection: EPSV, or PASV when the server lacks
// it. The data connection always goes to the control connection's host.
func (c *Conn) passive(ctx context.Context) (net.Conn, error) {
	port := 0
	code, text, err := c.cmd("EPSV")
	if err != nil {
		return nil, err
	}
	if code == 229 {
		if port, err = ParseEPSV(text); err != nil {
			return nil, err
		}
	} else {
		code, text, err = c.cmd("PASV")
		if err != nil {
			return nil, err
		}
		if code != 227 {
			return nil, &ReplyError{code, text}
		}
		if port, err = ParsePASV(text); err != nil {
			return nil, err
		}
	}
	d, err := c.opts.Dialer.DialContext(ctx, "tcp", net.JoinHostPort(c.host, strconv.Itoa(port)))
	if err != nil {
		return nil, fmt.Errorf("ftp: data connection: %w", err)
	}
	return d, nil
}

// ParseEPSV reads the port of a 229 reply: "... (|||port|)".
func ParseEPSV(text string) (int, error) {
	i := strings.IndexByte(text, '(')
	j := strings.LastIndexByte(text, ')')
	if i < 0 || j < i+5 {
		return 0, fmt.Errorf("%w: EPSV reply %q", ErrProtocol, text)
	}
	inner := text[i+1 : j]
	d := inner[0]
	parts := strings.Split(inner, string(d))
	if len(parts) != 5 || parts[1] != "" || parts[2] != "" || parts[4] != "" {
		return 0, fmt.Errorf("%w: EPSV reply %q", ErrProtocol, text)
	}
	return parsePort(parts[3], text)
}

// ParsePASV reads the port of a 227 reply: "... (h1,h2,h3,h4,p1,p2)". The
// address it names is ignored: data goes to the control host.
func ParsePASV(text string) (int, error) {
	i := strings.IndexByte(text, '(')
	j := strings.IndexByte(text, ')')
	if i < 0 || j < i {
		// Some servers omit the parentheses: take the last six numbers.
		i, j = strings.LastIndexByte(text, ' '), len(text)
	}
	parts := strings.Split(strings.TrimSpace(text[i+1:j]), ",")
	if len(parts) != 6 {
		return 0, fmt.Errorf("%w: PASV reply %q", ErrProtocol, text)
	}
	var b [6]int
	for k, s := range parts {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 0 || n > 255 {
			return 0, fmt.Errorf("%w: PASV reply %q", ErrProtocol, text)
		}
		b[k] = n
	}
	return parsePort(strconv.Itoa(b[4]<<8|b[5]), text)
}

func parsePort(s, text string) (int, error) {
	p, err := strconv.Atoi(s)
	if err != nil || p <= 0 || p > 65535 {
		return 0, fmt.Errorf("%w: passive port in %q", ErrProtocol, text)
	}
	return p, nil
}

// Path is the file an ftp:// URL names, as RETR and SIZE take it: the
// URL's path is relative to the login directory (RFC 1738), so its
// leading "/" is a separator; "%2F" at its start names the root.
func Path(u *url.URL) string { return strings.TrimPrefix(u.Path, "/") }

// Close says QUIT and closes the control connection.
func (c *Conn) Close() error {
	_ = c.c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c.c, "QUIT\r\n")
	return c.c.Close()
}

// cmd sends a command line and reads its reply.
func (c *Conn) cmd(line string) (int, string, error) {
	if strings.ContainsAny(line, "\r\n") {
		return 0, "", fmt.Errorf("%w: a command must not contain a line break", ErrProtocol)
	}
	_ = c.c.SetDeadline(time.Now().Add(c.opts.Timeout))
	if _, err := io.WriteString(c.c, line+"\r\n"); err != nil {
		return 0, "", fmt.Errorf("ftp: %w", err)
	}
	return ReadReply(c.r)
}

// cmdSecret is cmd for a command whose argument must not appear in errors.
func (c *Conn) cmdSecret(verb, arg string) (int, string, error) {
	code, text, err := c.cmd(verb + " " + arg)
	if err != nil && strings.Contains(err.Error(), arg) && arg != "" {
		err = fmt.Errorf("ftp: %s failed", verb)
	}
	return code, text, err
}

// expect reads a reply and wants its first digit to be class.
func (c *Conn) expect(class int) (string, error) {
	_ = c.c.SetReadDeadline(time.Now().Add(c.opts.Timeout))
	code, text, err := ReadReply(c.r)
	if err != nil {
		return "", err
	}
	if code/100 != class {
		return "", &ReplyError{code, text}
	}
	return text, nil
}

// ReadReply reads one reply: "ddd text", or a multi-line reply that
// starts with "ddd-" and ends with a line starting "ddd ".
func ReadReply(r *bufio.Reader) (code int, text string, err error) {
	line, err := readLine(r)
	if err != nil {
		return 0, "", err
	}
	code, sep, text, err := splitReply(line)
	if err != nil {
		return 0, "", err
	}
	if sep == ' ' {
		return code, text, nil
	}
	var b strings.Builder
	b.WriteString(text)
	for range maxLines {
		line, err := readLine(r)
		if err != nil {
			return 0, "", err
		}
		if c, s, t, err := splitReply(line); err == nil && c == code && s == ' ' {
			b.WriteString("\n" + t)
			return code, b.String(), nil
		}
		b.WriteString("\n" + line)
	}
	return 0, "", fmt.Errorf("%w: reply longer than %d lines", ErrProtocol, maxLines)
}

func splitReply(line string) (int, byte, string, error) {
	if len(line) < 3 {
		return 0, 0, "", fmt.Errorf("%w: reply %q", ErrProtocol, line)
	}
	code, err := strconv.Atoi(line[:3])
	if err != nil || code < 100 || code > 599 {
		return 0, 0, "", fmt.Errorf("%w: reply %q", ErrProtocol, line)
	}
	if len(line) == 3 {
		return code, ' ', "", nil
	}
	if line[3] != ' ' && line[3] != '-' {
		return 0, 0, "", fmt.Errorf("%w: reply %q", ErrProtocol, line)
	}
	return code, line[3], line[4:], nil
}

func readLine(r *bufio.Reader) (string, error) {
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		return "", fmt.Errorf("%w: reply line longer than %d bytes", ErrProtocol, maxLine)
	}
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return "", fmt.Errorf("ftp: %w", err)
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}

// Package nbdserve is a small read-only NBD server: it serves one
// io.ReaderAt of a given size (for example the guest view of a stored
// qcow2 chain, read through our own hardened reader) to NBD clients such
// as qemu's, usually on a private unix socket. It speaks the fixed
// newstyle handshake (NBD_OPT_EXPORT_NAME, NBD_OPT_INFO, NBD_OPT_GO,
// NBD_OPT_LIST, NBD_OPT_ABORT, NBD_OPT_STRUCTURED_REPLY and the
// base:allocation metadata context) and answers NBD_CMD_READ (several in
// flight at once), NBD_CMD_BLOCK_STATUS and NBD_CMD_DISC; writes, trims
// and zero writes get EPERM (the export is flagged read-only).
//
// Memory is bounded: a read asks for at most MaxRequest bytes (advertised
// as the maximum block size), and all connections together hold at most
// MaxBuffered bytes of read buffers; a request beyond that waits.
package nbdserve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"

	"imagestore/qcow2"
)

// Defaults and bounds of Options.
const (
	DefaultMaxRequest  = 32 << 20 // qemu's own largest NBD request
	DefaultMaxBuffered = 64 << 20
	DefaultMaxInFlight = 16 // qemu's NBD client keeps at most 16 requests in flight
	DefaultMaxConns    = 16
	// handshakeTimeout bounds the option haggling of one connection.
	handshakeTimeout = 30 * time.Second
	// maxOptionData bounds one option's data (names and queries are at
	// most 4 KiB each); a larger option drops the connection.
	maxOptionData = 64 << 10
	// maxOptions bounds the options of one handshake.
	maxOptions = 256
	// maxDescriptors bounds the extents of one block status reply (the
	// client asks again for the rest).
	maxDescriptors = 4096
)

// Export is what a Server serves.
type Export struct {
	// Name is the export name clients ask for; "" is the default export.
	Name string
	Size int64
	// Data is read with concurrent ReadAt calls; it must allow them.
	Data io.ReaderAt
	// Extents, if set, lists the export's Data and Zero ranges in order
	// (qcow2.Chain.Extents). It is called once, at the first block status
	// query, and makes the server offer base:allocation, so a client
	// such as qemu-img convert keeps zero ranges sparse. Nil: no
	// metadata context is offered and everything reads as data.
	Extents func() ([]qcow2.Extent, error)
}

// Options configure a Server.
type Options struct {
	Export Export
	// MaxRequest is the largest read one request may ask for (the
	// advertised maximum block size); default and upper bound
	// DefaultMaxRequest.
	MaxRequest int
	// MaxBuffered bounds the read buffers of all connections together;
	// default DefaultMaxBuffered, at least MaxRequest.
	MaxBuffered int64
	// MaxInFlight bounds the requests of one connection handled at once;
	// default DefaultMaxInFlight.
	MaxInFlight int
	// MaxConns bounds concurrent connections; more are closed at once.
	// Default DefaultMaxConns.
	MaxConns int
	Logger   *slog.Logger
}

// ErrInvalid is an unusable Options value.
var ErrInvalid = errors.New("nbdserve: invalid options")

// Server serves one export. It holds no connection state of its own:
// Serve may run on several listeners at once.
type Server struct {
	opts   Options
	log    *slog.Logger
	budget *semaphore.Weighted
	conns  chan struct{}

	extOnce sync.Once
	ext     []qcow2.Extent
	extErr  error
}

// New checks opts and returns a Server.
func New(opts Options) (*Server, error) {
	e := opts.Export
	if e.Data == nil || e.Size < 0 {
		return nil, fmt.Errorf("%w: export needs Data and a size >= 0", ErrInvalid)
	}
	if len(e.Name) > maxString || strings.ContainsRune(e.Name, 0) {
		return nil, fmt.Errorf("%w: export name", ErrInvalid)
	}
	if opts.MaxRequest <= 0 || opts.MaxRequest > DefaultMaxRequest {
		opts.MaxRequest = DefaultMaxRequest
	}
	if opts.MaxBuffered <= 0 {
		opts.MaxBuffered = DefaultMaxBuffered
	}
	opts.MaxBuffered = max(opts.MaxBuffered, int64(opts.MaxRequest))
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxConns <= 0 {
		opts.MaxConns = DefaultMaxConns
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{
		opts:   opts,
		log:    opts.Logger.With("component", "nbdserve", "export", e.Name),
		budget: semaphore.NewWeighted(opts.MaxBuffered),
		conns:  make(chan struct{}, opts.MaxConns),
	}, nil
}

// extents returns the export's extents, computed once.
func (s *Server) extents() ([]qcow2.Extent, error) {
	s.extOnce.Do(func() {
		s.ext, s.extErr = s.opts.Export.Extents()
		for i := 1; s.extErr == nil && i < len(s.ext); i++ {
			if s.ext[i].Offset < s.ext[i-1].End() {
				s.extErr = fmt.Errorf("extent at %d overlaps the one before", s.ext[i].Offset)
			}
		}
	})
	return s.ext, s.extErr
}

// Serve accepts connections on ln until ctx ends or ln fails, then closes
// ln and every connection and waits for their goroutines. It returns nil
// when ctx ended.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("nbdserve: accept: %w", err)
		}
		select {
		case s.conns <- struct{}{}:
		default:
			s.log.Warn("nbd connection refused: too many connections", "max", s.opts.MaxConns)
			_ = c.Close()
			continue
		}
		wg.Go(func() {
			defer func() { <-s.conns }()
			s.ServeConn(ctx, c)
		})
	}
}

// ServeConn serves one connection until the client disconnects, breaks
// the protocol or ctx ends; it closes c.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) {
	cn := &conn{s: s, c: c, log: s.log}
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	defer c.Close()
	err := cn.serve(ctx)
	switch {
	case err == nil, ctx.Err() != nil:
		s.log.Debug("nbd connection closed")
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		s.log.Debug("nbd connection dropped by the client", "err", err)
	default:
		s.log.Warn("nbd connection ended", "err", err)
	}
}

// Listening is a Server on a unix socket of its own.
type Listening struct {
	// Socket is the socket's path, in a private (0700) directory.
	Socket string
	name   string
	dir    string
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

// maxSocketPath is the longest path a unix socket address holds
// (sun_path is 108 bytes with the terminating NUL).
const maxSocketPath = 107

// ListenUnix serves s on a unix socket in a fresh private directory under
// dir (os.TempDir() when dir is "" or when a socket path under dir would
// be too long or hold characters an NBD URI cannot carry as they are).
// The server runs until ctx ends or Close.
func (s *Server) ListenUnix(ctx context.Context, dir string) (*Listening, error) {
	sockDir, err := socketDir(dir)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(sockDir, "nbd.sock")
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "unix", path)
	if err != nil {
		_ = os.RemoveAll(sockDir)
		return nil, fmt.Errorf("nbdserve: %w", err)
	}
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	l := &Listening{Socket: path, name: s.opts.Export.Name, dir: sockDir, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		l.err = s.Serve(ctx, ln)
		_ = os.RemoveAll(sockDir)
	}()
	s.log.Info("nbd export serving", "socket", path, "size", s.opts.Export.Size)
	return l, nil
}

// socketDir makes a private directory for a socket, under dir if the
// socket path fits there.
func socketDir(dir string) (string, error) {
	try := func(base string) (string, bool, error) {
		d, err := os.MkdirTemp(base, "nbd-")
		if err != nil {
			return "", false, fmt.Errorf("nbdserve: socket dir: %w", err)
		}
		abs, err := filepath.Abs(d)
		if err != nil || len(abs)+len("/nbd.sock") > maxSocketPath || !uriSafe(abs) {
			_ = os.RemoveAll(d)
			return "", false, nil
		}
		return abs, true, os.Chmod(abs, 0o700)
	}
	if dir != "" {
		if d, ok, err := try(dir); ok || err != nil {
			return d, err
		}
	}
	d, ok, err := try(os.TempDir())
	if err == nil && !ok {
		err = fmt.Errorf("nbdserve: no socket dir: %s gives too long or unsafe a path", os.TempDir())
	}
	return d, err
}

// uriSafe: characters an nbd+unix URI's socket parameter carries as they
// are (qemu splits the query at '&' and a parameter at its first '=', and
// unescapes '%').
func uriSafe(p string) bool {
	for _, c := range p {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("/._-=:@~", c)) {
			return false
		}
	}
	return true
}

// URI is the export's address for qemu: nbd+unix:///<name>?socket=<path>.
func (l *Listening) URI() string {
	return "nbd+unix:///" + l.name + "?socket=" + l.Socket
}

// Close stops accepting, drops every connection, waits for them and
// removes the socket's directory. Safe to call more than once.
func (l *Listening) Close() error {
	l.cancel()
	<-l.done
	return l.err
}

// Done is closed once the server has stopped.
func (l *Listening) Done() <-chan struct{} { return l.done }

package sshfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pkg/sftp"
)

// File is a remote file open for reading. ReadAt is safe for concurrent use.
type File interface {
	io.ReaderAt
	io.Closer
	Size() int64
	ModTime() time.Time // as the open file's fstat gave it
}

// AtomicFile is a remote file being written under a temporary name. Commit
// makes it appear at its final path in one step; Abort (safe to defer, a
// no-op after Commit) removes it.
type AtomicFile interface {
	io.Writer
	io.WriterAt
	Commit() error
	Abort() error
}

// acquire returns a referenced connection and one of its SFTP sessions.
func (p *Pool) acquire(ctx context.Context, h Host) (*conn, *sftp.Client, error) {
	c, err := p.get(ctx, h)
	if err != nil {
		return nil, nil, err
	}
	sc, err := c.session(p.opts.Sessions)
	if err != nil {
		c.release()
		p.drop(c)
		return nil, nil, fmt.Errorf("%w: %s: open sftp session: %w", ErrUnreachable, c.addr, err)
	}
	return c, sc, nil
}

// handle is one remote file open on one pooled connection. It does not
// reconnect: an error that means the connection is gone is a
// *connLostError, and the Reader above it opens a new handle.
type handle struct {
	p     *Pool
	c     *conn
	f     *sftp.File
	addr  string
	name  string
	size  int64
	mtime time.Time

	answersShort atomic.Bool // the server answered a read short inside the file
	discarded    atomic.Bool // replaced after a lost connection
	closeOnce    sync.Once
	closeErr     error
}

// openHandle opens name on h's pooled connection; it must be a regular file.
func (p *Pool) openHandle(ctx context.Context, h Host, name string) (*handle, error) {
	c, sc, err := p.acquire(ctx, h)
	if err != nil {
		return nil, err
	}
	rf, err := sc.Open(name)
	if err != nil {
		c.release()
		return nil, fmt.Errorf("sshfs: open %s:%s: %w", h.Addr, name, classifyLost(err, c))
	}
	st, err := rf.Stat()
	if err != nil {
		_ = rf.Close()
		c.release()
		return nil, fmt.Errorf("sshfs: stat %s:%s: %w", h.Addr, name, classifyLost(err, c))
	}
	if !st.Mode().IsRegular() {
		_ = rf.Close()
		c.release()
		return nil, fmt.Errorf("sshfs: %s:%s is not a regular file", h.Addr, name)
	}
	return &handle{p: p, c: c, f: rf, addr: h.Addr, name: name, size: st.Size(), mtime: st.ModTime()}, nil
}

func (hd *handle) Size() int64        { return hd.size }
func (hd *handle) ModTime() time.Time { return hd.mtime }

func (hd *handle) ReadAt(b []byte, off int64) (int, error) {
	var n int
	var err error
	if hd.answersShort.Load() && len(b) > sftpPacket {
		n, err = readPackets(hd.f, b, off)
	} else {
		n, err = hd.f.ReadAt(b, off)
	}
	// pkg/sftp reports the server's end of file as io.EOF itself; an EOF
	// wrapped in something else ("failed to send packet: EOF") is the
	// connection's.
	if err == nil || (err == io.EOF && off+int64(n) >= hd.size) {
		return n, err
	}
	if err == io.EOF && n > 0 {
		// A server whose read limit is below our request size (pkg/sftp's
		// own server: 32 KiB) answers short, which pkg/sftp's pipelined
		// read of a large buffer reports as io.EOF, dropping the answers
		// of its other requests. Inside the file: read on, and from now
		// on read this file packet by packet (see readPackets).
		hd.answersShort.Store(true)
		m, err := hd.ReadAt(b[n:], off+int64(n))
		return n + m, err
	}
	if hd.discarded.Load() {
		err = &connLostError{err} // read from a handle replaced meanwhile
	} else {
		err = classifyLost(err, hd.c)
	}
	return n, fmt.Errorf("sshfs: read %s:%s at %d: %w", hd.addr, hd.name, off, err)
}

// packetReadsInFlight bounds the concurrent requests of readPackets.
const packetReadsInFlight = 16

// readPackets reads b at off as requests of at most sftpPacket bytes, up
// to packetReadsInFlight at once. pkg/sftp serves each with one request and
// asks again for whatever a short answer left out, so a server that
// answers less than it was asked costs round trips but no bytes read twice.
// It returns the bytes read before the first failed or short piece.
func readPackets(rf *sftp.File, b []byte, off int64) (int, error) {
	type result struct {
		n   int
		err error
	}
	pieces := (len(b) + sftpPacket - 1) / sftpPacket
	res := make([]result, pieces)
	sem := make(chan struct{}, packetReadsInFlight)
	var wg sync.WaitGroup
	for i := range pieces {
		lo, hi := i*sftpPacket, min(len(b), (i+1)*sftpPacket)
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := rf.ReadAt(b[lo:hi], off+int64(lo))
			res[i] = result{n, err}
			<-sem
		}()
	}
	wg.Wait()
	var total int
	for i, r := range res {
		total += r.n
		if r.err != nil {
			return total, r.err
		}
		if r.n < min(len(b), (i+1)*sftpPacket)-i*sftpPacket {
			return total, io.ErrUnexpectedEOF
		}
	}
	return total, nil
}

// Close closes the remote file and releases the connection (once; a
// discarded handle is closed already).
func (hd *handle) Close() error {
	hd.closeOnce.Do(func() {
		err := hd.f.Close()
		hd.c.release()
		if err != nil && !connLost(err, hd.c) {
			hd.closeErr = fmt.Errorf("sshfs: close %s:%s: %w", hd.addr, hd.name, err)
		}
	})
	return hd.closeErr
}

// discard gives up a handle whose connection was lost: the connection is
// dropped from the pool, so the next open dials a fresh one, and readers
// still holding the handle see their errors as a lost connection.
func (hd *handle) discard() {
	hd.discarded.Store(true)
	hd.closeOnce.Do(func() {
		_ = hd.f.Close()
		hd.p.drop(hd.c)
		hd.c.release()
	})
}

// connLostError marks an error that means the connection is gone (rather
// than an answer from the server): another try on a fresh one may succeed.
type connLostError struct{ err error }

func (e *connLostError) Error() string { return e.err.Error() }
func (e *connLostError) Unwrap() error { return e.err }

// classifyLost marks err as a lost connection if it is one.
func classifyLost(err error, c *conn) error {
	if connLost(err, c) {
		return &connLostError{err}
	}
	return err
}

// connLost tells a transport failure from an SFTP status the server sent
// (no such file, permission denied, ...; pkg/sftp turns the first two into
// os.ErrNotExist and os.ErrPermission): any other error means the
// connection is unusable, whatever shape the network error took (EOF,
// EPIPE, ECONNRESET, closed).
func connLost(err error, c *conn) bool {
	select {
	case <-c.dead:
		return true
	default:
	}
	if errors.Is(err, sftp.ErrSSHFxConnectionLost) {
		return true
	}
	var se *sftp.StatusError
	return !errors.As(err, &se) && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, os.ErrPermission)
}

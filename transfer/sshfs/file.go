package sshfs

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
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

// maxReopen bounds how many times one ReadAt reconnects after losing the
// connection before it gives up.
const maxReopen = 3

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

// Open opens path on h for reading. If the connection drops, reads reconnect
// (a few times) and reopen the file, provided its size and modification time
// have not changed meanwhile.
func (p *Pool) Open(ctx context.Context, h Host, name string) (File, error) {
	f := &remoteFile{p: p, h: h, name: name}
	if err := f.open(ctx, true); err != nil {
		return nil, err
	}
	return f, nil
}

type remoteFile struct {
	p    *Pool
	h    Host
	name string

	mu     sync.RWMutex
	c      *conn
	f      *sftp.File
	gen    int // bumped on each reopen, so concurrent readers reopen once
	size   int64
	mtime  time.Time
	closed bool
	broken error // set when a reconnect failed; the file holds nothing then

	answersShort atomic.Bool // the server answered a read short inside the file
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

func (f *remoteFile) Size() int64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.size
}

func (f *remoteFile) ModTime() time.Time {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.mtime
}

// open (re)opens the file; the caller holds f.mu for writing unless first.
func (f *remoteFile) open(ctx context.Context, first bool) error {
	c, sc, err := f.p.acquire(ctx, f.h)
	if err != nil {
		return err
	}
	rf, err := sc.Open(f.name)
	if err != nil {
		c.release()
		return fmt.Errorf("sshfs: open %s:%s: %w", f.h.Addr, f.name, err)
	}
	st, err := rf.Stat()
	if err != nil {
		_ = rf.Close()
		c.release()
		return fmt.Errorf("sshfs: stat %s:%s: %w", f.h.Addr, f.name, err)
	}
	if !st.Mode().IsRegular() {
		_ = rf.Close()
		c.release()
		return fmt.Errorf("sshfs: %s:%s is not a regular file", f.h.Addr, f.name)
	}
	if !first && (st.Size() != f.size || !st.ModTime().Equal(f.mtime)) {
		_ = rf.Close()
		c.release()
		return fmt.Errorf("sshfs: %s:%s changed while being read (size %d→%d)", f.h.Addr, f.name, f.size, st.Size())
	}
	f.c, f.f, f.size, f.mtime = c, rf, st.Size(), st.ModTime()
	return nil
}

func (f *remoteFile) ReadAt(b []byte, off int64) (int, error) {
	for attempt := 0; ; attempt++ {
		f.mu.RLock()
		if f.closed {
			f.mu.RUnlock()
			return 0, os.ErrClosed
		}
		if f.broken != nil {
			err := f.broken
			f.mu.RUnlock()
			return 0, err
		}
		rf, c, gen := f.f, f.c, f.gen
		f.mu.RUnlock()

		var n int
		var err error
		if f.answersShort.Load() && len(b) > sftpPacket {
			n, err = readPackets(rf, b, off)
		} else {
			n, err = rf.ReadAt(b, off)
		}
		if err == nil || (errors.Is(err, io.EOF) && off+int64(n) >= f.Size()) {
			return n, err
		}
		if errors.Is(err, io.EOF) && n > 0 {
			// A server whose read limit is below our request size (pkg/sftp's
			// own server: 32 KiB) answers short, which pkg/sftp's pipelined
			// read of a large buffer reports as io.EOF, dropping the answers
			// of its other requests. Inside the file: read on, and from now
			// on read this file packet by packet (see readPackets).
			f.answersShort.Store(true)
			m, err := f.ReadAt(b[n:], off+int64(n))
			return n + m, err
		}
		if !connLost(err, c) || attempt >= maxReopen {
			return n, fmt.Errorf("sshfs: read %s:%s at %d: %w", f.h.Addr, f.name, off, err)
		}
		f.p.log.Warn("sshfs: connection lost while reading, reconnecting", "addr", f.h.Addr, "path", f.name, "attempt", attempt+1)
		if rerr := f.reopen(gen); rerr != nil {
			return n, fmt.Errorf("sshfs: read %s:%s at %d: %w (reconnect: %w)", f.h.Addr, f.name, off, err, rerr)
		}
	}
}

// reopen replaces the file handle of generation gen with one on a fresh
// connection; if another reader already did, it does nothing.
func (f *remoteFile) reopen(gen int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return os.ErrClosed
	}
	if f.broken != nil {
		return f.broken
	}
	if f.gen != gen {
		return nil
	}
	old := f.c
	_ = f.f.Close()
	f.p.drop(old)
	old.release()
	ctx, cancel := context.WithTimeout(context.Background(), 2*f.p.opts.DialTimeout)
	defer cancel()
	if err := f.open(ctx, false); err != nil {
		f.broken = err
		return err
	}
	f.gen++
	return nil
}

// connLost tells a transport failure from an SFTP status the server sent
// (no such file, permission denied, ...): any error that is not a server
// status means the connection is unusable, whatever shape the network error
// took (EOF, EPIPE, ECONNRESET, closed).
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
	return !errors.As(err, &se)
}

func (f *remoteFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	if f.broken != nil {
		return nil
	}
	err := f.f.Close()
	f.c.release()
	if err != nil && !connLost(err, f.c) {
		return fmt.Errorf("sshfs: close %s:%s: %w", f.h.Addr, f.name, err)
	}
	return nil
}

// CreateAtomic creates "<dir>/.<base>.tmp-<random>" next to name on h.
// Commit fsyncs it (when the server offers fsync@openssh.com), closes it and
// renames it over name with posix-rename@openssh.com.
func (p *Pool) CreateAtomic(ctx context.Context, h Host, name string) (AtomicFile, error) {
	c, sc, err := p.acquire(ctx, h)
	if err != nil {
		return nil, err
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := path.Join(path.Dir(name), "."+path.Base(name)+".tmp-"+hex.EncodeToString(rnd[:]))
	f, err := sc.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
	if err != nil {
		c.release()
		return nil, fmt.Errorf("sshfs: create %s:%s: %w", h.Addr, tmp, err)
	}
	return &atomicFile{c: c, sc: sc, f: f, addr: h.Addr, tmp: tmp, name: name}, nil
}

type atomicFile struct {
	c               *conn
	sc              *sftp.Client
	f               *sftp.File
	addr, tmp, name string

	mu   sync.Mutex
	done bool
}

func (a *atomicFile) Write(b []byte) (int, error)              { return a.f.Write(b) }
func (a *atomicFile) WriteAt(b []byte, off int64) (int, error) { return a.f.WriteAt(b, off) }

// ReadFrom lets io.Copy use the SFTP client's pipelined writes.
func (a *atomicFile) ReadFrom(r io.Reader) (int64, error) { return a.f.ReadFrom(r) }

func (a *atomicFile) finish() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.done {
		return false
	}
	a.done = true
	return true
}

func (a *atomicFile) Commit() error {
	if !a.finish() {
		return errors.New("sshfs: atomic file already committed or aborted")
	}
	defer a.c.release()
	fail := func(step string, err error) error {
		_ = a.f.Close()
		_ = a.sc.Remove(a.tmp)
		return fmt.Errorf("sshfs: commit %s:%s: %s: %w", a.addr, a.name, step, err)
	}
	if _, ok := a.sc.HasExtension("fsync@openssh.com"); ok {
		if err := a.f.Sync(); err != nil {
			return fail("fsync", err)
		}
	}
	if err := a.f.Close(); err != nil {
		return fail("close", err)
	}
	if err := a.sc.PosixRename(a.tmp, a.name); err != nil {
		return fail("rename", err)
	}
	return nil
}

func (a *atomicFile) Abort() error {
	if !a.finish() {
		return nil
	}
	defer a.c.release()
	_ = a.f.Close()
	if err := a.sc.Remove(a.tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("sshfs: abort %s:%s: remove temp: %w", a.addr, a.tmp, err)
	}
	return nil
}

// Stat returns information about name on h.
func (p *Pool) Stat(ctx context.Context, h Host, name string) (os.FileInfo, error) {
	c, sc, err := p.acquire(ctx, h)
	if err != nil {
		return nil, err
	}
	defer c.release()
	fi, err := sc.Stat(name)
	if err != nil {
		return nil, fmt.Errorf("sshfs: stat %s:%s: %w", h.Addr, name, err)
	}
	return fi, nil
}

// Remove deletes name on h.
func (p *Pool) Remove(ctx context.Context, h Host, name string) error {
	c, sc, err := p.acquire(ctx, h)
	if err != nil {
		return err
	}
	defer c.release()
	if err := sc.Remove(name); err != nil {
		return fmt.Errorf("sshfs: remove %s:%s: %w", h.Addr, name, err)
	}
	return nil
}

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

	"github.com/pkg/sftp"
)

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

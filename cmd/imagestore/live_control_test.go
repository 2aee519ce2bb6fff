package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"imagestore/transfer/livebackup"
)

// TestListenControlExclusive: of backups of one VM started at once exactly
// one gets the control socket, the others fail busy without touching it;
// the socket is 0600; once the holder stops, a new backup starts, and a
// socket left by a dead holder does not block one.
func TestListenControlExclusive(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "vm.bak")
	drives := []livebackup.Drive{{Node: "libvirt-1-format"}}
	ask := func(line string) string {
		t.Helper()
		c, err := net.DialTimeout("unix", path, 5*time.Second)
		if err != nil {
			t.Fatalf("dial control socket: %v", err)
		}
		defer c.Close()
		fmt.Fprintln(c, line)
		reply, _ := bufio.NewReader(c).ReadString('\n')
		return reply
	}

	const n = 8
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		stops []func()
		busy  int
	)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, cancel := context.WithCancelCause(context.Background())
			stop, err := listenControl(context.Background(), path, drives, cancel)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				stops = append(stops, stop)
			case errors.Is(err, livebackup.ErrBusy):
				busy++
			default:
				t.Errorf("listenControl: %v", err)
			}
		}()
	}
	wg.Wait()
	if len(stops) != 1 || busy != n-1 {
		t.Fatalf("%d backups got the control socket, %d were busy; want 1 and %d", len(stops), busy, n-1)
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket %v %v, want a 0600 socket", fi.Mode(), err)
	}
	if got := ask("stop other-node"); got != "not running\n" {
		t.Fatalf("the holder's socket answered %q after the busy attempts", got)
	}
	stops[0]()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("control socket left after stop: %v", err)
	}

	// A socket a killed backup left behind.
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	_, cancel := context.WithCancelCause(context.Background())
	// The holder's flock goes with its last descriptor, and a process
	// that another test of this package forks at that moment holds a copy
	// until its exec (close-on-exec): allow that window, not more.
	var stop func()
	for deadline := time.Now().Add(5 * time.Second); ; {
		stop, err = listenControl(context.Background(), path, drives, cancel)
		if !errors.Is(err, livebackup.ErrBusy) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("a stale socket blocked the next backup: %v", err)
	}
	defer stop()
	if got := ask("stop other-node"); got != "not running\n" {
		t.Fatalf("new socket answered %q", got)
	}
	if ents, _ := os.ReadDir(filepath.Dir(path)); len(ents) != 2 {
		t.Fatalf("control dir holds %v, want the socket and its lock file only", ents)
	}
}

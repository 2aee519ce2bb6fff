package rgwtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// daemon is one Ceph daemon run in the foreground (-f) as our child, so that
// we hold its process, and with SIGKILL as its parent-death signal, so that a
// test binary killed by its timeout leaves no cluster behind.
type daemon struct {
	name string
	cmd  *exec.Cmd
	out  string        // its stdout+stderr file
	done chan struct{} // closed when it has exited
	err  error         // its exit status, once done
}

// spawnReq asks the spawner thread to start cmd.
type spawnReq struct {
	cmd *exec.Cmd
	err chan error
}

// newSpawner starts the goroutine that starts every daemon, locked to its OS
// thread until the cluster stops. The parent-death signal fires when the
// thread that forked a child exits, not the process: Go ends a thread when a
// goroutine locked to it returns (as namespace-switching code does), so a
// daemon forked from an ordinary goroutine could be killed by an unrelated
// goroutine's exit later on the same thread. This thread runs nothing else.
func newSpawner() chan spawnReq {
	ch := make(chan spawnReq)
	go func() {
		runtime.LockOSThread()
		for req := range ch {
			req.err <- req.cmd.Start()
		}
		// Still locked: the thread ends with the goroutine, after every
		// daemon it forked has been stopped.
	}()
	return ch
}

// startDaemon starts bin as the Ceph name (mon.a, osd.0, ...). Its stdout and
// stderr go to log/<name>.out; Ceph's own log is log/<name>.log.
func (c *Cluster) startDaemon(name, bin string, args ...string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("cluster closed")
	}
	if d := c.daemons[name]; d != nil {
		select {
		case <-d.done:
		default:
			return fmt.Errorf("%s is already running", name)
		}
	}
	path, err := lookPath(bin)
	if err != nil {
		return err
	}
	outPath := c.path("log", name+".out")
	out, err := os.OpenFile(outPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	cmd := exec.Command(path, append([]string{"-f", "-c", c.conf}, args...)...)
	cmd.Env = append(os.Environ(), "CEPH_CONF="+c.conf, "CEPH_ARGS=")
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	req := spawnReq{cmd: cmd, err: make(chan error, 1)}
	c.spawn <- req
	if err := <-req.err; err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, out: outPath, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		close(d.done)
	}()
	c.daemons[name] = d
	return nil
}

func (c *Cluster) daemon(name string) *daemon {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.daemons[name]
}

// outTail is the end of what the daemon wrote to stdout and stderr.
func (d *daemon) outTail() string {
	b, err := readTail(d.out, 4<<10)
	if err != nil || len(strings.TrimSpace(string(b))) == 0 {
		return ""
	}
	return fmt.Sprintf("\n--- tail of %s ---\n%s", d.out, tail(string(b), 15))
}

// stop sends sig to the daemon and waits for it to exit; if it has not after
// grace, it is killed (SIGKILL) and stop reports that.
func (c *Cluster) stop(name string, sig syscall.Signal, grace time.Duration) error {
	d := c.daemon(name)
	if d == nil {
		return fmt.Errorf("rgwtest: %s was never started", name)
	}
	select {
	case <-d.done:
		return nil
	default:
	}
	_ = d.cmd.Process.Signal(sig)
	if sig != syscall.SIGKILL {
		select {
		case <-d.done:
			return nil
		case <-time.After(grace):
		}
		_ = d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("rgwtest: %s did not exit within %s of %s; killed", name, grace, sig)
	}
	<-d.done
	return nil
}

// stopAll stops every daemon: SIGTERM with a short grace when gentle (complete
// logs), else SIGKILL at once. Then, as a backstop, it kills any process still
// named in run/*.pid whose command line mentions this cluster's ceph.conf.
func (c *Cluster) stopAll(gentle bool) {
	c.mu.Lock()
	c.closed = true
	ds := make([]*daemon, 0, len(c.daemons))
	for _, d := range c.daemons {
		ds = append(ds, d)
	}
	spawn := c.spawn
	c.spawn = nil
	c.mu.Unlock()
	if spawn != nil {
		defer close(spawn)
	}
	for _, d := range ds {
		if gentle {
			_ = d.cmd.Process.Signal(syscall.SIGTERM)
		} else {
			_ = d.cmd.Process.Kill()
		}
	}
	deadline := time.After(10 * time.Second)
	for _, d := range ds {
		select {
		case <-d.done:
		case <-deadline:
			_ = d.cmd.Process.Kill()
			<-d.done
		}
	}
	pids, _ := filepath.Glob(c.path("run", "*.pid"))
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(cmdline), c.conf) {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

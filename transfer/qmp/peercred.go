package qmp

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ticksPerSecond is USER_HZ, the unit of /proc/<pid>/stat's start time. The
// kernel fixes it at 100 on every architecture it exports to user space.
const ticksPerSecond = 100

// ErrPeerGone means the process behind a connection's SO_PEERCRED pid is
// no longer the one that was listening: it exited, and the pid may now
// name another process whose ids must not be used.
var ErrPeerGone = errors.New("qmp: the monitor's process is gone (its pid may have been reused)")

// PeerCred is the user and group the process at the other end of a
// unix-socket connection (QEMU, for a client from Dial) runs as now: its
// pid from SO_PEERCRED, then its effective ids from /proc (SO_PEERCRED's
// own ids are those of when QEMU listened, before a -runas dropped them).
//
// A pid is only a name: if QEMU exited after we connected, the pid can
// belong to another process by the time /proc is read. So the process
// read must have started before this connection was opened, and must be
// the same process (same start time) before and after its ids are read.
func (c *Client) PeerCred() (uid, gid int, err error) {
	uc, ok := c.rwc.(*net.UnixConn)
	if !ok {
		return 0, 0, errors.New("qmp: not a unix socket connection")
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *unix.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) { cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return 0, 0, err
	}
	if serr != nil {
		return 0, 0, fmt.Errorf("qmp: SO_PEERCRED: %w", serr)
	}
	return procIDs("/proc", int(cred.Pid), c.openedTicks)
}

// procIDs reads the effective uid and gid of pid under procRoot, checking
// that the process started no later than notAfter (boot-clock ticks) and
// did not change while it was read.
func procIDs(procRoot string, pid int, notAfter uint64) (uid, gid int, err error) {
	dir := procRoot + "/" + strconv.Itoa(pid)
	before, err := startTicks(dir)
	if err != nil {
		return 0, 0, err
	}
	if before > notAfter {
		return 0, 0, fmt.Errorf("%w: pid %d started after the connection was opened", ErrPeerGone, pid)
	}
	b, err := os.ReadFile(dir + "/status")
	if err != nil {
		return 0, 0, fmt.Errorf("qmp: the monitor's process: %w", err)
	}
	after, err := startTicks(dir)
	if err != nil {
		return 0, 0, err
	}
	if after != before {
		return 0, 0, fmt.Errorf("%w: pid %d changed while it was read", ErrPeerGone, pid)
	}
	ids := map[string]int{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		if f := strings.Fields(v); (k == "Uid" || k == "Gid") && len(f) >= 2 {
			if n, err := strconv.Atoi(f[1]); err == nil { // effective id
				ids[k] = n
			}
		}
	}
	u, uok := ids["Uid"]
	g, gok := ids["Gid"]
	if !uok || !gok {
		return 0, 0, fmt.Errorf("qmp: no Uid/Gid in %s/status", dir)
	}
	return u, g, nil
}

// startTicks is field 22 of <dir>/stat: when the process started, in ticks
// of the boot clock. The command name (field 2) may hold spaces and
// parentheses, so fields are counted after its last ')'.
func startTicks(dir string) (uint64, error) {
	b, err := os.ReadFile(dir + "/stat")
	if errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("%w: %v", ErrPeerGone, err)
	}
	if err != nil {
		return 0, fmt.Errorf("qmp: the monitor's process: %w", err)
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("qmp: malformed %s/stat", dir)
	}
	f := strings.Fields(string(b[i+1:]))
	const startField = 22 - 3 // fields after ')' begin with field 3
	if len(f) <= startField {
		return 0, fmt.Errorf("qmp: malformed %s/stat", dir)
	}
	n, err := strconv.ParseUint(f[startField], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("qmp: malformed %s/stat: %w", dir, err)
	}
	return n, nil
}

// bootTicks is the boot clock (which /proc's start times count) now, in
// ticks. Zero if the clock cannot be read, so that every peer then counts
// as started too late: PeerCred fails closed.
func bootTicks() uint64 {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
		return 0
	}
	// Rounded up: a process started in this same tick is not "later".
	return uint64(ts.Sec)*ticksPerSecond + (uint64(ts.Nsec)*ticksPerSecond+999_999_999)/1_000_000_000
}

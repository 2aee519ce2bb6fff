package qmp

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

func TestProcIDs(t *testing.T) {
	const status = "Name:\tqemu\nUid:\t0\t107\t107\t107\nGid:\t0\t115\t115\t115\n"
	stat := func(start string) string {
		// The command name holds ") 1 2" to prove fields are counted after the last ')'.
		return "4242 (qemu) 1 2) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 3 0 " + start + " 0 0\n"
	}
	for _, tc := range []struct {
		name     string
		stat     string
		status   string
		notAfter uint64
		uid, gid int
		wantErr  error
	}{
		{name: "effective ids", stat: stat("500"), status: status, notAfter: 500, uid: 107, gid: 115},
		{name: "started after the connection", stat: stat("501"), status: status, notAfter: 500, wantErr: ErrPeerGone},
		{name: "no such process", notAfter: 500, wantErr: ErrPeerGone},
		{name: "short stat", stat: "4242 (qemu) S 1 2\n", status: status, notAfter: 500, wantErr: errMalformed},
		{name: "no ids", stat: stat("10"), status: "Name:\tqemu\n", notAfter: 500, wantErr: errMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if tc.stat != "" {
				dir := filepath.Join(root, "4242")
				if err := os.Mkdir(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				os.WriteFile(filepath.Join(dir, "stat"), []byte(tc.stat), 0o644)
				os.WriteFile(filepath.Join(dir, "status"), []byte(tc.status), 0o644)
			}
			uid, gid, err := procIDs(root, 4242, tc.notAfter)
			switch {
			case tc.wantErr == errMalformed:
				if err == nil || errors.Is(err, ErrPeerGone) {
					t.Fatalf("err %v, want a malformed-/proc error", err)
				}
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err %v, want %v", err, tc.wantErr)
				}
			case err != nil || uid != tc.uid || gid != tc.gid:
				t.Fatalf("got %d:%d %v, want %d:%d", uid, gid, err, tc.uid, tc.gid)
			}
		})
	}
}

// errMalformed marks table rows that want an error that is not ErrPeerGone.
var errMalformed = errors.New("malformed")

// The real /proc: this process started before now, a process started
// after a connection was opened is refused, and so is one that is gone.
func TestProcIDsRealProcesses(t *testing.T) {
	opened := bootTicks()
	uid, gid, err := procIDs("/proc", os.Getpid(), opened)
	if err != nil || uid != os.Geteuid() || gid != os.Getegid() {
		t.Fatalf("self: %d:%d %v", uid, gid, err)
	}
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	// Started after a connection opened at 'opened' minus a second: a
	// reused pid looks exactly like this.
	if _, _, err := procIDs("/proc", pid, opened-ticksPerSecond); !errors.Is(err, ErrPeerGone) {
		t.Fatalf("later process: %v, want ErrPeerGone", err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if _, _, err := procIDs("/proc", pid, bootTicks()); !errors.Is(err, ErrPeerGone) {
		t.Fatalf("exited process %s: %v, want ErrPeerGone", strconv.Itoa(pid), err)
	}
}

// PeerCred over a real unix socket whose other end is this process.
func TestPeerCredSocketpair(t *testing.T) {
	a, b := unixPair(t)
	defer a.Close()
	defer b.Close()
	c := &Client{rwc: a, openedTicks: bootTicks()}
	if uid, gid, err := c.PeerCred(); err != nil || uid != os.Geteuid() || gid != os.Getegid() {
		t.Fatalf("%d:%d %v", uid, gid, err)
	}
	c.openedTicks = 0 // as if opened before this process started
	if _, _, err := c.PeerCred(); !errors.Is(err, ErrPeerGone) {
		t.Fatalf("%v, want ErrPeerGone", err)
	}
}

func unixPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	a, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	return a, b
}

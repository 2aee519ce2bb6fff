package main

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestSdNotify(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	for _, state := range []string{"READY=1", "STOPPING=1", "WATCHDOG=1"} {
		if err := sdNotify(state); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 256)
		_ = conn.SetReadDeadline(time.Now().Add(waitLong))
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(buf[:n]); got != state {
			t.Fatalf("got %q want %q", got, state)
		}
	}
	t.Setenv("NOTIFY_SOCKET", "")
	if err := sdNotify("READY=1"); err != nil {
		t.Fatalf("without NOTIFY_SOCKET: %v", err)
	}
}

func TestWatchdogInterval(t *testing.T) {
	for _, tc := range []struct {
		usec, pid string
		want      time.Duration
	}{
		{"", "", 0},
		{"bogus", "", 0},
		{"2000000", "", time.Second},
		{"2000000", "1", 0}, // another process's watchdog
	} {
		t.Setenv("WATCHDOG_USEC", tc.usec)
		t.Setenv("WATCHDOG_PID", tc.pid)
		if got := watchdogInterval(); got != tc.want {
			t.Errorf("usec %q pid %q: %v want %v", tc.usec, tc.pid, got, tc.want)
		}
	}
}

// The real daemon announces READY=1, watchdog pings and STOPPING=1.
func TestE2ENotifyProtocol(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "n.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	d := startDaemon(t, daemonOpts{env: []string{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=200000"}})
	seen := map[string]bool{}
	read := func(want string) {
		t.Helper()
		deadline := time.Now().Add(waitLong)
		for !seen[want] {
			_ = conn.SetReadDeadline(deadline)
			buf := make([]byte, 256)
			n, err := conn.Read(buf)
			if err != nil {
				t.Fatalf("waiting for %s: %v (seen %v)", want, err, seen)
			}
			seen[string(buf[:n])] = true
		}
	}
	read("READY=1")
	read("WATCHDOG=1")
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d", code)
	}
	read("STOPPING=1")
}

func TestSystemdUnitVerify(t *testing.T) {
	unit := filepath.Join("..", "..", "systemd", "imagestore-agent.service")
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "User=imagestore", "NoNewPrivileges=yes", "ProtectSystem=strict",
		"ReadWritePaths=/var/lib/imagestore", "PrivateTmp=yes", "ProtectHome=yes", "CapabilityBoundingSet=\n", "WatchdogSec="} {
		if !strings.Contains(string(b), want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skipf("systemd-analyze not installed (%v): unit content checked, verify skipped", err)
	}
	// verify resolves ExecStart, so point it at the freshly built binary.
	dir := t.TempDir()
	text := strings.Replace(string(b), "/usr/local/bin/imagestore-agent", agentBin, 1)
	u := filepath.Join(dir, "imagestore-agent.service")
	if err := os.WriteFile(u, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", "--man=no", u).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	t.Logf("systemd-analyze verify: ok %s", out)
}

package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// children lists the pids whose parent is pid, with their command names.
func children(t *testing.T, pid int) map[int]string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]string{}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces, so cut at ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out[n] = s[strings.IndexByte(s, '(')+1 : i]
		}
	}
	return out
}

// TestSIGTERMLeavesNoChildren runs the real daemon, starts a qemu-nbd for
// an NBD backup target and one for a remote target (instant restore),
// sends SIGTERM and checks that none of its children outlives it.
func TestSIGTERMLeavesNoChildren(t *testing.T) {
	d := startDaemon(t, daemonOpts{})
	up := d.sync(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1})
	ws, _ := up["uploadDir"].(string)
	exp := d.sync(t, "/imagestore/exportnbdimage-sync/", map[string]any{"workspace": ws, "sizes": []int64{64 << 20}})
	if ports, _ := exp["ports"].([]any); len(ports) != 1 {
		t.Fatalf("exportnbdimage: %v", exp)
	}
	img := filepath.Join(ws, "disk.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	runTool(t, "qemu-io", "-c", "write -P 0x5a 0 1M", img)
	imp := d.sync(t, "/imagestore/import-backup-sync/", map[string]any{"imgurl": img, "name": "vol"})
	mustSucceed(t, "import-backup", imp)
	rt := d.sync(t, "/imagestore/export/remotetarget-sync/", map[string]any{
		"installPath": "zstore://vol/" + imp["id"].(string), "remoteTargetType": "NBD", "hostname": "127.0.0.1"})
	mustSucceed(t, "remotetarget", rt)

	kids := children(t, d.cmd.Process.Pid)
	nbd := 0
	for _, name := range kids {
		if strings.HasPrefix(name, "qemu-nbd") {
			nbd++
		}
	}
	if nbd < 2 {
		t.Fatalf("want a qemu-nbd for the target and one for the remote target, children %v", kids)
	}
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit code %d after SIGTERM", code)
	}
	for pid, name := range kids {
		if err := syscall.Kill(pid, 0); err != syscall.ESRCH {
			t.Errorf("child %d (%s) outlived the agent (kill -0: %v)", pid, name, err)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

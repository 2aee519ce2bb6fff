package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"imagestore/transfer/qmp"
	"imagestore/transfer/qmp/libvirtqmp"
	"imagestore/transfer/qmp/libvirtqmp/libvirttest"
)

// TestLiveBackupThroughLibvirt runs a full then an incremental batbak
// through the zstcli binary against a libvirt domain (a private libvirtd,
// a transient TCG domain with two qcow2 disks), reached by name through
// libvirt's monitor passthrough: -qmp-dir holds no socket for the VM.
func TestLiveBackupThroughLibvirt(t *testing.T) {
	const vm = "6f1e2d3c4b5a49788796a5b4c3d2e1f0"
	d := libvirttest.StartDaemon(t)
	dom := d.StartDomain(vm, lbDisk, lbDisk)
	dom.Write(0, 0, 2*lbMiB, 0x11)
	dom.Write(1, 4*lbMiB, lbMiB, 0x12)

	qdir := t.TempDir() // no <VM>.qmp here: libvirt it is; the control socket goes here
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	prog := filepath.Join(t.TempDir(), "progress")
	zstcli := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(zstcliBin, append([]string{"-rootca", ca, "-progress", prog}, args...)...)
		cmd.Env = append(os.Environ(), "IMAGESTORE_QMP_DIR="+qdir, "IMAGESTORE_LIBVIRT_SOCK="+d.Socket)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("zstcli %v: %v\nstdout: %s\nstderr: %s", args, err, out.String(), errb.String())
		}
		return out.String()
	}
	batbak := func(dest, args string) batOut {
		t.Helper()
		out := zstcli("batbak", "-domain", vm, "-destdir", dest, "-point-in-time", "-args", args, "-libvirt-sock", d.Socket)
		var r batOut
		if err := json.Unmarshal([]byte(out), &r); err != nil || strings.Count(strings.TrimSpace(out), "\n") != 0 {
			t.Fatalf("batbak stdout %q: %v", out, err)
		}
		return r
	}
	nodes := []string{"drive-virtio-disk0", "drive-virtio-disk1"}
	has := func(f string, off, length int64, pattern byte) {
		t.Helper()
		out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0x%02x %d %d", pattern, off, length), f).CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") {
			t.Fatalf("%s lacks pattern 0x%02x at %d+%d: %v %s", filepath.Base(f), pattern, off, length, err, out)
		}
	}

	d1 := t.TempDir()
	full := batbak(d1, "zsbitmap0,full,drive-virtio-disk0,0:zsbitmap1,auto,drive-virtio-disk1,0")
	if len(full) != 2 || full[nodes[0]].Mode != "full" || full[nodes[1]].Mode != "full" {
		t.Fatalf("full: %+v", full)
	}
	if b, err := os.ReadFile(prog); err != nil || !strings.HasSuffix(strings.TrimSpace(string(b)), "100") {
		t.Fatalf("progress %q %v", b, err)
	}
	f0, f1 := filepath.Join(d1, full[nodes[0]].BackupFile), filepath.Join(d1, full[nodes[1]].BackupFile)
	has(f0, 0, 2*lbMiB, 0x11)
	has(f0, 2*lbMiB, lbMiB, 0)
	has(f1, 4*lbMiB, lbMiB, 0x12)

	// Written between the two backups: exactly what the incrementals hold.
	dom.Write(0, 8*lbMiB, lbMiB, 0x21)
	dom.Write(1, 32*lbMiB, 128<<10, 0x22)
	dom.Write(1, 4*lbMiB, 64<<10, 0x23)

	d2 := t.TempDir()
	inc := batbak(d2, "zsbitmap0,auto,drive-virtio-disk0,0:zsbitmap1,auto,drive-virtio-disk1,0")
	if len(inc) != 2 || inc[nodes[0]].Mode != "incremental" || inc[nodes[1]].Mode != "incremental" {
		t.Fatalf("incremental: %+v", inc)
	}
	i0, i1 := filepath.Join(d2, inc[nodes[0]].BackupFile), filepath.Join(d2, inc[nodes[1]].BackupFile)
	wantOnly(t, i0, [2]int64{8 * lbMiB, 9 * lbMiB})
	wantOnly(t, i1, [2]int64{4 * lbMiB, 4*lbMiB + 64<<10}, [2]int64{32 * lbMiB, 32*lbMiB + 128<<10})
	has(i0, 8*lbMiB, lbMiB, 0x21)
	has(i1, 32*lbMiB, 128<<10, 0x22)
	has(i1, 4*lbMiB, 64<<10, 0x23)
	if _, err := os.Stat(filepath.Join(qdir, vm+".bak")); !os.IsNotExist(err) {
		t.Fatalf("the control socket was left behind: %v", err)
	}

	// bakconfirm keeps only the newest checkpoint; stopbak with nothing
	// running finds no job of ours (socket from $IMAGESTORE_LIBVIRT_SOCK).
	zstcli("bakconfirm", "-domain", vm, "-args", "zsbitmap0,drive-virtio-disk0:zsbitmap1,drive-virtio-disk1")
	var bm []struct {
		NodeName string `json:"node-name"`
		Bitmaps  []struct {
			Name string `json:"name"`
		} `json:"dirty-bitmaps"`
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := dom.Monitor().Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &bm); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range bm {
		for _, b := range n.Bitmaps {
			names = append(names, b.Name)
		}
	}
	if len(names) != 2 || !strings.HasPrefix(names[0], "zsbitmap") || !strings.HasPrefix(names[1], "zsbitmap") {
		t.Fatalf("after bakconfirm, bitmaps %v, want one checkpoint per disk", names)
	}
	if out := zstcli("stopbak", "-domain", vm, "-batbak"); out != "" {
		t.Fatalf("stopbak printed %q", out)
	}

	// stopbak through libvirt while a batch backup runs (disk 1 limited
	// to 2 MiB/s, so it is still copying): the backup fails and leaves no
	// file; the checkpoints are what they were, still recording, with no
	// temporary bitmap and no target node left (LIVE-BACKUP.md §4.5/§4.6);
	// the next backup holds every write since the confirmed one.
	dom.Write(0, 2*lbMiB, lbMiB, 0x31)
	dom.Write(1, 0, 16*lbMiB, 0x32)
	before := libvirtBitmaps(t, dom.Monitor())
	// Twice: stopbak asks the running batbak (its control socket), which
	// rolls back through the passthrough; then a batbak killed mid-job
	// leaves its job in QEMU and stopbak cleans up through libvirt itself.
	for _, kill := range []bool{false, true} {
		d3 := t.TempDir()
		bat := exec.Command(zstcliBin, "-rootca", ca, "batbak", "-domain", vm, "-destdir", d3,
			"-args", "zsbitmap0,auto,drive-virtio-disk0,0:zsbitmap1,auto,drive-virtio-disk1,2097152")
		bat.Env = append(os.Environ(), "IMAGESTORE_QMP_DIR="+qdir, "IMAGESTORE_LIBVIRT_SOCK="+d.Socket)
		var batErr strings.Builder
		bat.Stderr = &batErr
		if err := bat.Start(); err != nil {
			t.Fatal(err)
		}
		jobRunning(t, dom.Monitor())
		if kill {
			if err := bat.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			_ = bat.Wait()
		}
		zstcli("stopbak", "-force=True", "-domain", vm, "-batbak")
		if !kill {
			if err := bat.Wait(); err == nil || !strings.Contains(batErr.String(), "stopped") {
				t.Fatalf("a stopped batbak: %v, stderr %q", err, batErr.String())
			}
			if ents, _ := os.ReadDir(d3); len(ents) != 0 {
				t.Fatalf("stopped batbak left %v", ents)
			}
		}
		after := libvirtBitmaps(t, dom.Monitor())
		if len(after) != 2 || fmt.Sprint(names2(after)) != fmt.Sprint(names2(before)) {
			t.Fatalf("kill=%v: after stopbak, bitmaps %+v, want the checkpoints of before %+v", kill, after, before)
		}
		for _, b := range after {
			if !b.Recording || !b.Persistent || b.Busy || b.Inconsistent {
				t.Fatalf("kill=%v: after stopbak: %+v", kill, b)
			}
			want := lbMiB // disk 0's 1 MiB, disk 1's 16 MiB
			if strings.HasPrefix(b.Name, "zsbitmap1.") {
				want = 16 * lbMiB
			}
			if b.Count != want {
				t.Fatalf("kill=%v: after stopbak %s counts %d, want the %d bytes written since the confirmed backup", kill, b.Name, b.Count, want)
			}
		}
		var jobsLeft []json.RawMessage
		if err := dom.Monitor().Execute(ctx, "query-jobs", nil, &jobsLeft); err != nil || len(jobsLeft) != 0 {
			t.Fatalf("kill=%v: jobs left after stopbak: %s %v", kill, jobsLeft, err)
		}
	}
	d4 := t.TempDir()
	inc2 := batbak(d4, "zsbitmap0,auto,drive-virtio-disk0,0:zsbitmap1,auto,drive-virtio-disk1,0")
	if inc2[nodes[0]].Mode != "incremental" || inc2[nodes[1]].Mode != "incremental" {
		t.Fatalf("after stopbak: %+v", inc2)
	}
	j0, j1 := filepath.Join(d4, inc2[nodes[0]].BackupFile), filepath.Join(d4, inc2[nodes[1]].BackupFile)
	wantOnly(t, j0, [2]int64{2 * lbMiB, 3 * lbMiB})
	wantOnly(t, j1, [2]int64{0, 16 * lbMiB})
	// The chain full ← inc ← inc2 equals a raw shadow of every write.
	sh := t.TempDir()
	shadows := [2]string{filepath.Join(sh, "d0.raw"), filepath.Join(sh, "d1.raw")}
	for i, ws := range [2][]string{
		{"write -P 0x11 0 2M", "write -P 0x21 8M 1M", "write -P 0x31 2M 1M"},
		{"write -P 0x12 4M 1M", "write -P 0x22 32M 128k", "write -P 0x23 4M 64k", "write -P 0x32 0 16M"},
	} {
		f, err := os.Create(shadows[i])
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(lbDisk); err != nil {
			t.Fatal(err)
		}
		f.Close()
		for _, w := range ws {
			if out, err := exec.Command("qemu-io", "-f", "raw", "-c", w, shadows[i]).CombinedOutput(); err != nil {
				t.Fatalf("shadow: %v %s", err, out)
			}
		}
	}
	for i, c := range [][3]string{{f0, i0, j0}, {f1, i1, j1}} {
		if out, err := exec.Command("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", c[0], "-F", "qcow2", c[1]).CombinedOutput(); err != nil {
			t.Fatalf("rebase: %v %s", err, out)
		}
		compareOnBase(t, c[2], c[1], shadows[i])
	}

	// A VM libvirtd does not know: the error names both ways tried.
	cmd := exec.Command(zstcliBin, "-rootca", ca, "bakconfirm", "-domain", "00000000000000000000000000000000", "-args", "zsbitmap0,drive-virtio-disk0")
	cmd.Env = append(os.Environ(), "IMAGESTORE_QMP_DIR="+qdir, "IMAGESTORE_LIBVIRT_SOCK="+d.Socket)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "no QMP socket") || !strings.Contains(string(out), "no such domain") {
		t.Fatalf("unknown VM: %v %s", err, out)
	}

	var jobs []json.RawMessage
	if err := dom.Monitor().Execute(ctx, "query-jobs", nil, &jobs); err != nil || len(jobs) != 0 {
		t.Fatalf("jobs left: %s %v", jobs, err)
	}
}

// lbBitmap is a named bitmap of a libvirt domain's node.
type lbBitmap struct {
	Node         string
	Name         string `json:"name"`
	Count        int64  `json:"count"`
	Recording    bool   `json:"recording"`
	Busy         bool   `json:"busy"`
	Persistent   bool   `json:"persistent"`
	Inconsistent bool   `json:"inconsistent"`
}

// libvirtBitmaps lists every named bitmap of the domain, and fails the
// test on a node the engine added (a target left behind).
func libvirtBitmaps(t *testing.T, m qmp.Monitor) []lbBitmap {
	t.Helper()
	var nodes []struct {
		NodeName string     `json:"node-name"`
		Bitmaps  []lbBitmap `json:"dirty-bitmaps"`
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		t.Fatal(err)
	}
	var out []lbBitmap
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, "zstgt") {
			t.Fatalf("target node %s left", n.NodeName)
		}
		for _, b := range n.Bitmaps {
			if b.Name != "" {
				b.Node = n.NodeName
				out = append(out, b)
			}
		}
	}
	return out
}

func names2(bs []lbBitmap) []string {
	var s []string
	for _, b := range bs {
		s = append(s, b.Node+"/"+b.Name)
	}
	return s
}

// TestLiveBackupLibvirtQEMUNotRoot: with QEMU running as libvirt-qemu
// (libvirt's default, not ZStack's root), the target files the CLI (root)
// creates in a directory are given to QEMU's user, so QEMU can open them;
// a full and an incremental work and hold the data.
func TestLiveBackupLibvirtQEMUNotRoot(t *testing.T) {
	// Parallel: its libvirtd probes QEMU's capabilities as the other user
	// for about a minute, mostly waiting; the other tests run meanwhile.
	t.Parallel()
	const vm = "7a6b5c4d3e2f41908f7e6d5c4b3a2910"
	u, err := user.Lookup("libvirt-qemu")
	if err != nil {
		t.Fatalf("the libvirt-qemu user (package libvirt-daemon-system): %v", err)
	}
	g, err := user.LookupGroupId(u.Gid)
	if err != nil {
		t.Fatal(err)
	}
	d := libvirttest.StartDaemonWith(t, libvirttest.DaemonOptions{QEMUUser: u.Username, QEMUGroup: g.Name})
	dom := d.StartDomain(vm, lbDisk)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	uid, gid, err := libvirtqmp.QEMUUser(ctx, libvirtqmp.Options{Socket: d.Socket, Domain: vm})
	if err != nil || strconv.Itoa(uid) != u.Uid || strconv.Itoa(gid) != u.Gid {
		t.Fatalf("QEMU runs as %d:%d (%v), want %s:%s", uid, gid, err, u.Uid, u.Gid)
	}
	dom.Write(0, 0, 2*lbMiB, 0x51)

	// A directory QEMU's user can reach (a test's temp dir is 0700).
	dest, err := os.MkdirTemp("", "lbnr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dest) })
	if err := os.Chmod(dest, 0o755); err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	batbak := func(dir, args string) batOut {
		t.Helper()
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(zstcliBin, "-rootca", ca, "batbak", "-domain", vm, "-destdir", dir, "-args", args)
		cmd.Env = append(os.Environ(), "IMAGESTORE_LIBVIRT_SOCK="+d.Socket, "IMAGESTORE_QMP_DIR="+dest)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("batbak: %v\nstderr: %s", err, errb.String())
		}
		var r batOut
		if err := json.Unmarshal([]byte(out.String()), &r); err != nil {
			t.Fatalf("batbak stdout %q: %v", out.String(), err)
		}
		return r
	}
	check := func(f string, off, length int64, pattern byte) {
		t.Helper()
		st, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if sys := st.Sys().(*syscall.Stat_t); strconv.Itoa(int(sys.Uid)) != u.Uid || strconv.Itoa(int(sys.Gid)) != u.Gid {
			t.Fatalf("%s is owned by %d:%d, want QEMU's %s:%s", f, sys.Uid, sys.Gid, u.Uid, u.Gid)
		}
		out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0x%02x %d %d", pattern, off, length), f).CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") {
			t.Fatalf("%s lacks pattern 0x%02x at %d+%d: %v %s", filepath.Base(f), pattern, off, length, err, out)
		}
	}
	full := batbak(filepath.Join(dest, "full"), "zsbitmap0,full,drive-virtio-disk0,0")
	if full["drive-virtio-disk0"].Mode != "full" {
		t.Fatalf("full: %+v", full)
	}
	check(filepath.Join(dest, "full", full["drive-virtio-disk0"].BackupFile), 0, 2*lbMiB, 0x51)
	dom.Write(0, 8*lbMiB, lbMiB, 0x52)
	inc := batbak(filepath.Join(dest, "inc"), "zsbitmap0,auto,drive-virtio-disk0,0")
	if inc["drive-virtio-disk0"].Mode != "incremental" {
		t.Fatalf("incremental: %+v", inc)
	}
	f := filepath.Join(dest, "inc", inc["drive-virtio-disk0"].BackupFile)
	check(f, 8*lbMiB, lbMiB, 0x52)
	wantOnly(t, f, [2]int64{8 * lbMiB, 9 * lbMiB})
}

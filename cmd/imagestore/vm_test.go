package main

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

// vmBackupRun runs `imagestore vm backup` as the operator does, with the
// VM's QMP directory and a private state directory in its environment.
func (e *liveEnv) vmBackup(stateDir string, args ...string) (string, string, error) {
	cmd := exec.Command(cliBin, append([]string{"-url", e.s.url, "vm", "backup", "-domain", lbVM, "-store", e.s.agentURL}, args...)...)
	cmd.Env = append(e.env, "IMAGESTORE_STATE_DIR="+stateDir)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func (e *liveEnv) vmBackupJSON(stateDir string, args ...string) []vmBackup {
	e.t.Helper()
	out, errs, err := e.vmBackup(stateDir, append([]string{"-json"}, args...)...)
	if err != nil {
		e.t.Fatalf("vm backup %v: %v\nstdout: %s\nstderr: %s\nqemu: %s", args, err, out, errs, e.vm.Log.String())
	}
	var r []vmBackup
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		e.t.Fatalf("vm backup -json stdout %q: %v", out, err)
	}
	return r
}

func (e *liveEnv) chainLen(installPath string) int {
	e.t.Helper()
	r := e.s.post(e.t, "/imagestore/imgchain-sync/", map[string]any{"installPath": installPath}, nil)
	c, _ := r["chain"].([]any)
	return len(c)
}

func TestVMBackupOneCommand(t *testing.T) {
	t.Parallel()
	e := newLiveEnv(t)
	vm := e.vm
	state := t.TempDir()
	disks := []string{"virtio-disk0", "virtio-disk1"}

	// Full: every disk, with no state yet (and without -full).
	vm.Write(1, 8*lbMiB, 2*lbMiB, 0x21)
	full := e.vmBackupJSON(state)
	ref := []string{vm.Snapshot(0, "f0"), vm.Snapshot(1, "f1")}
	fullRef := ref
	if len(full) != 2 {
		t.Fatalf("full: %+v", full)
	}
	for i, b := range full {
		if b.Disk != disks[i] || b.Mode != "full" || b.Name != lbVM+"-"+disks[i] {
			t.Fatalf("full disk %d: %+v", i, b)
		}
		if n := e.chainLen(b.InstallPath); n != 1 {
			t.Fatalf("full disk %d: chain of %d", i, n)
		}
		e.restoreEquals(imported{b.InstallPath, b.Name, b.ID}, ref[i])
	}

	// Incremental: only the writes, each on its disk's previous backup.
	vm.Write(0, 1*lbMiB, 1*lbMiB, 0x31)
	vm.Zero(0, 4*lbMiB, 1*lbMiB)
	vm.Write(1, 40*lbMiB, 512<<10, 0x32)
	out, errs, err := e.vmBackup(state)
	if err != nil {
		t.Fatalf("vm backup: %v\n%s", err, errs)
	}
	ref = []string{vm.Snapshot(0, "i0"), vm.Snapshot(1, "i1")}
	lines := strings.Fields(out)
	st, err := (&globals{stateDir: state}).loadVMState(lbVM)
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 2 {
		t.Fatalf("vm backup printed %q", out)
	}
	for i, d := range disks {
		b := st.Disks[d]
		if lines[i] != b.Name+":"+b.ID || b.Mode != "incremental" || b.Name != full[i].Name || b.ID == full[i].ID {
			t.Fatalf("incremental disk %s: printed %q, state %+v", d, lines[i], b)
		}
		if n := e.chainLen(b.InstallPath); n != 2 {
			t.Fatalf("incremental disk %s: chain of %d, want 2", d, n)
		}
		e.restoreEquals(imported{b.InstallPath, b.Name, b.ID}, ref[i])
		// Confirmed after the import: only the newest checkpoint is left.
		if bms := bitmapNames(t, vm, i); bms != vmBitmap+".2" {
			t.Fatalf("disk %s checkpoints after the import: %s", d, bms)
		}
	}
	// A failed import (the store is over its quota): nothing is confirmed
	// and the state keeps the last good backups, so the next incremental
	// also carries the lost one's clusters.
	vm.Write(0, 10*lbMiB, 64<<10, 0x41)
	e.s.post(t, "/imagestore/setquota-sync/", map[string]any{"maxCapacity": 1}, nil)
	if out, errs, err := e.vmBackup(state); err == nil || !strings.Contains(errs, "import-backup") {
		t.Fatalf("vm backup into a full store: %v %q %q", err, out, errs)
	}
	e.s.post(t, "/imagestore/setquota-sync/", map[string]any{"maxCapacity": 0}, nil)
	vm.Write(0, 12*lbMiB, 64<<10, 0x42)
	after := e.vmBackupJSON(state)
	ref = []string{vm.Snapshot(0, "q0"), vm.Snapshot(1, "q1")}
	for i, b := range after {
		if b.Mode != "incremental" || e.chainLen(b.InstallPath) != 3 {
			t.Fatalf("after the failed import, disk %d: %+v", i, b)
		}
		e.restoreEquals(imported{b.InstallPath, b.Name, b.ID}, ref[i])
		if bms := bitmapNames(t, vm, i); bms != vmBitmap+".4" {
			t.Fatalf("disk %d checkpoints after the failed import and the next backup: %s", i, bms)
		}
	}
	// -full ignores the checkpoints: a new chain of length 1.
	again := e.vmBackupJSON(state, "-full")
	for i, b := range again {
		if b.Mode != "full" || e.chainLen(b.InstallPath) != 1 {
			t.Fatalf("-full disk %d: %+v", i, b)
		}
		e.restoreEquals(imported{b.InstallPath, b.Name, b.ID}, ref[i])
	}

	// vm restore: refused while the VM runs; on the stopped VM, the first
	// full backups replace both disks' files.
	restore := func(refs string) (string, string, error) {
		cmd := exec.Command(cliBin, "-url", e.s.url, "vm", "restore", "-domain", lbVM, refs)
		cmd.Env = append(e.env, "IMAGESTORE_STATE_DIR="+state)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		return out.String(), errb.String(), err
	}
	refs := full[0].Name + ":" + full[0].ID + "," + full[1].Name + ":" + full[1].ID
	if out, errs, err := restore(refs); err == nil || !strings.Contains(errs, "the VM is running") {
		t.Fatalf("restore of a running VM: %v %q %q", err, out, errs)
	}
	if _, errs, err := restore("nosuch:0123"); err == nil || !strings.Contains(errs, "not a backup of a disk") {
		t.Fatalf("restore of an unknown image: %v %q", err, errs)
	}
	vm.Quit()
	out, errs, err = restore(refs)
	if err != nil || strings.Count(out, "\n") != 2 {
		t.Fatalf("restore: %v %q %q", err, out, errs)
	}
	for i, d := range vm.Disks {
		if o, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", d.File, fullRef[i]).CombinedOutput(); err != nil {
			t.Fatalf("disk %d after restore differs from its full backup: %v %s", i, err, o)
		}
		if o, err := exec.Command("qemu-img", "check", d.File).CombinedOutput(); err != nil {
			t.Fatalf("disk %d after restore: %v %s", i, err, o)
		}
	}
}

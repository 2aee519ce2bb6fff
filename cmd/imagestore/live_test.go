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

	"imagestore/transfer/livebackup/vmtest"
	"imagestore/transfer/qmp"
)

const (
	lbMiB  = int64(1 << 20)
	lbDisk = 64 * lbMiB
	lbVM   = "0a1b2c3d4e5f40718293a4b5c6d7e8f9"
)

// liveEnv is a VM with two disks (disk 0 on a backing file) and a store,
// driven through the zstcli binary exactly as the KVM agent calls it.
type liveEnv struct {
	t    *testing.T
	vm   *vmtest.VM
	s    *store
	prog string
	env  []string
	zst  string
}

func newLiveEnv(t *testing.T) *liveEnv {
	t.Helper()
	qdir, err := os.MkdirTemp("", "lb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(qdir) })
	e := &liveEnv{t: t, s: startStore(t, "")}
	e.vm = vmtest.Start(t, lbVM, qdir,
		vmtest.DiskSpec{Node: "libvirt-2-format", Device: "virtio-disk0", Size: lbDisk, BaseData: 16 * lbMiB},
		vmtest.DiskSpec{Node: "libvirt-1-format", Device: "virtio-disk1", Size: lbDisk})
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	e.prog = filepath.Join(t.TempDir(), "progress")
	e.zst = zstcliBin + " -rootca " + ca
	e.env = append(os.Environ(), "IMAGESTORE_QMP_DIR="+qdir)
	return e
}

// zstcli runs one command line through a shell, as the agent does.
func (e *liveEnv) zstcli(line string) (string, string, error) {
	cmd := exec.Command("sh", "-c", e.zst+" "+line)
	cmd.Env = e.env
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func (e *liveEnv) zstcliOK(line string) string {
	e.t.Helper()
	out, errs, err := e.zstcli(line)
	if err != nil {
		e.t.Fatalf("zstcli %s: %v\nstdout: %s\nstderr: %s\nqemu: %s", line, err, out, errs, e.vm.Log.String())
	}
	return out
}

type batOut map[string]struct {
	BackupFile string `json:"backupFile"`
	Mode       string `json:"mode"`
}

func (e *liveEnv) batbak(dest, args string) batOut {
	e.t.Helper()
	out := e.zstcliOK(fmt.Sprintf("-progress %s batbak -domain %s -destdir %s -point-in-time  -args %s", e.prog, lbVM, dest, args))
	var r batOut
	if err := json.Unmarshal([]byte(out), &r); err != nil || strings.Count(strings.TrimSpace(out), "\n") != 0 {
		e.t.Fatalf("batbak stdout %q: %v", out, err)
	}
	return r
}

// imported is one backup in the store.
type imported struct{ installPath, name, id string }

func (e *liveEnv) importBackup(file, parent, release string) imported {
	e.t.Helper()
	body := map[string]any{"imgurl": file, "name": "vol", "parent": parent}
	if release != "" {
		body["processToRelease"] = release
	}
	r := e.s.post(e.t, "/imagestore/import-backup-sync/", body, nil)
	return imported{r["installPath"].(string), r["name"].(string), r["id"].(string)}
}

// restoreEquals pulls the chain ending at im and compares it with ref.
func (e *liveEnv) restoreEquals(im imported, ref string) {
	e.t.Helper()
	dst := filepath.Join(e.t.TempDir(), "restored.qcow2")
	cliOK(e.t, "-url", e.s.url, "pull", "-installpath", dst, im.name+":"+im.id)
	if out, err := exec.Command("qemu-img", "compare", "-F", "raw", dst, ref).CombinedOutput(); err != nil {
		e.t.Fatalf("restored %s:%s differs from the disk at the backup instant: %v %s", im.name, im.id, err, out)
	}
}

// depth0 is the extents a qcow2 file allocates (data or zero clusters).
func depth0(t *testing.T, f string) [][2]int64 {
	t.Helper()
	out, err := exec.Command("qemu-img", "map", "--output=json", "-f", "qcow2", f).Output()
	if err != nil {
		t.Fatal(err)
	}
	var ext []struct {
		Start, Length, Depth int64
		Present              bool
	}
	if err := json.Unmarshal(out, &ext); err != nil {
		t.Fatal(err)
	}
	var r [][2]int64
	for _, x := range ext {
		if x.Depth == 0 && x.Present {
			if n := len(r); n > 0 && r[n-1][1] == x.Start {
				r[n-1][1] += x.Length
				continue
			}
			r = append(r, [2]int64{x.Start, x.Start + x.Length})
		}
	}
	return r
}

func wantOnly(t *testing.T, f string, want ...[2]int64) {
	t.Helper()
	if got := depth0(t, f); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s holds %v, want only the changed clusters %v", filepath.Base(f), got, want)
	}
}

func (e *liveEnv) progressLines() []string {
	b, err := os.ReadFile(e.prog)
	if err != nil {
		e.t.Fatal(err)
	}
	return strings.Fields(string(b))
}

const lbArgsAuto = "zsbitmap0,auto,drive-virtio-disk0,0:zsbitmap1,auto,drive-virtio-disk1,0"

func TestLiveBackupIntoDirectoryAndStore(t *testing.T) {
	t.Parallel()
	e := newLiveEnv(t)
	vm := e.vm
	up := e.s.post(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1}, nil)["uploadDir"].(string)

	vm.Write(1, 8*lbMiB, 2*lbMiB, 0x21)
	full := e.batbak(up, "zsbitmap0,full,drive-virtio-disk0,0:zsbitmap1,auto,drive-virtio-disk1,0")
	ref := []string{vm.Snapshot(0, "f0"), vm.Snapshot(1, "f1")}
	if full["drive-virtio-disk0"].Mode != "full" || full["drive-virtio-disk1"].Mode != "full" || len(full) != 2 {
		t.Fatalf("full: %+v", full)
	}
	if p := e.progressLines(); p[0] != "0" || p[len(p)-1] != "100" {
		t.Fatalf("progress %v", p)
	}
	var chain [2]imported
	for i, n := range []string{"drive-virtio-disk0", "drive-virtio-disk1"} {
		chain[i] = e.importBackup(filepath.Join(up, full[n].BackupFile), "", "")
		e.restoreEquals(chain[i], ref[i])
	}
	e.zstcliOK("bakconfirm -domain " + lbVM + " -args zsbitmap0,drive-virtio-disk0:zsbitmap1,drive-virtio-disk1")

	// Incremental 1: batbak, one point in time for both disks.
	vm.Write(0, 1*lbMiB, 1*lbMiB, 0x31)
	vm.Zero(0, 4*lbMiB, 1*lbMiB) // over the backing file's data
	vm.Write(1, 40*lbMiB, 512<<10, 0x32)
	up2 := e.s.post(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1}, nil)["uploadDir"].(string)
	inc := e.batbak(up2, lbArgsAuto)
	ref = []string{vm.Snapshot(0, "a0"), vm.Snapshot(1, "a1")}
	if inc["drive-virtio-disk0"].Mode != "incremental" || inc["drive-virtio-disk1"].Mode != "incremental" {
		t.Fatalf("incremental: %+v", inc)
	}
	wantOnly(t, filepath.Join(up2, inc["drive-virtio-disk0"].BackupFile), [2]int64{1 * lbMiB, 2 * lbMiB}, [2]int64{4 * lbMiB, 5 * lbMiB})
	wantOnly(t, filepath.Join(up2, inc["drive-virtio-disk1"].BackupFile), [2]int64{40 * lbMiB, 40*lbMiB + 512<<10})
	for i, n := range []string{"drive-virtio-disk0", "drive-virtio-disk1"} {
		chain[i] = e.importBackup(filepath.Join(up2, inc[n].BackupFile), chain[i].installPath, "")
		e.restoreEquals(chain[i], ref[i])
	}
	e.zstcliOK("bakconfirm -domain " + lbVM + " -args zsbitmap0,drive-virtio-disk0:zsbitmap1,drive-virtio-disk1")

	// Incremental 2: the single-volume verb (Z7), one call per disk.
	vm.Write(0, 30*lbMiB, 64<<10, 0x41)
	vm.Write(1, 41*lbMiB, 1*lbMiB, 0x42)
	up3 := e.s.post(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1}, nil)["uploadDir"].(string)
	want := [][2]int64{{30 * lbMiB, 30*lbMiB + 64<<10}, {41 * lbMiB, 42 * lbMiB}}
	for i := range 2 {
		dest := filepath.Join(up3, fmt.Sprintf("%032x.qcow2", i+1))
		out := e.zstcliOK(fmt.Sprintf(`-progress %s backup -bitmap zsbitmap%d -dest %s -domain %s -drive "drive-virtio-disk%d" -mode auto -point-in-time -oob -speed 0`, e.prog, i, dest, lbVM, i))
		if out != "incremental\n" {
			t.Fatalf("backup printed %q", out)
		}
		r := vm.Snapshot(i, fmt.Sprintf("b%d", i))
		wantOnly(t, dest, want[i])
		chain[i] = e.importBackup(dest, chain[i].installPath, "")
		e.restoreEquals(chain[i], r)
	}
	// battopbak (Z9) and -mode top copy only the top layer of the disk on a
	// backing file: its three writes, the zeroed range as zero clusters.
	top := [][2]int64{{1 * lbMiB, 2 * lbMiB}, {4 * lbMiB, 5 * lbMiB}, {30 * lbMiB, 30*lbMiB + 64<<10}}
	up4 := e.s.post(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1}, nil)["uploadDir"].(string)
	out := e.zstcliOK(fmt.Sprintf("battopbak -domain %s -destdir %s -args drive-virtio-disk0,0", lbVM, up4))
	var tb map[string]map[string]string
	if err := json.Unmarshal([]byte(out), &tb); err != nil || len(tb) != 1 || len(tb["drive-virtio-disk0"]) != 1 {
		t.Fatalf("battopbak stdout %q: %v", out, err)
	}
	r0 := vm.Snapshot(0, "top0")
	tf := filepath.Join(up4, tb["drive-virtio-disk0"]["backupFile"])
	wantOnly(t, tf, top...)
	compareOnBase(t, tf, vm.Disks[0].Base, r0)
	tf = filepath.Join(up4, "top.qcow2")
	if out := e.zstcliOK(fmt.Sprintf("-progress %s backup -bitmap zsbitmap9 -dest %s -domain %s -drive drive-virtio-disk0 -mode top", e.prog, tf, lbVM)); out != "top\n" {
		t.Fatalf("backup -mode top printed %q", out)
	}
	wantOnly(t, tf, top...)
	compareOnBase(t, tf, vm.Disks[0].Base, r0)
	if bms := bitmapNames(t, vm, 0); !strings.Contains(bms, "zsbitmap9.1") {
		t.Fatalf("top mode added no checkpoint: %s", bms)
	}

	// Nothing runs: stopbak succeeds in every form the agent uses.
	for _, l := range []string{"stopbak -domain " + lbVM, "stopbak -force=True -domain " + lbVM + " -batbak", "stopbak -force=None -domain " + lbVM + " -drive drive-virtio-disk0"} {
		e.zstcliOK(l)
	}
}

// nbdTargets asks the store for one NBD target per disk (exportnbdimage).
func (e *liveEnv) nbdTargets() (dest string, paths []string, desc string) {
	e.t.Helper()
	up := e.s.post(e.t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1}, nil)["uploadDir"].(string)
	rep := e.s.post(e.t, "/imagestore/exportnbdimage-sync/", map[string]any{"workspace": up, "sizes": []any{lbDisk, lbDisk}}, nil)
	ps, _ := rep["imagePaths"].([]any)
	ports, _ := rep["ports"].([]any)
	if len(ps) != 2 || len(ports) != 2 || rep["tls"] == true {
		e.t.Fatalf("exportnbdimage: %v", rep)
	}
	for _, p := range ps {
		paths = append(paths, p.(string))
	}
	return fmt.Sprintf("nbd://127.0.0.1:%d,%d", int(ports[0].(float64)), int(ports[1].(float64))), paths, rep["nbdDescription"].(string)
}

func TestLiveBackupIntoStoreNBDTargets(t *testing.T) {
	t.Parallel()
	e := newLiveEnv(t)
	vm := e.vm
	vm.Write(1, 8*lbMiB, 2*lbMiB, 0x21)

	dest, paths, desc := e.nbdTargets()
	full := e.batbak(dest, "zsbitmap0,full,drive-virtio-disk0,0:zsbitmap1,full,drive-virtio-disk1,0")
	ref := []string{vm.Snapshot(0, "f0"), vm.Snapshot(1, "f1")}
	for _, n := range []string{"drive-virtio-disk0", "drive-virtio-disk1"} {
		if full[n].Mode != "full" || full[n].BackupFile != "" {
			t.Fatalf("full over NBD: %+v", full)
		}
	}
	var chain [2]imported
	for i := range 2 {
		chain[i] = e.importBackup(paths[i], "", desc)
		e.restoreEquals(chain[i], ref[i])
	}
	e.zstcliOK("bakconfirm -domain " + lbVM + " -args zsbitmap0,drive-virtio-disk0:zsbitmap1,drive-virtio-disk1")

	for round, w := range []struct{ off0, off1 int64 }{{2 * lbMiB, 50 * lbMiB}, {33 * lbMiB, 9 * lbMiB}} {
		vm.Write(0, w.off0, 1*lbMiB, byte(0x51+round))
		vm.Write(1, w.off1, 256<<10, byte(0x61+round))
		dest, paths, desc := e.nbdTargets()
		inc := e.batbak(dest, lbArgsAuto)
		ref := []string{vm.Snapshot(0, fmt.Sprintf("n%d0", round)), vm.Snapshot(1, fmt.Sprintf("n%d1", round))}
		if inc["drive-virtio-disk0"].Mode != "incremental" || inc["drive-virtio-disk1"].Mode != "incremental" {
			t.Fatalf("round %d: %+v", round, inc)
		}
		for i := range 2 {
			chain[i] = e.importBackup(paths[i], chain[i].installPath, desc)
			e.restoreEquals(chain[i], ref[i])
		}
		// Only the dirty clusters reached the store's targets (read once
		// the import has stopped their servers).
		wantOnly(t, paths[0], [2]int64{w.off0, w.off0 + lbMiB})
		wantOnly(t, paths[1], [2]int64{w.off1, w.off1 + 256<<10})
		e.zstcliOK("bakconfirm -domain " + lbVM + " -args zsbitmap0,drive-virtio-disk0:zsbitmap1,drive-virtio-disk1")
	}
}

// bitmapNames lists disk i's named bitmaps as "name:count" (recording
// ones only; the engine's checkpoints always record).
func bitmapNames(t *testing.T, vm *vmtest.VM, i int) string {
	t.Helper()
	var s []string
	for _, b := range vm.Bitmaps(i) {
		if !b.Recording || !b.Persistent {
			t.Fatalf("disk %d bitmap %+v: a checkpoint that does not record or is not persistent", i, b)
		}
		s = append(s, b.Name)
	}
	return strings.Join(s, ",")
}

// jobRunning waits until a backup job of ours runs in QEMU.
func jobRunning(t *testing.T, m qmp.Monitor) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		var jobs []struct{ ID, Status string }
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := m.Execute(ctx, "query-jobs", nil, &jobs)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		for _, j := range jobs {
			if strings.HasPrefix(j.ID, "zsbak-") && j.Status == "running" {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("no backup job started")
}

func TestLiveBackupFaults(t *testing.T) {
	t.Parallel()
	e := newLiveEnv(t)
	vm := e.vm
	confirm := "bakconfirm -domain " + lbVM + " -args zsbitmap0,drive-virtio-disk0:zsbitmap1,drive-virtio-disk1"
	newDir := func() string {
		return e.s.post(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1}, nil)["uploadDir"].(string)
	}
	vm.Write(1, 0, 24*lbMiB, 0x21)
	up := newDir()
	full := e.batbak(up, "zsbitmap0,full,drive-virtio-disk0,0:zsbitmap1,full,drive-virtio-disk1,0")
	var chain [2]imported
	for i, n := range []string{"drive-virtio-disk0", "drive-virtio-disk1"} {
		chain[i] = e.importBackup(filepath.Join(up, full[n].BackupFile), "", "")
	}
	e.zstcliOK(confirm)
	// next runs an auto batbak into a fresh dir, imports it on the chain
	// and checks the restore; want are the extents of each increment.
	next := func(tag string, wantMode [2]string, want [2][][2]int64) {
		t.Helper()
		up := newDir()
		out, errs, err := e.zstcli(fmt.Sprintf("batbak -domain %s -destdir %s -args %s", lbVM, up, lbArgsAuto))
		if err != nil {
			t.Fatalf("%s: %v %s", tag, err, errs)
		}
		var r batOut
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatal(err)
		}
		for i, n := range []string{"drive-virtio-disk0", "drive-virtio-disk1"} {
			ref := vm.Snapshot(i, tag+n)
			if r[n].Mode != wantMode[i] {
				t.Fatalf("%s: %s ran %q, want %q (stderr %s)", tag, n, r[n].Mode, wantMode[i], errs)
			}
			f := filepath.Join(up, r[n].BackupFile)
			if want[i] != nil {
				wantOnly(t, f, want[i]...)
			}
			parent := chain[i].installPath
			if r[n].Mode == "full" {
				parent = ""
			}
			chain[i] = e.importBackup(f, parent, "")
			e.restoreEquals(chain[i], ref)
		}
		e.zstcliOK(confirm)
	}

	// 1. stopbak cancels a running batbak: it fails, leaves no file, and
	// the bitmaps are as before (still recording the writes).
	vm.Write(0, 2*lbMiB, 1*lbMiB, 0x31)
	vm.Write(1, 0, 16*lbMiB, 0x32)
	up = newDir()
	bat := exec.Command("sh", "-c", e.zst+fmt.Sprintf(" batbak -domain %s -destdir %s -args zsbitmap0,auto,drive-virtio-disk0,0:zsbitmap1,auto,drive-virtio-disk1,2097152", lbVM, up))
	bat.Env = e.env
	var batErr strings.Builder
	bat.Stderr = &batErr
	if err := bat.Start(); err != nil {
		t.Fatal(err)
	}
	jobRunning(t, vm.Monitor())
	// A second backup of the VM is refused while one runs; a stopbak for
	// a drive the running one does not back up stops nothing.
	if _, errs, err := e.zstcli(fmt.Sprintf("batbak -domain %s -destdir %s -args %s", lbVM, newDir(), lbArgsAuto)); err == nil || !strings.Contains(errs, "another backup of this VM is running") {
		t.Fatalf("a second batbak: %v %q", err, errs)
	}
	e.zstcliOK("stopbak -force=False -domain " + lbVM + " -drive drive-virtio-disk7")
	jobRunning(t, vm.Monitor())
	e.zstcliOK("stopbak -force=True -domain " + lbVM + " -batbak")
	if err := bat.Wait(); err == nil || !strings.Contains(batErr.String(), "stopped") {
		t.Fatalf("a stopped batbak: %v, stderr %q", err, batErr.String())
	}
	if ents, _ := os.ReadDir(up); len(ents) != 0 {
		t.Fatalf("stopped batbak left %v", ents)
	}
	if a, b := bitmapNames(t, vm, 0), bitmapNames(t, vm, 1); a != "zsbitmap0.1" || b != "zsbitmap1.1" {
		t.Fatalf("after stopbak: %s / %s", a, b)
	}
	next("afterstop", [2]string{"incremental", "incremental"}, [2][][2]int64{{{2 * lbMiB, 3 * lbMiB}}, {{0, 16 * lbMiB}}})

	// 2. The store's NBD server goes away mid-job: batbak fails, nothing
	// is lost.
	vm.Write(0, 6*lbMiB, 1*lbMiB, 0x41)
	vm.Write(1, 0, 16*lbMiB, 0x42)
	dest, _, desc := e.nbdTargets()
	bat = exec.Command("sh", "-c", e.zst+fmt.Sprintf(" batbak -domain %s -destdir %s -args zsbitmap0,auto,drive-virtio-disk0,0:zsbitmap1,auto,drive-virtio-disk1,2097152", lbVM, dest))
	bat.Env = e.env
	batErr.Reset()
	bat.Stderr = &batErr
	if err := bat.Start(); err != nil {
		t.Fatal(err)
	}
	jobRunning(t, vm.Monitor())
	e.s.post(t, "/imagestore/exportnbdimage/cancel-sync/", map[string]any{"nbdDescription": desc}, nil)
	if err := bat.Wait(); err == nil || batErr.Len() == 0 {
		t.Fatalf("batbak with its NBD server gone: %v, stderr %q", err, batErr.String())
	}
	if a, b := bitmapNames(t, vm, 0), bitmapNames(t, vm, 1); a != "zsbitmap0.2" || b != "zsbitmap1.2" {
		t.Fatalf("after the store died: %s / %s", a, b)
	}
	next("afterdeath", [2]string{"incremental", "incremental"}, [2][][2]int64{{{6 * lbMiB, 7 * lbMiB}}, {{0, 16 * lbMiB}}})

	// 3. A failed import (no confirmation follows): the next incremental
	// also carries the previous one's clusters, so it completes the chain
	// on the last good backup.
	vm.Write(0, 10*lbMiB, 64<<10, 0x51)
	up = newDir()
	e.zstcliOK(fmt.Sprintf("batbak -domain %s -destdir %s -args %s", lbVM, up, lbArgsAuto)) // never imported
	vm.Write(0, 12*lbMiB, 64<<10, 0x52)
	next("afterfailedimport", [2]string{"incremental", "incremental"}, [2][][2]int64{{{10 * lbMiB, 10*lbMiB + 64<<10}, {12 * lbMiB, 12*lbMiB + 64<<10}}, nil})

	// 4. QEMU killed: persisted checkpoints come back inconsistent, auto
	// runs full and says why.
	vm.Quit()
	vm.Restart() // a clean restart keeps the checkpoints
	vm.Write(0, 20*lbMiB, 64<<10, 0x61)
	next("afterrestart", [2]string{"incremental", "incremental"}, [2][][2]int64{{{20 * lbMiB, 20*lbMiB + 64<<10}}, nil})
	vm.Quit()
	vm.Restart()
	vm.Write(1, 30*lbMiB, 64<<10, 0x71)
	vm.Flush(1)
	vm.Kill()
	vm.Restart()
	for i := range 2 {
		for _, b := range vm.Bitmaps(i) {
			if !b.Inconsistent {
				t.Fatalf("disk %d after SIGKILL: %+v", i, b)
			}
		}
	}
	dest = filepath.Join(newDir(), "x.qcow2")
	out, errs, err := e.zstcli(fmt.Sprintf("backup -bitmap zsbitmap1 -dest %s -domain %s -drive drive-virtio-disk1 -mode auto", dest, lbVM))
	if err != nil || out != "full\n" || !strings.Contains(errs, "inconsistent") {
		t.Fatalf("auto after SIGKILL: %v %q %q", err, out, errs)
	}
	chain[1] = e.importBackup(dest, "", "")
	e.restoreEquals(chain[1], vm.Snapshot(1, "killfull"))
	e.zstcliOK("bakconfirm -domain " + lbVM + " -args zsbitmap1,drive-virtio-disk1")
	if b := bitmapNames(t, vm, 1); b != "zsbitmap1.1" {
		t.Fatalf("after the full: %s", b)
	}
	next("afterkill", [2]string{"full", "incremental"}, [2][][2]int64{nil, {}})
}

// compareOnBase checks that top, read over base, equals ref.
func compareOnBase(t *testing.T, top, base, ref string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", base, "-F", "qcow2", top).CombinedOutput(); err != nil {
		t.Fatalf("rebase: %v %s", err, out)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, ref).CombinedOutput(); err != nil {
		t.Fatalf("%s over its base differs from the disk: %v %s", top, err, out)
	}
}

// TestLiveBackupQMPQEMUNotRoot: QEMU reached through its own QMP socket
// runs as libvirt-qemu (-runas: it drops to that user after opening its
// disks and sockets); the target file the CLI (root) creates is given to
// that user, so QEMU can open it, and the full equals the disk.
func TestLiveBackupQMPQEMUNotRoot(t *testing.T) {
	t.Parallel()
	u, err := user.Lookup("libvirt-qemu")
	if err != nil {
		t.Fatalf("the libvirt-qemu user (package libvirt-daemon-system): %v", err)
	}
	qdir, err := os.MkdirTemp("", "lbnr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(qdir) })
	if err := os.Chmod(qdir, 0o755); err != nil { // QEMU's user reaches the target dir below
		t.Fatal(err)
	}
	vm := vmtest.StartAs(t, u.Username, lbVM, qdir,
		vmtest.DiskSpec{Node: "libvirt-1-format", Device: "virtio-disk0", Size: lbDisk})
	vm.Write(0, 4*lbMiB, 2*lbMiB, 0x61)
	dest := filepath.Join(qdir, "dest")
	if err := os.Mkdir(dest, 0o755); err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(zstcliBin, "-rootca", ca, "batbak", "-domain", lbVM, "-destdir", dest, "-args", "zsbitmap0,full,drive-virtio-disk0,0")
	cmd.Env = append(os.Environ(), "IMAGESTORE_QMP_DIR="+qdir)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("batbak: %v\nstderr: %s", err, errb.String())
	}
	var r batOut
	if err := json.Unmarshal([]byte(out.String()), &r); err != nil || r["drive-virtio-disk0"].Mode != "full" {
		t.Fatalf("batbak stdout %q: %v", out.String(), err)
	}
	f := filepath.Join(dest, r["drive-virtio-disk0"].BackupFile)
	st, err := os.Stat(f)
	if err != nil {
		t.Fatal(err)
	}
	if sys := st.Sys().(*syscall.Stat_t); strconv.Itoa(int(sys.Uid)) != u.Uid || strconv.Itoa(int(sys.Gid)) != u.Gid {
		t.Fatalf("%s is owned by %d:%d, want QEMU's %s:%s", f, sys.Uid, sys.Gid, u.Uid, u.Gid)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", f, vm.Snapshot(0, "full")).CombinedOutput(); err != nil {
		t.Fatalf("the full differs from the disk: %v %s", err, out)
	}
}

// Package vmtest runs a real QEMU (TCG, no guest OS) for tests: disks as
// qcow2 files, guest-visible writes through HMP qemu-io, and a raw shadow
// per disk on which every write is replayed, so a test can snapshot what a
// backup taken at an instant must contain. Tests only.
package vmtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"imagestore/internal/lockedbuf"
	"imagestore/qcow2/qemutest"
	"imagestore/transfer/qmp"
)

// DiskSpec describes one disk. With BaseData > 0 the disk is an overlay
// on a base image holding BaseData bytes of pattern 0x11 (a backing file).
type DiskSpec struct {
	Node     string // format node name, e.g. libvirt-1-format
	Device   string // guest device id (alias), e.g. virtio-disk0
	Size     int64
	BaseData int64
}

// Disk is a running disk and its shadow.
type Disk struct {
	DiskSpec
	File   string // the qcow2 the VM runs on
	Base   string // its backing file, if any
	Shadow string // raw replay of every write
}

// VM is one running QEMU.
type VM struct {
	Name   string
	Dir    string // disks, shadows, logs, the harness socket
	QMPDir string // holds <Name>.qmp, the socket the engine uses
	Disks  []*Disk

	t     testing.TB
	runAs string // QEMU's -runas user ("" = as the test)
	cmd   *exec.Cmd
	done  chan struct{}
	mon   *qmp.Client
	Log   lockedbuf.Buffer
}

// Start creates the disks and starts QEMU; it stops when the test ends.
func Start(t testing.TB, name, qmpDir string, disks ...DiskSpec) *VM {
	t.Helper()
	return StartAs(t, "", name, qmpDir, disks...)
}

// StartAs is Start with QEMU dropping to user (-runas) once it has opened
// its disks and sockets; "" runs it as the test.
func StartAs(t testing.TB, user, name, qmpDir string, disks ...DiskSpec) *VM {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatalf("qemu-system-x86_64 is required (apt-get install qemu-system-x86): %v", err)
	}
	dir := t.TempDir()
	v := &VM{Name: name, Dir: dir, QMPDir: qmpDir, t: t, runAs: user}
	for i, s := range disks {
		d := &Disk{DiskSpec: s, File: filepath.Join(dir, fmt.Sprintf("disk%d.qcow2", i)),
			Shadow: filepath.Join(dir, fmt.Sprintf("shadow%d.raw", i))}
		if s.BaseData > 0 {
			d.Base = filepath.Join(dir, fmt.Sprintf("base%d.qcow2", i))
			qemutest.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", d.Base, strconv.FormatInt(s.Size, 10))
			qemutest.Run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x11 0 %d", s.BaseData), d.Base)
			qemutest.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", d.Base, "-F", "qcow2", d.File, strconv.FormatInt(s.Size, 10))
			qemutest.Run(t, "qemu-img", "convert", "-O", "raw", d.Base, d.Shadow)
		} else {
			qemutest.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", d.File, strconv.FormatInt(s.Size, 10))
			qemutest.Run(t, "qemu-img", "create", "-q", "-f", "raw", d.Shadow, strconv.FormatInt(s.Size, 10))
		}
		v.Disks = append(v.Disks, d)
	}
	v.start()
	t.Cleanup(v.stop)
	return v
}

func (v *VM) harnessSock() string { return filepath.Join(v.Dir, "h.qmp") }

// QMPPath is the engine's socket.
func (v *VM) QMPPath() string { return filepath.Join(v.QMPDir, v.Name+".qmp") }

func (v *VM) start() {
	t := v.t
	t.Helper()
	args := []string{"-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-S", "-m", "64",
		"-qmp", "unix:" + v.QMPPath() + ",server=on,wait=off",
		"-qmp", "unix:" + v.harnessSock() + ",server=on,wait=off"}
	for i, d := range v.Disks {
		args = append(args,
			"-blockdev", fmt.Sprintf("driver=file,filename=%s,node-name=file%d", d.File, i),
			"-blockdev", fmt.Sprintf("driver=qcow2,file=file%d,node-name=%s", i, d.Node),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,id=%s", d.Node, d.Device))
	}
	if v.runAs != "" {
		args = append(args, "-runas", v.runAs)
	}
	_ = os.Remove(v.QMPPath())
	_ = os.Remove(v.harnessSock())
	cmd := exec.Command("qemu-system-x86_64", args...)
	cmd.Stdout, cmd.Stderr = &v.Log, &v.Log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	v.cmd, v.done = cmd, make(chan struct{})
	go func(done chan struct{}) { _ = cmd.Wait(); close(done) }(v.done)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		mon, err := qmp.Dial(ctx, v.harnessSock(), qmp.Options{})
		cancel()
		if err == nil {
			v.mon = mon
			break
		}
		select {
		case <-v.done:
			t.Fatalf("qemu exited: %s", v.Log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu did not open its monitor: %v\n%s", err, v.Log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, p := range []string{v.QMPPath()} {
		for i := 0; ; i++ {
			if _, err := os.Stat(p); err == nil {
				break
			}
			if i > 200 {
				t.Fatalf("no socket %s", p)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func (v *VM) stop() {
	if v.cmd == nil {
		return
	}
	if v.mon != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = v.mon.Execute(ctx, "quit", nil, nil)
		cancel()
		v.mon.Close()
		v.mon = nil
	}
	select {
	case <-v.done:
	case <-time.After(15 * time.Second):
		_ = v.cmd.Process.Kill()
		<-v.done
	}
	v.cmd = nil
}

// Quit stops QEMU cleanly (persistent bitmaps reach the files).
func (v *VM) Quit() { v.stop() }

// Kill stops QEMU with SIGKILL (persistent bitmaps turn inconsistent).
func (v *VM) Kill() {
	v.t.Helper()
	if v.mon != nil {
		v.mon.Close()
		v.mon = nil
	}
	_ = v.cmd.Process.Signal(syscall.SIGKILL)
	<-v.done
	v.cmd = nil
}

// Restart starts QEMU again on the same disks.
func (v *VM) Restart() { v.start() }

// Monitor is the harness's own QMP connection (the engine uses QMPPath).
func (v *VM) Monitor() qmp.Monitor { return v.mon }

func (v *VM) hmp(cmdline string) {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := qmp.HMP(ctx, v.mon, cmdline)
	if err != nil || strings.TrimSpace(out) != "" {
		v.t.Fatalf("HMP %q: %v %q", cmdline, err, out)
	}
}

// Write writes length bytes of pattern at off as the guest would, and
// replays it on the shadow.
func (v *VM) Write(disk int, off, length int64, pattern byte) {
	v.t.Helper()
	v.io(disk, fmt.Sprintf("write -P 0x%02x %d %d", pattern, off, length))
}

// Zero writes zeros as the guest would.
func (v *VM) Zero(disk int, off, length int64) {
	v.t.Helper()
	v.io(disk, fmt.Sprintf("write -z %d %d", off, length))
}

// AIOWrite starts a write that does not wait for a running backup job's
// copy-before-write; AIOFlush waits for it.
func (v *VM) AIOWrite(disk int, off, length int64, pattern byte) {
	v.t.Helper()
	d := v.Disks[disk]
	v.hmp(fmt.Sprintf("qemu-io -d %s/virtio-backend \"aio_write -P 0x%02x %d %d\"", d.Device, pattern, off, length))
	qemutest.Run(v.t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x%02x %d %d", pattern, off, length), d.Shadow)
}

// AIOFlush waits for the disk's outstanding aio writes.
func (v *VM) AIOFlush(disk int) {
	v.t.Helper()
	v.hmp(fmt.Sprintf("qemu-io -d %s/virtio-backend \"aio_flush\"", v.Disks[disk].Device))
}

func (v *VM) io(disk int, cmd string) {
	v.t.Helper()
	d := v.Disks[disk]
	v.hmp(fmt.Sprintf("qemu-io -d %s/virtio-backend %q", d.Device, cmd))
	qemutest.Run(v.t, "qemu-io", "-f", "raw", "-c", cmd, d.Shadow)
}

// Flush makes the disk's writes durable (as a guest's flush would), so
// they survive a SIGKILL.
func (v *VM) Flush(disk int) {
	v.t.Helper()
	v.hmp(fmt.Sprintf("qemu-io -d %s/virtio-backend \"flush\"", v.Disks[disk].Device))
}

// Snapshot copies disk's shadow now: the reference for a backup taken at
// this instant.
func (v *VM) Snapshot(disk int, name string) string {
	v.t.Helper()
	p := filepath.Join(v.Dir, name+".raw")
	qemutest.Run(v.t, "cp", "--sparse=always", v.Disks[disk].Shadow, p)
	return p
}

// Bitmap is one dirty bitmap as query-named-block-nodes reports it.
type Bitmap struct {
	Name         string `json:"name"`
	Count        int64  `json:"count"`
	Recording    bool   `json:"recording"`
	Busy         bool   `json:"busy"`
	Persistent   bool   `json:"persistent"`
	Inconsistent bool   `json:"inconsistent"`
}

// Bitmaps lists the named bitmaps of disk's format node.
func (v *VM) Bitmaps(disk int) []Bitmap {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var nodes []struct {
		NodeName string   `json:"node-name"`
		Bitmaps  []Bitmap `json:"dirty-bitmaps"`
	}
	if err := v.mon.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		v.t.Fatal(err)
	}
	var out []Bitmap
	for _, n := range nodes {
		if n.NodeName == v.Disks[disk].Node {
			for _, b := range n.Bitmaps {
				if b.Name != "" {
					out = append(out, b)
				}
			}
		}
	}
	return out
}

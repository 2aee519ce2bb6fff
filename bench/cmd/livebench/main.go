// Command livebench measures live backups for bench/livebackup.sh: a
// running VM (QEMU under TCG, no guest OS) with one disk of -size MiB
// holding -data MiB, backed up full and then after -change percent of the
// data was rewritten, both through the imagestore CLI (batbak into a
// directory), next to qemu-img convert of the same disk. Prints a table.
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"imagestore/transfer/qmp"
)

const mib = 1 << 20

func main() {
	cli := flag.String("cli", "bin/imagestore", "the imagestore CLI")
	dir := flag.String("dir", "", "work directory (empty: a temp dir)")
	sizeMB := flag.Int64("size", 4096, "disk size in MiB")
	dataMB := flag.Int64("data", 2048, "MiB of data on the disk (1 MiB pieces, every other MiB)")
	change := flag.Float64("change", 1, "percent of the data rewritten before the incremental")
	flag.Parse()
	if err := run(*cli, *dir, *sizeMB, *dataMB, *change); err != nil {
		fmt.Fprintln(os.Stderr, "livebench:", err)
		os.Exit(1)
	}
}

func sh(name string, args ...string) error {
	_, err := shCPU(name, args...)
	return err
}

// shCPU runs a command and returns its CPU time.
func shCPU(name string, args ...string) (time.Duration, error) {
	c := exec.Command(name, args...)
	out, err := c.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return childCPU(c), nil
}

// allocated is the bytes a file occupies on disk.
func allocated(path string) int64 {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// timed times f after an untimed sync: no step (convert, full,
// incremental) is written without flushes, so each leaves its bytes
// dirty in the page cache, and without the sync the next step's first
// fsync (the CLI's state file) waited on the previous step's write-back
// (an incremental took 0.04 s after a sync and 0.35-0.48 s without).
// Backups run hours apart, each timed on its own work.
func timed(f func() error) (time.Duration, error) {
	syscall.Sync()
	t0 := time.Now()
	err := f()
	return time.Since(t0), err
}

// procCPU is the user+system CPU time pid has used so far (from
// /proc/<pid>/stat, in clock ticks of 1/100 s).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	var u, k int64
	fmt.Sscan(f[11], &u)
	fmt.Sscan(f[12], &k)
	return time.Duration(u+k) * 10 * time.Millisecond
}

// childCPU is the user+system CPU time of a finished command.
func childCPU(c *exec.Cmd) time.Duration {
	if c.ProcessState == nil {
		return 0
	}
	return c.ProcessState.UserTime() + c.ProcessState.SystemTime()
}

func run(cli, dir string, sizeMB, dataMB int64, change float64) error {
	if dir == "" {
		d, err := os.MkdirTemp("", "livebench")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	if dataMB*2 > sizeMB {
		return fmt.Errorf("-data %d MiB does not fit every other MiB of -size %d MiB", dataMB, sizeMB)
	}
	// The disk: dataMB MiB of random bytes in 1 MiB pieces, every other MiB.
	raw := filepath.Join(dir, "src.raw")
	f, err := os.Create(raw)
	if err != nil {
		return err
	}
	if err := f.Truncate(sizeMB * mib); err != nil {
		return err
	}
	rng := rand.NewChaCha8([32]byte{1})
	buf := make([]byte, mib)
	for i := int64(0); i < dataMB; i++ {
		_, _ = rng.Read(buf)
		if _, err := f.WriteAt(buf, 2*i*mib); err != nil {
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	disk := filepath.Join(dir, "disk.qcow2")
	if err := sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk); err != nil {
		return err
	}
	_ = os.Remove(raw)
	// The copy limit: qemu-img convert of the same disk.
	conv := filepath.Join(dir, "convert.qcow2")
	var cpuConv time.Duration
	tConv, err := timed(func() (err error) {
		cpuConv, err = shCPU("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", disk, conv)
		return err
	})
	if err != nil {
		return err
	}
	convBytes := allocated(conv)
	_ = os.Remove(conv)

	qdir := filepath.Join(dir, "qmp")
	if err := os.Mkdir(qdir, 0o755); err != nil {
		return err
	}
	own := filepath.Join(dir, "bench.qmp")
	q := exec.Command("qemu-system-x86_64", "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-S", "-m", "64",
		"-qmp", "unix:"+filepath.Join(qdir, "vm.qmp")+",server=on,wait=off",
		"-qmp", "unix:"+own+",server=on,wait=off",
		"-blockdev", "driver=file,filename="+disk+",node-name=file0",
		"-blockdev", "driver=qcow2,file=file0,node-name=disk0",
		"-device", "virtio-blk-pci,drive=disk0,id=vd0")
	qlog, err := os.Create(filepath.Join(dir, "qemu.log")) // qemu-io prints there
	if err != nil {
		return err
	}
	defer qlog.Close()
	q.Stdout, q.Stderr = qlog, qlog
	if err := q.Start(); err != nil {
		return err
	}
	defer func() { _ = q.Process.Kill(); _ = q.Wait() }()
	ctx := context.Background()
	var mon *qmp.Client
	for i := 0; ; i++ {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		mon, err = qmp.Dial(dctx, own, qmp.Options{})
		cancel()
		if err == nil {
			break
		}
		if i > 200 {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer mon.Close()

	// cpu is the CPU time of QEMU and of the CLI during the last batbak.
	var cpu struct{ qemu, cli time.Duration }
	batbak := func(dest, mode string) error {
		if err := os.MkdirAll(dest, 0o755); err != nil {
			return err
		}
		q0 := procCPU(q.Process.Pid)
		cmd := exec.Command(cli, "batbak", "-qmp-dir", qdir, "-domain", "vm", "-destdir", dest, "-args", "bm,"+mode+",disk0,0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("batbak: %w: %s", err, out)
		}
		cpu.qemu, cpu.cli = procCPU(q.Process.Pid)-q0, childCPU(cmd)
		return nil
	}
	fullDir, incDir := filepath.Join(dir, "full"), filepath.Join(dir, "inc")
	q0 := procCPU(q.Process.Pid)
	time.Sleep(2 * time.Second)
	idle := (procCPU(q.Process.Pid) - q0) / 2 // QEMU's own CPU per second while idle
	tFull, err := timed(func() error { return batbak(fullDir, "full") })
	if err != nil {
		return err
	}
	fullBytes := dirBytes(fullDir)
	cpuFull := cpu
	if out, err := exec.Command(cli, "bakconfirm", "-qmp-dir", qdir, "-domain", "vm", "-args", "bm,disk0").CombinedOutput(); err != nil {
		return fmt.Errorf("bakconfirm: %w: %s", err, out)
	}
	// Rewrite change % of the data: 64 KiB pieces spread evenly over it.
	pieces := int64(float64(dataMB*mib) * change / 100 / (64 << 10))
	step := dataMB * 2 * mib / pieces / (64 << 10) * (64 << 10)
	for i := range pieces {
		cmd := fmt.Sprintf("qemu-io -d vd0/virtio-backend \"write -P 0x%02x %d 64k\"", 0x30+i%64, i*step)
		if _, err := qmp.HMP(ctx, mon, cmd); err != nil {
			return err
		}
	}
	changed := pieces * 64 << 10
	tInc, err := timed(func() error { return batbak(incDir, "auto") })
	if err != nil {
		return err
	}
	incBytes := dirBytes(incDir)
	cpuInc := cpu

	mb := func(b int64, d time.Duration) string { return fmt.Sprintf("%.1f", float64(b)/1e6/d.Seconds()) }
	fmt.Printf("disk %d MiB, %d MiB of data; %d MiB changed (%.3g %%)\n\n", sizeMB, dataMB, changed/mib, change)
	// CPU seconds per GiB moved: QEMU (less its idle rate over the
	// same wall time) plus the CLI; qemu-img convert is one process.
	perGiB := func(c time.Duration, b int64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f", c.Seconds()/(float64(b)/(1<<30)))
	}
	busy := func(c struct{ qemu, cli time.Duration }, wall time.Duration) time.Duration {
		q := c.qemu - time.Duration(float64(idle)*wall.Seconds())
		if q < 0 {
			q = 0
		}
		return q + c.cli
	}
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("load average: %s", load)
	fmt.Printf("QEMU idle: %.3f CPU-s per s (subtracted below)\n\n", idle.Seconds())
	fmt.Printf("%-30s %8s %14s %9s %9s %9s %9s\n", "", "wall s", "bytes", "MB/s", "QEMU cpu", "CLI cpu", "cpu-s/GiB")
	fmt.Printf("%-30s %8.2f %14d %9s %9s %9.2f %9s\n", "qemu-img convert (copy limit)", tConv.Seconds(), convBytes, mb(convBytes, tConv),
		"-", cpuConv.Seconds(), perGiB(cpuConv, convBytes))
	fmt.Printf("%-30s %8.2f %14d %9s %9.2f %9.2f %9s\n", "batbak full", tFull.Seconds(), fullBytes, mb(fullBytes, tFull),
		cpuFull.qemu.Seconds(), cpuFull.cli.Seconds(), perGiB(busy(cpuFull, tFull), fullBytes))
	fmt.Printf("%-30s %8s %14d\n", "changed bytes", "", changed)
	fmt.Printf("%-30s %8.2f %14d %9s %9.2f %9.2f %9s\n", "batbak incremental (auto)", tInc.Seconds(), incBytes, mb(incBytes, tInc),
		cpuInc.qemu.Seconds(), cpuInc.cli.Seconds(), perGiB(busy(cpuInc, tInc), incBytes))
	fmt.Println()
	fmt.Printf("full rate / convert rate:          %.2f  (target >= 0.8)\n",
		(float64(fullBytes)/tFull.Seconds())/(float64(convBytes)/tConv.Seconds()))
	fmt.Printf("full cpu-s/GiB / convert cpu-s/GiB: %.2f\n",
		(busy(cpuFull, tFull).Seconds()/float64(fullBytes))/(cpuConv.Seconds()/float64(convBytes)))
	fmt.Printf("incremental bytes / changed bytes: %.3f (target <= 1.1)\n", float64(incBytes)/float64(changed))
	fmt.Printf("incremental time / full time:      %.3f (target <= 0.05)\n", tInc.Seconds()/tFull.Seconds())
	return nil
}

// dirBytes is the allocated bytes of the files in dir.
func dirBytes(dir string) int64 {
	ents, _ := os.ReadDir(dir)
	var n int64
	for _, e := range ents {
		n += allocated(filepath.Join(dir, e.Name()))
	}
	return n
}

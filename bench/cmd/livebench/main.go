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
	"slices"
	"strconv"
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
	rounds := flag.Int("rounds", 3, "rounds of convert, full and incremental; the ratios are their medians")
	flag.Parse()
	if err := run(*cli, *dir, *sizeMB, *dataMB, *change, *rounds); err != nil {
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

// settleFor is the pause before each timed step: longer than the
// kernel's 2 s delay before it reports free pages to the host.
const settleFor = 3 * time.Second

func run(cli, dir string, sizeMB, dataMB int64, change float64, rounds int) error {
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
	confirm := func() error {
		if out, err := exec.Command(cli, "bakconfirm", "-qmp-dir", qdir, "-domain", "vm", "-args", "bm,disk0").CombinedOutput(); err != nil {
			return fmt.Errorf("bakconfirm: %w: %s", err, out)
		}
		return nil
	}
	q0 := procCPU(q.Process.Pid)
	time.Sleep(2 * time.Second)
	idle := (procCPU(q.Process.Pid) - q0) / 2 // QEMU's own CPU per second while idle
	// busy is QEMU's CPU less its idle rate over the same wall time,
	// plus the CLI's.
	busy := func(wall time.Duration) time.Duration {
		q := cpu.qemu - time.Duration(float64(idle)*wall.Seconds())
		if q < 0 {
			q = 0
		}
		return q + cpu.cli
	}
	load0, _ := os.ReadFile("/proc/loadavg")

	// Each round times, in this order, qemu-img convert into the page
	// cache (its default) and with O_DIRECT (-t none), the full backup
	// and, after change % of the data was rewritten, the incremental.
	// Before each step: sync, then a pause. Both make every step start
	// from the same state: no earlier step's dirty pages to write back,
	// and the memory freed by deleting the earlier step's output handed
	// back to the host by then (on a VM with balloon free-page reporting,
	// a reported page costs a host fault when next used, about 11 us per
	// 4 KiB; without the pause, whichever step came first after a delete
	// wrote into warm memory and ran up to 3x faster).
	settle := func() { syscall.Sync(); time.Sleep(settleFor) }
	type step struct {
		wall, cpu time.Duration
		bytes     int64
	}
	var conv, convDirect, full, inc []step
	copyTo := func(extra ...string) (step, error) {
		out := filepath.Join(dir, "convert.qcow2")
		settle()
		var c time.Duration
		// -U: QEMU holds the disk (paused, so nothing changes meanwhile).
		args := append(append([]string{"convert", "-U", "-f", "qcow2", "-O", "qcow2"}, extra...), disk, out)
		wall, err := timed(func() (err error) { c, err = shCPU("qemu-img", args...); return err })
		st := step{wall, c, allocated(out)}
		_ = os.Remove(out)
		return st, err
	}
	backup := func(dest, mode string) (step, error) {
		settle()
		wall, err := timed(func() error { return batbak(dest, mode) })
		if err != nil {
			return step{}, err
		}
		st := step{wall, busy(wall), dirBytes(dest)}
		if err := confirm(); err != nil {
			return st, err
		}
		return st, os.RemoveAll(dest)
	}
	pieces := int64(float64(dataMB*mib) * change / 100 / (64 << 10))
	step64 := dataMB * 2 * mib / pieces / (64 << 10) * (64 << 10)
	changed := pieces * 64 << 10
	for r := range rounds {
		st, err := copyTo()
		if err != nil {
			return err
		}
		conv = append(conv, st)
		if st, err = copyTo("-t", "none"); err != nil {
			return err
		}
		convDirect = append(convDirect, st)
		if st, err = backup(filepath.Join(dir, "full"), "full"); err != nil {
			return err
		}
		full = append(full, st)
		// Rewrite change % of the data: 64 KiB pieces spread evenly
		// over it, a new pattern each round.
		for i := range pieces {
			cmd := fmt.Sprintf("qemu-io -d vd0/virtio-backend \"write -P 0x%02x %d 64k\"", 0x30+(i+int64(r)*7)%64, i*step64)
			if _, err := qmp.HMP(ctx, mon, cmd); err != nil {
				return err
			}
		}
		if st, err = backup(filepath.Join(dir, "inc"), "auto"); err != nil {
			return err
		}
		inc = append(inc, st)
	}
	load1, _ := os.ReadFile("/proc/loadavg")

	fmt.Printf("disk %d MiB, %d MiB of data; %d MiB changed (%.3g %%); %d rounds\n", sizeMB, dataMB, changed/mib, change, rounds)
	fmt.Printf("load average before: %sload average after:  %s", load0, load1)
	fmt.Printf("QEMU idle: %.3f CPU-s per s (subtracted below)\n\n", idle.Seconds())
	mb := func(b int64, d time.Duration) float64 { return float64(b) / 1e6 / d.Seconds() }
	perGiB := func(c time.Duration, b int64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f", c.Seconds()/(float64(b)/(1<<30)))
	}
	fmt.Printf("%-6s %-34s %8s %14s %9s %9s %9s\n", "round", "", "wall s", "bytes", "MB/s", "cpu s", "cpu-s/GiB")
	row := func(r, name string, st step) {
		fmt.Printf("%-6s %-34s %8.2f %14d %9.1f %9.2f %9s\n", r, name, st.wall.Seconds(), st.bytes, mb(st.bytes, st.wall),
			st.cpu.Seconds(), perGiB(st.cpu, st.bytes))
	}
	var rFull, rInc, rBytes []float64
	for r := range rounds {
		n := strconv.Itoa(r + 1)
		row(n, "qemu-img convert (page cache)", conv[r])
		row(n, "qemu-img convert -t none (O_DIRECT)", convDirect[r])
		row(n, "batbak full (QEMU - idle + CLI)", full[r])
		row(n, "batbak incremental (auto)", inc[r])
		limit := max(mb(conv[r].bytes, conv[r].wall), mb(convDirect[r].bytes, convDirect[r].wall))
		rFull = append(rFull, mb(full[r].bytes, full[r].wall)/limit)
		rInc = append(rInc, inc[r].wall.Seconds()/full[r].wall.Seconds())
		rBytes = append(rBytes, float64(inc[r].bytes)/float64(changed))
	}
	fmt.Printf("%-6s %-34s %8s %14d\n\n", "", "changed bytes", "", changed)
	each := func(v []float64, f string) string {
		var p []string
		for _, x := range v {
			p = append(p, fmt.Sprintf(f, x))
		}
		return strings.Join(p, " / ")
	}
	fmt.Printf("full rate / faster convert's rate:  median %.2f (target >= 0.8); rounds %s\n", median(rFull), each(rFull, "%.2f"))
	fmt.Printf("incremental bytes / changed bytes:  median %.3f (target <= 1.1); rounds %s\n", median(rBytes), each(rBytes, "%.3f"))
	fmt.Printf("incremental time / full time:       median %.3f (target <= 0.05); rounds %s\n", median(rInc), each(rInc, "%.3f"))
	return nil
}

// median of v (v is reordered).
func median(v []float64) float64 {
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
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

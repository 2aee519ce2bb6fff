package livebackup

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imagestore/qcow2/qemutest"
	"imagestore/transfer/livebackup/vmtest"
	"imagestore/transfer/qmp"
)

const (
	mib    = int64(1 << 20)
	diskSz = 64 * mib
)

// twoDisks starts a VM with libvirt-style names: disk 0 is an overlay on
// a base holding 16 MiB, disk 1 has no backing file.
func twoDisks(t *testing.T) *vmtest.VM {
	qdir, err := os.MkdirTemp("", "lb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(qdir) })
	return vmtest.Start(t, "vm", qdir,
		vmtest.DiskSpec{Node: "libvirt-2-format", Device: "virtio-disk0", Size: diskSz, BaseData: 16 * mib},
		vmtest.DiskSpec{Node: "libvirt-1-format", Device: "virtio-disk1", Size: diskSz})
}

func newEngine(t *testing.T, v *vmtest.VM, o Options) (*Engine, *qmp.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mon, err := qmp.Dial(ctx, v.QMPPath(), qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mon.Close() })
	o.Monitor = mon
	e, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return e, mon
}

func drives(dir, tag string, modes ...Mode) []Drive {
	var ds []Drive
	for i, m := range modes {
		ds = append(ds, Drive{Node: []string{"drive-virtio-disk0", "drive-virtio-disk1"}[i], Bitmap: []string{"zsbitmap0", "zsbitmap1"}[i], Mode: m,
			Target: Target{File: filepath.Join(dir, tag+"-"+[]string{"d0", "d1"}[i]+".qcow2")}})
	}
	return ds
}

// compareChain checks that top (with parent, "" for a full) reads exactly
// as ref, the shadow copied at the backup instant.
func compareChain(t *testing.T, top, parent, ref string) {
	t.Helper()
	if parent != "" {
		qemutest.Run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-b", parent, "-F", "qcow2", top)
	}
	out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, ref).CombinedOutput()
	if err != nil {
		t.Fatalf("%s differs from %s: %v %s", top, ref, err, out)
	}
}

// allocated is the data extents qemu-img map shows at depth 0 of f.
func allocated(t *testing.T, f string) [][2]int64 {
	t.Helper()
	out, err := exec.Command("qemu-img", "map", "--output=json", "-f", "qcow2", f).Output()
	if err != nil {
		t.Fatal(err)
	}
	var ext []struct {
		Start, Length, Depth int64
		Present, Zero, Data  bool
	}
	if err := json.Unmarshal(out, &ext); err != nil {
		t.Fatal(err)
	}
	var r [][2]int64
	for _, e := range ext {
		if e.Depth == 0 && e.Present {
			if n := len(r); n > 0 && r[n-1][1] == e.Start {
				r[n-1][1] += e.Length
				continue
			}
			r = append(r, [2]int64{e.Start, e.Start + e.Length})
		}
	}
	return r
}

func wantExtents(t *testing.T, f string, want ...[2]int64) {
	t.Helper()
	got := allocated(t, f)
	if len(got) != len(want) {
		t.Fatalf("%s holds %v, want exactly %v", filepath.Base(f), got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s holds %v, want exactly %v", filepath.Base(f), got, want)
		}
	}
}

func names(cps []Checkpoint) string {
	var s []string
	for _, c := range cps {
		s = append(s, c.Name)
	}
	return strings.Join(s, ",")
}

func TestFullThenIncrementalsTwoDisks(t *testing.T) {
	t.Parallel()
	v := twoDisks(t)
	e, _ := newEngine(t, v, Options{})
	ctx := context.Background()
	out := t.TempDir()

	v.Write(1, 8*mib, 2*mib, 0x21) // data on the backing-less disk before the full
	res, err := e.Backup(ctx, drives(out, "full", Full, Auto))
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Mode != Full || res[1].Mode != Full || res[1].FellBack == "" {
		t.Fatalf("modes %+v", res)
	}
	ref0, ref1 := v.Snapshot(0, "f0"), v.Snapshot(1, "f1")
	compareChain(t, filepath.Join(out, "full-d0.qcow2"), "", ref0)
	compareChain(t, filepath.Join(out, "full-d1.qcow2"), "", ref1)
	for i, bm := range []string{"zsbitmap0", "zsbitmap1"} {
		cps, err := e.Checkpoints(ctx, []string{"drive-virtio-disk0", "drive-virtio-disk1"}[i], bm)
		if err != nil || names(cps) != bm+".1" || !cps[0].Recording || cps[0].Count != 0 {
			t.Fatalf("after the full: %+v %v", cps, err)
		}
	}
	if err := e.Confirm(ctx, "drive-virtio-disk0", "zsbitmap0"); err != nil {
		t.Fatal(err)
	}
	if err := e.Confirm(ctx, "drive-virtio-disk1", "zsbitmap1"); err != nil {
		t.Fatal(err)
	}

	// Writes: data over the backing's range, a zeroed range over backing
	// data, a fresh range on the other disk.
	v.Write(0, 1*mib, 1*mib, 0x31)
	v.Zero(0, 4*mib, 1*mib)
	v.Write(1, 40*mib, 512<<10, 0x32)
	res, err = e.Backup(ctx, drives(out, "inc1", Auto, Auto))
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Mode != Incremental || res[1].Mode != Incremental {
		t.Fatalf("modes %+v", res)
	}
	i10, i11 := v.Snapshot(0, "i10"), v.Snapshot(1, "i11")
	wantExtents(t, filepath.Join(out, "inc1-d0.qcow2"), [2]int64{1 * mib, 2 * mib}, [2]int64{4 * mib, 5 * mib})
	wantExtents(t, filepath.Join(out, "inc1-d1.qcow2"), [2]int64{40 * mib, 40*mib + 512<<10})
	compareChain(t, filepath.Join(out, "inc1-d0.qcow2"), filepath.Join(out, "full-d0.qcow2"), i10)
	compareChain(t, filepath.Join(out, "inc1-d1.qcow2"), filepath.Join(out, "full-d1.qcow2"), i11)

	// Not confirmed yet: both checkpoints stay.
	if cps, _ := e.Checkpoints(ctx, "drive-virtio-disk0", "zsbitmap0"); names(cps) != "zsbitmap0.1,zsbitmap0.2" {
		t.Fatalf("before the confirmation: %+v", cps)
	}
	for _, d := range [][2]string{{"drive-virtio-disk0", "zsbitmap0"}, {"drive-virtio-disk1", "zsbitmap1"}} {
		if err := e.Confirm(ctx, d[0], d[1]); err != nil {
			t.Fatal(err)
		}
	}
	if cps, _ := e.Checkpoints(ctx, "drive-virtio-disk0", "zsbitmap0"); names(cps) != "zsbitmap0.2" {
		t.Fatalf("after the confirmation: %+v", cps)
	}

	v.Write(0, 30*mib, 64<<10, 0x41)
	v.Write(1, 41*mib, 1*mib, 0x42)
	if _, err := e.Backup(ctx, drives(out, "inc2", Auto, Auto)); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, filepath.Join(out, "inc2-d0.qcow2"), [2]int64{30 * mib, 30*mib + 64<<10})
	wantExtents(t, filepath.Join(out, "inc2-d1.qcow2"), [2]int64{41 * mib, 42 * mib})
	compareChain(t, filepath.Join(out, "inc2-d0.qcow2"), filepath.Join(out, "inc1-d0.qcow2"), v.Snapshot(0, "i20"))
	compareChain(t, filepath.Join(out, "inc2-d1.qcow2"), filepath.Join(out, "inc1-d1.qcow2"), v.Snapshot(1, "i21"))

	// Unconfirmed (the import failed): the next incremental also holds the
	// previous one's clusters, so a chain on inc1 is still complete.
	v.Write(0, 50*mib, 64<<10, 0x51)
	if _, err := e.Backup(ctx, drives(out, "inc3", Auto)); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, filepath.Join(out, "inc3-d0.qcow2"), [2]int64{30 * mib, 30*mib + 64<<10}, [2]int64{50 * mib, 50*mib + 64<<10})
	compareChain(t, filepath.Join(out, "inc3-d0.qcow2"), filepath.Join(out, "inc1-d0.qcow2"), v.Snapshot(0, "i30"))

	// A second failed import in a row, then an unconfirmed full (its
	// import may fail too): the base stays inc1's checkpoint, so the next
	// incremental still completes a chain on inc1. Only base and newest
	// checkpoint are kept.
	v.Write(0, 60*mib, 64<<10, 0x61)
	if _, err := e.Backup(ctx, drives(out, "inc4", Auto)); err != nil {
		t.Fatal(err)
	}
	if res, err := e.Backup(ctx, drives(out, "full5", Full)); err != nil || res[0].Mode != Full {
		t.Fatalf("full: %+v %v", res, err)
	}
	if cps, _ := e.Checkpoints(ctx, "drive-virtio-disk0", "zsbitmap0"); names(cps) != "zsbitmap0.2,zsbitmap0.6" {
		t.Fatalf("unconfirmed: %+v", cps)
	}
	v.Write(0, 62*mib, 64<<10, 0x62)
	if _, err := e.Backup(ctx, drives(out, "inc6", Auto)); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, filepath.Join(out, "inc6-d0.qcow2"), [2]int64{30 * mib, 30*mib + 64<<10}, [2]int64{50 * mib, 50*mib + 64<<10},
		[2]int64{60 * mib, 60*mib + 64<<10}, [2]int64{62 * mib, 62*mib + 64<<10})
	i60 := v.Snapshot(0, "i60")
	compareChain(t, filepath.Join(out, "inc6-d0.qcow2"), filepath.Join(out, "inc1-d0.qcow2"), i60)

	// Confirmed: the newest becomes the base, the next incremental holds
	// only what changed since.
	if err := e.Confirm(ctx, "drive-virtio-disk0", "zsbitmap0"); err != nil {
		t.Fatal(err)
	}
	if cps, _ := e.Checkpoints(ctx, "drive-virtio-disk0", "zsbitmap0"); names(cps) != "zsbitmap0.7" {
		t.Fatalf("after the confirmation: %+v", cps)
	}
	v.Write(0, 63*mib, 64<<10, 0x63)
	if _, err := e.Backup(ctx, drives(out, "inc7", Auto)); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, filepath.Join(out, "inc7-d0.qcow2"), [2]int64{63 * mib, 63*mib + 64<<10})
	compareChain(t, filepath.Join(out, "inc7-d0.qcow2"), filepath.Join(out, "inc6-d0.qcow2"), v.Snapshot(0, "i70"))
}

func TestPointInTimeAcrossDisks(t *testing.T) {
	t.Parallel()
	v := twoDisks(t)
	ctx := context.Background()
	out := t.TempDir()
	v.Write(1, 0, 16*mib, 0x61)
	var r0, r1 string
	e, _ := newEngine(t, v, Options{OnStart: func() {
		// The backup instant: the references are what the disks hold now.
		r0, r1 = v.Snapshot(0, "p0"), v.Snapshot(1, "p1")
		v.AIOWrite(1, 15*mib, 64<<10, 0x62) // a range the full has not copied yet
		v.AIOWrite(0, 2*mib, 128<<10, 0x63)
	}})
	ds := drives(out, "full", Full, Full)
	ds[1].Speed = 8 * mib // 16 MiB: about two seconds, so the writes land mid-job
	if _, err := e.Backup(ctx, ds); err != nil {
		t.Fatal(err)
	}
	v.AIOFlush(0)
	v.AIOFlush(1)
	compareChain(t, filepath.Join(out, "full-d0.qcow2"), "", r0)
	compareChain(t, filepath.Join(out, "full-d1.qcow2"), "", r1)
	for i, want := range []int64{128 << 10, 64 << 10} {
		bms := v.Bitmaps(i)
		if len(bms) != 1 || bms[0].Count != want {
			t.Fatalf("disk %d bitmaps %+v, want one counting %d", i, bms, want)
		}
	}
	if _, err := e.Backup(ctx, drives(out, "inc", Auto, Auto)); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, filepath.Join(out, "inc-d0.qcow2"), [2]int64{2 * mib, 2*mib + 128<<10})
	wantExtents(t, filepath.Join(out, "inc-d1.qcow2"), [2]int64{15 * mib, 15*mib + 64<<10})
	compareChain(t, filepath.Join(out, "inc-d1.qcow2"), filepath.Join(out, "full-d1.qcow2"), v.Snapshot(1, "q1"))
}

func TestCancelLeavesBitmapsAsBefore(t *testing.T) {
	t.Parallel()
	v := twoDisks(t)
	out := t.TempDir()
	v.Write(1, 0, 32*mib, 0x71)
	ctx := context.Background()
	var onStart func()
	e, _ := newEngine(t, v, Options{OnStart: func() { onStart() }})

	// A cancelled first full leaves no bitmap and no file.
	cctx, cancel := context.WithCancel(ctx)
	onStart = func() { time.AfterFunc(300*time.Millisecond, cancel) }
	ds := drives(out, "c1", Full, Full)
	ds[1].Speed = 4 * mib
	if _, err := e.Backup(cctx, ds); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled full: %v", err)
	}
	for i := range 2 {
		if bms := v.Bitmaps(i); len(bms) != 0 {
			t.Fatalf("disk %d keeps %+v after a cancelled full", i, bms)
		}
	}
	if ents, _ := os.ReadDir(out); len(ents) != 0 {
		t.Fatalf("partial targets left: %v", ents)
	}

	onStart = func() {}
	if _, err := e.Backup(ctx, drives(out, "full", Full, Full)); err != nil {
		t.Fatal(err)
	}
	for _, d := range [][2]string{{"drive-virtio-disk0", "zsbitmap0"}, {"drive-virtio-disk1", "zsbitmap1"}} {
		if err := e.Confirm(ctx, d[0], d[1]); err != nil {
			t.Fatal(err)
		}
	}
	// A cancelled incremental: the checkpoints are as before and still
	// record; writes made during the job are kept too.
	v.Write(0, 3*mib, 1*mib, 0x72)
	v.Write(1, 0, 16*mib, 0x73)
	cctx, cancel = context.WithCancel(ctx)
	onStart = func() {
		v.AIOWrite(0, 9*mib, 64<<10, 0x74)
		time.AfterFunc(300*time.Millisecond, cancel)
	}
	ds = drives(out, "c2", Auto, Auto)
	ds[1].Speed = 4 * mib
	if _, err := e.Backup(cctx, ds); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled incremental: %v", err)
	}
	v.AIOFlush(0)
	for i, want := range []int64{mib + 64<<10, 16 * mib} {
		bms := v.Bitmaps(i)
		if len(bms) != 1 || !strings.HasSuffix(bms[0].Name, ".1") || !bms[0].Recording || bms[0].Count != want {
			t.Fatalf("disk %d after the cancel: %+v, want .1 recording %d", i, bms, want)
		}
	}
	if _, err := os.Stat(filepath.Join(out, "c2-d0.qcow2")); !os.IsNotExist(err) {
		t.Fatalf("partial target left: %v", err)
	}
	onStart = func() {}
	if _, err := e.Backup(ctx, drives(out, "inc", Auto, Auto)); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, filepath.Join(out, "inc-d0.qcow2"), [2]int64{3 * mib, 4 * mib}, [2]int64{9 * mib, 9*mib + 64<<10})
	compareChain(t, filepath.Join(out, "inc-d0.qcow2"), filepath.Join(out, "full-d0.qcow2"), v.Snapshot(0, "r0"))
	compareChain(t, filepath.Join(out, "inc-d1.qcow2"), filepath.Join(out, "full-d1.qcow2"), v.Snapshot(1, "r1"))
}

// The job's rate over the middle 80 % of its bytes is the speed asked for
// (bytes per second), within ±10 %. Progress is read through the VM's
// second monitor while the engine holds the first.
func TestSpeedLimitHolds(t *testing.T) {
	t.Parallel()
	v := twoDisks(t)
	ctx := context.Background()
	out := t.TempDir()
	var pcts []int // Progress runs on the Backup goroutine
	e, _ := newEngine(t, v, Options{Progress: func(p int) { pcts = append(pcts, p) }})
	if _, err := e.Backup(ctx, drives(out, "full", Full, Full)); err != nil {
		t.Fatal(err)
	}
	v.Write(1, 0, 32*mib, 0x81)
	pcts = nil
	const speed = float64(8 * mib)
	type sample struct {
		at       time.Time
		cur, tot int64
	}
	var samples []sample
	done, stop := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			var jobs []struct {
				ID     string `json:"id"`
				Status string `json:"status"`
				Cur    int64  `json:"current-progress"`
				Tot    int64  `json:"total-progress"`
			}
			if err := v.Monitor().Execute(ctx, "query-jobs", nil, &jobs); err != nil {
				return
			}
			at := time.Now()
			for _, j := range jobs {
				if j.ID == JobPrefix+"libvirt-1-format" {
					samples = append(samples, sample{at, j.Cur, j.Tot})
					if j.Status == "concluded" {
						return
					}
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	ds := drives(out, "inc", Auto, Auto)[1:]
	ds[0].Speed = int64(speed)
	_, err := e.Backup(ctx, ds)
	close(stop)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	// Progress: Σcurrent/Σtotal of the jobs, rising to 100, with steps
	// in between for a four-second job.
	if len(pcts) < 5 || pcts[len(pcts)-1] != 100 {
		t.Fatalf("progress %v", pcts)
	}
	for i := 1; i < len(pcts); i++ {
		if pcts[i] <= pcts[i-1] {
			t.Fatalf("progress does not rise: %v", pcts)
		}
	}
	var lo, hi *sample
	for i := range samples {
		s := &samples[i]
		if s.tot != 32*mib {
			continue
		}
		if lo == nil && s.cur >= s.tot/10 {
			lo = s
		}
		if hi == nil && s.cur >= s.tot*9/10 {
			hi = s
		}
	}
	if lo == nil || hi == nil || hi.at.Sub(lo.at) <= 0 {
		t.Fatalf("too few samples: %d", len(samples))
	}
	rate := float64(hi.cur-lo.cur) / hi.at.Sub(lo.at).Seconds()
	if rate < 0.9*speed || rate > 1.1*speed {
		t.Fatalf("rate over the middle 80%%: %.0f B/s, limit %d B/s", rate, int64(speed))
	}
	t.Logf("rate over the middle 80%%: %.2f MiB/s (limit %.0f MiB/s, %d samples)", rate/float64(mib), speed/float64(mib), len(samples))
}

// logMonitor passes every call to QEMU and records the commands; deaf
// makes it lose every event (WaitEvent only ever times out), as a
// monitor whose events do not arrive.
type logMonitor struct {
	qmp.Monitor
	deaf     bool
	commands []string // Backup runs on the test's goroutine
}

func (l *logMonitor) Execute(ctx context.Context, command string, args, out any) error {
	l.commands = append(l.commands, command)
	return l.Monitor.Execute(ctx, command, args, out)
}

func (l *logMonitor) WaitEvent(ctx context.Context, after uint64, match func(qmp.Event) bool) (qmp.Event, error) {
	if l.deaf {
		<-ctx.Done()
		return qmp.Event{}, ctx.Err()
	}
	return l.Monitor.WaitEvent(ctx, after, match)
}

// A confirmed incremental asks QEMU only what it must: one reading of
// the block nodes for all drives, no query-jobs (the jobs' events give
// their state and outcome) however many events they send, and no query
// after them when there is no checkpoint to prune. A job another client
// cancels fails the call. Without events it still finishes, by polling.
func TestBackupRoundTrips(t *testing.T) {
	t.Parallel()
	v := twoDisks(t)
	// Bounded: a wait that missed its events would otherwise sit out the
	// hour-long poll interval below.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out := t.TempDir()
	_, mon := newEngine(t, v, Options{})
	lm := &logMonitor{Monitor: mon}
	var pcts []int
	// A poll interval no backup here reaches: only events can end the wait.
	e, err := New(Options{Monitor: lm, Poll: time.Hour, Progress: func(p int) { pcts = append(pcts, p) }})
	if err != nil {
		t.Fatal(err)
	}
	ds := drives(out, "full", Full, Full)
	if _, err := e.Backup(ctx, ds); err != nil {
		t.Fatal(err)
	}
	for _, d := range ds {
		if err := e.Confirm(ctx, d.Node, d.Bitmap); err != nil {
			t.Fatal(err)
		}
	}
	v.Write(0, 3*mib, 2*mib, 0x91)
	v.Write(1, 7*mib, 64<<10, 0x92)
	lm.commands, pcts = nil, nil
	res, err := e.Backup(ctx, drives(out, "inc", Auto, Auto))
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Mode != Incremental || res[1].Mode != Incremental {
		t.Fatalf("modes %+v", res)
	}
	// One reading of the nodes for both drives (query-block: the drives
	// are named by their libvirt alias).
	want := "query-named-block-nodes query-block blockdev-add blockdev-add transaction " +
		"job-dismiss blockdev-del block-dirty-bitmap-remove job-dismiss blockdev-del block-dirty-bitmap-remove"
	if got := strings.Join(lm.commands, " "); got != want {
		t.Fatalf("commands:\n got %s\nwant %s", got, want)
	}
	if len(pcts) != 1 || pcts[0] != 100 {
		t.Fatalf("progress %v, want [100]", pcts)
	}
	wantExtents(t, filepath.Join(out, "inc-d0.qcow2"), [2]int64{3 * mib, 5 * mib})
	compareChain(t, filepath.Join(out, "inc-d1.qcow2"), filepath.Join(out, "full-d1.qcow2"), v.Snapshot(1, "i1"))

	// Unconfirmed: the next backup prunes the checkpoint in between,
	// by name, without asking QEMU which there are.
	v.Write(0, 9*mib, 64<<10, 0x93)
	lm.commands = nil
	if _, err := e.Backup(ctx, drives(out, "inc2", Auto)); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(strings.Join(lm.commands, " "), "query-named-block-nodes"); n != 1 {
		t.Fatalf("%d node queries: %v", n, lm.commands)
	}
	if cps, _ := e.Checkpoints(ctx, "drive-virtio-disk0", "zsbitmap0"); names(cps) != "zsbitmap0.1,zsbitmap0.3" {
		t.Fatalf("checkpoints after pruning: %+v", cps)
	}
	wantExtents(t, filepath.Join(out, "inc2-d0.qcow2"), [2]int64{3 * mib, 5 * mib}, [2]int64{9 * mib, 9*mib + 64<<10})

	// A job that runs for a while sends its events (created, running,
	// paused, running, waiting, pending, concluded) over a second or so:
	// still no query-jobs.
	v.Write(1, 30*mib, 4*mib, 0x96)
	lm.commands, pcts = nil, nil
	ds = drives(out, "slow", Auto, Auto)
	ds[1].Speed = 4 * mib
	if _, err := e.Backup(ctx, ds); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(strings.Join(lm.commands, " "), "query-jobs"); n != 0 {
		t.Fatalf("%d job queries for a one-second job: %v", n, lm.commands)
	}
	if len(pcts) != 1 || pcts[0] != 100 {
		t.Fatalf("progress %v, want [100]", pcts)
	}
	compareChain(t, filepath.Join(out, "slow-d1.qcow2"), filepath.Join(out, "inc-d1.qcow2"), v.Snapshot(1, "s1"))

	// Cancelled by another client (its BLOCK_JOB_CANCELLED is the
	// outcome): the call fails and leaves the checkpoints as they were.
	before := v.Bitmaps(1)
	v.Write(1, 40*mib, 4*mib, 0x97)
	ds = drives(out, "gone", Auto, Auto)[1:]
	ds[0].Speed = 1 * mib
	e.o.OnStart = func() {
		if err := v.Monitor().Execute(ctx, "block-job-cancel", map[string]any{"device": JobPrefix + "libvirt-1-format"}, nil); err != nil {
			t.Error(err)
		}
	}
	if _, err := e.Backup(ctx, ds); !errors.Is(err, ErrJobFailed) {
		t.Fatalf("a backup whose job another client cancelled: %v", err)
	}
	e.o.OnStart = nil
	if got, want := bitmapNameSet(v.Bitmaps(1)), bitmapNameSet(before); got != want {
		t.Fatalf("bitmaps before the failed backup %s, after it %s", want, got)
	}
	if _, err := os.Stat(filepath.Join(out, "gone-d1.qcow2")); !os.IsNotExist(err) {
		t.Fatalf("the failed backup's target is left: %v", err)
	}

	// Events lost: polling finds the end.
	lm.deaf = true
	e, err = New(Options{Monitor: lm, Poll: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	v.Write(1, 20*mib, 1*mib, 0x94)
	if _, err := e.Backup(ctx, drives(out, "inc3", Auto, Auto)); err != nil {
		t.Fatal(err)
	}
	compareChain(t, filepath.Join(out, "inc3-d1.qcow2"), filepath.Join(out, "inc-d1.qcow2"), v.Snapshot(1, "i3"))
}

// bitmapNameSet is the sorted names of bms.
func bitmapNameSet(bms []vmtest.Bitmap) string {
	var n []string
	for _, b := range bms {
		n = append(n, b.Name)
	}
	sort.Strings(n)
	return strings.Join(n, ",")
}

// A target on a local block file system (the test's temp dir) is written
// by QEMU with O_DIRECT into space reserved for it, and trimmed to the
// image's end afterwards; one on tmpfs is written through the page cache
// with nothing reserved. Both hold exactly the disk at the instant.
func TestTargetDirectReservedTrimmed(t *testing.T) {
	t.Parallel()
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		t.Fatalf("needs a tmpfs at /dev/shm (%v)", err)
	}
	shm, err := os.MkdirTemp("/dev/shm", "lbtarget")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	v := twoDisks(t)
	ctx := context.Background()
	out := t.TempDir()
	v.Write(0, 4*mib, 8*mib, 0x51)
	v.Write(1, 0, 8*mib, 0x52)

	// During the job: how QEMU opened each target file, and its size.
	type seen struct {
		direct bool
		size   int64
	}
	var during map[string]seen
	var mon qmp.Monitor
	var refs []string
	e, mon0 := newEngine(t, v, Options{OnStart: func() {
		refs = []string{v.Snapshot(0, "r0"), v.Snapshot(1, "r1")}
		var nodes []struct {
			Drv   string `json:"drv"`
			File  string `json:"file"`
			Cache struct {
				Direct bool `json:"direct"`
			} `json:"cache"`
		}
		if err := mon.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
			t.Error(err)
			return
		}
		during = map[string]seen{}
		for _, n := range nodes {
			if n.Drv != "file" {
				continue
			}
			if fi, err := os.Stat(n.File); err == nil {
				during[n.File] = seen{n.Cache.Direct, fi.Size()}
			}
		}
	}})
	mon = mon0
	check := func(ds []Drive, parents ...string) {
		t.Helper()
		for i, d := range ds {
			f := d.Target.File
			s, ok := during[f]
			if !ok {
				t.Fatalf("QEMU had no node for %s during the job: %v", f, during)
			}
			onTmpfs := strings.HasPrefix(f, shm)
			if s.direct == onTmpfs {
				t.Errorf("%s: QEMU's O_DIRECT is %v", f, s.direct)
			}
			fi, err := os.Stat(f)
			if err != nil {
				t.Fatal(err)
			}
			var chk struct {
				End int64 `json:"image-end-offset"`
			}
			qout, _ := exec.Command("qemu-img", "check", "--output=json", "-f", "qcow2", f).Output()
			if err := json.Unmarshal(qout, &chk); err != nil || chk.End == 0 {
				t.Fatalf("qemu-img check %s: %v %s", f, err, qout)
			}
			if fi.Size() != chk.End {
				t.Errorf("%s: %d bytes, its image ends at %d", f, fi.Size(), chk.End)
			}
			// Reserved on ext4: the file was larger than it ended up.
			if reserved := s.size > fi.Size(); reserved == onTmpfs {
				t.Errorf("%s: %d bytes during the job, %d after", f, s.size, fi.Size())
			}
			compareChain(t, f, parents[i], refs[i])
		}
	}
	ds := drives(out, "full", Full, Full)
	ds[1].Target.File = filepath.Join(shm, "full-d1.qcow2")
	if _, err := e.Backup(ctx, ds); err != nil {
		t.Fatal(err)
	}
	check(ds, "", "")
	v.Write(0, 20*mib, 3*mib, 0x53)
	v.Write(1, 30*mib, 3*mib, 0x54)
	inc := drives(out, "inc", Auto, Auto)
	inc[1].Target.File = filepath.Join(shm, "inc-d1.qcow2")
	if _, err := e.Backup(ctx, inc); err != nil {
		t.Fatal(err)
	}
	check(inc, ds[0].Target.File, ds[1].Target.File)
	wantExtents(t, inc[0].Target.File, [2]int64{20 * mib, 23 * mib})
}

// Package livebackup takes live, point-in-time backups of a running VM's
// disks through QEMU: one QMP transaction per call for every listed disk,
// persistent dirty bitmaps as checkpoints, and incrementals that copy only
// the clusters written since the last backup the store confirmed.
//
// Checkpoints. For the caller's bitmap BM the engine keeps persistent
// bitmaps "BM.<seq>", all recording: BM.<k> holds every write since backup
// k began. A backup adds a new one in its transaction; an incremental
// copies from a temporary disabled copy of the base checkpoint, so no job
// ever clears a checkpoint. A failed or cancelled backup removes what its
// transaction added (no half bitmap) and leaves the rest as it was.
//
// The base is the oldest checkpoint: the one of the last backup the store
// confirmed (Confirm), or, before any confirmation, the first. Only
// Confirm moves it (to the newest). Without confirmations (the cloud's
// flow: the host exits before the store imports, and nothing tells it
// later how the import went) every incremental holds all writes since the
// base, so however many imports fail in a row, the next incremental on the
// last good backup is complete; the price is that unconfirmed incrementals
// grow (each repeats the ones before it). A backup keeps only the base and
// the newest checkpoint: one in between can never become the base.
package livebackup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"imagestore/internal/fsutil"
	"imagestore/qcow2"
	"imagestore/transfer/qmp"
)

// Mode is a backup mode of PROTOCOL.md §4.4.
type Mode string

// The modes; Auto resolves to Incremental or Full.
const (
	Full        Mode = "full"
	Top         Mode = "top"
	Auto        Mode = "auto"
	Incremental Mode = "incremental"
	// Shallow is battopbak: the top layer only, no bitmap.
	Shallow Mode = "shallow"
)

// ParseMode reads full, top or auto.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToLower(strings.TrimSpace(s))); m {
	case Full, Top, Auto:
		return m, nil
	case Incremental:
		return Auto, nil
	}
	return "", fmt.Errorf("unknown backup mode %q (full, top or auto)", s)
}

// Target is where one disk's backup goes: a qcow2 file the engine creates
// (File), or an NBD export that a store serves (NBDHost:NBDPort, default
// export name).
type Target struct {
	File    string
	NBDHost string
	NBDPort int
}

func (t Target) String() string {
	if t.File != "" {
		return t.File
	}
	return "nbd://" + t.NBDHost + ":" + strconv.Itoa(t.NBDPort)
}

// Drive is one disk of a call.
type Drive struct {
	Node   string // the caller's NODE (node name, device or drive-<alias>)
	Bitmap string // BM; empty for Shallow
	Mode   Mode
	Speed  int64 // bytes/s, 0 = unlimited
	Target Target
}

// Result is what ran for one drive.
type Result struct {
	Node string
	Mode Mode // Full, Top or Incremental (or Shallow)
	// FellBack says why auto ran full ("" when it did not).
	FellBack string
	Target   Target
}

// Options configure an Engine.
type Options struct {
	Monitor qmp.Monitor
	Logger  *slog.Logger
	// Poll is the job polling interval (default 200ms).
	Poll time.Duration
	// Progress receives Σcurrent/Σtotal of the call's jobs in percent
	// whenever it changes (optional).
	Progress func(percent int)
	// OnStart, if set, runs once the transaction has returned (the point
	// in time of the backup).
	OnStart func()
	// TargetOwner, if set, is the user QEMU runs as: target files the
	// engine creates are given to it (QEMU opens them itself), when it
	// is not the user the engine runs as.
	TargetOwner *Owner
}

// Owner is a user and group id.
type Owner struct{ UID, GID int }

// Engine drives backups over one monitor. Backup calls must not overlap.
type Engine struct {
	o   Options
	log *slog.Logger
}

// New checks o.
func New(o Options) (*Engine, error) {
	if o.Monitor == nil {
		return nil, errors.New("livebackup: Options.Monitor is required")
	}
	if o.Poll <= 0 {
		o.Poll = 200 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Engine{o: o, log: o.Logger}, nil
}

// JobPrefix starts the id of every job the engine runs, so another
// process (stopbak) recognises them in query-jobs.
const JobPrefix = "zsbak-"

// targetPrefix starts the node name of every target the engine adds.
const targetPrefix = "zstgt"

// ErrBusy means a job already uses the drive's bitmap or the drive.
var ErrBusy = errors.New("a backup job already runs on this drive")

// ErrJobFailed wraps a job's own error.
var ErrJobFailed = errors.New("backup job failed")

// plan is one drive resolved against QEMU.
type plan struct {
	Drive
	node     nodeInfo
	mode     Mode
	fellBack string
	base     string   // incremental: checkpoint copied from
	newCP    string   // checkpoint the transaction adds ("" for Shallow)
	tmp      string   // temporary bitmap ("" unless incremental)
	drop     []string // checkpoints between the base and newCP, pruned on success
	tgtNode  string
	jobID    string
	created  bool  // the target file was created by us
	direct   bool  // QEMU writes the target file with O_DIRECT
	reserved bool  // space was reserved past the target's end: trim it after the job
	est      int64 // about the bytes the job writes into a file target
	added    bool  // the target node was added
	startedT bool  // the transaction ran
}

// Backup backs up every drive at one point in time (one transaction) and
// waits for the jobs. On any failure or when ctx ends, every job is
// cancelled, targets are deleted and bitmaps are left as before the call.
func (e *Engine) Backup(ctx context.Context, drives []Drive) ([]Result, error) {
	if len(drives) == 0 {
		return nil, errors.New("livebackup: no drives")
	}
	m := e.o.Monitor
	plans := make([]*plan, len(drives))
	seen := map[string]bool{}
	st, err := readBlockState(ctx, m)
	if err != nil {
		return nil, err
	}
	for i, d := range drives {
		p, err := e.resolve(ctx, st, i, d)
		if err != nil {
			return nil, err
		}
		if seen[p.node.NodeName] {
			return nil, fmt.Errorf("drive %s listed twice", d.Node)
		}
		seen[p.node.NodeName] = true
		plans[i] = p
	}
	ok := false
	defer func() {
		if !ok {
			e.abort(plans)
		}
	}()
	for _, p := range plans {
		if err := e.addTarget(ctx, p); err != nil {
			return nil, err
		}
	}
	var actions []map[string]any
	for _, p := range plans {
		actions = append(actions, p.actions()...)
	}
	after := m.LastSeq()
	if err := m.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil); err != nil {
		return nil, fmt.Errorf("starting the backup: %w", err)
	}
	for _, p := range plans {
		p.startedT = true
	}
	if e.o.OnStart != nil {
		e.o.OnStart()
	}
	if err := e.wait(ctx, plans, after); err != nil {
		return nil, err
	}
	// Success: dismiss the jobs, drop the targets and temporary bitmaps,
	// then prune old checkpoints.
	var res []Result
	for _, p := range plans {
		if err := e.finish(ctx, p); err != nil {
			return nil, err
		}
		res = append(res, Result{Node: p.Node, Mode: p.mode, FellBack: p.fellBack, Target: p.Target})
	}
	ok = true
	// Prune: keep the base and the new checkpoint. The ones in between
	// are known since resolve, so this asks QEMU nothing when there is
	// nothing to prune (the common case: each backup is confirmed). Only
	// a Confirm through another monitor can change them meanwhile, and a
	// checkpoint it removed only fails a removal here (logged).
	for _, p := range plans {
		for _, b := range p.drop {
			if err := removeBitmap(ctx, m, p.node.NodeName, b); err != nil {
				e.log.Warn("pruning old checkpoints", "node", p.node.NodeName, "bitmap", b, "err", err)
				break
			}
		}
	}
	return res, nil
}

func (e *Engine) resolve(ctx context.Context, st *blockState, i int, d Drive) (*plan, error) {
	n, err := st.resolve(ctx, d.Node)
	if err != nil {
		return nil, err
	}
	if d.Target.File == "" && (d.Target.NBDHost == "" || d.Target.NBDPort <= 0) {
		return nil, fmt.Errorf("drive %s: no target", d.Node)
	}
	if d.Speed < 0 {
		return nil, fmt.Errorf("drive %s: negative speed %d", d.Node, d.Speed)
	}
	p := &plan{Drive: d, node: n, mode: d.Mode,
		tgtNode: targetPrefix + strconv.Itoa(i), jobID: JobPrefix + n.NodeName}
	for _, b := range n.Bitmaps {
		if b.Busy {
			return nil, fmt.Errorf("drive %s: bitmap %q is busy: %w", d.Node, b.Name, ErrBusy)
		}
	}
	if d.Mode == Shallow {
		p.est = estimate(st, p)
		return p, nil
	}
	if d.Bitmap == "" || strings.ContainsAny(d.Bitmap, " ,:") {
		return nil, fmt.Errorf("drive %s: bad bitmap name %q", d.Node, d.Bitmap)
	}
	cps := checkpoints(n, d.Bitmap)
	if hasBitmap(n, tempBitmap(d.Bitmap)) {
		// Left by an engine that died mid-call: that call's checkpoint
		// (the newest) never became a stored backup.
		if len(cps) > 0 {
			if err := removeBitmap(ctx, e.o.Monitor, n.NodeName, cps[len(cps)-1].Name); err != nil {
				return nil, err
			}
			cps = cps[:len(cps)-1]
		}
		if err := removeBitmap(ctx, e.o.Monitor, n.NodeName, tempBitmap(d.Bitmap)); err != nil {
			return nil, err
		}
	}
	next := 1
	if len(cps) > 0 {
		next = cps[len(cps)-1].seq + 1
	}
	if d.Mode == Auto {
		switch {
		case len(cps) == 0:
			p.mode, p.fellBack = Full, "no checkpoint for bitmap "+d.Bitmap
		default:
			for _, c := range cps {
				if c.Inconsistent {
					p.mode, p.fellBack = Full, "bitmap "+c.Name+" is inconsistent (QEMU stopped uncleanly)"
				}
			}
			if p.mode == Auto {
				p.mode = Incremental
			}
		}
	}
	if p.mode != Incremental {
		// An inconsistent checkpoint can never be used again.
		kept := cps[:0]
		for _, c := range cps {
			if !c.Inconsistent {
				kept = append(kept, c)
				continue
			}
			if err := removeBitmap(ctx, e.o.Monitor, n.NodeName, c.Name); err != nil {
				return nil, err
			}
		}
		cps = kept
		next = 1
		if len(cps) > 0 {
			next = cps[len(cps)-1].seq + 1
		}
	}
	p.newCP = d.Bitmap + "." + strconv.Itoa(next)
	// The temporary bitmap is the incremental's frozen copy of the base;
	// in every mode it also marks, for StopStray, that this call added
	// the newest checkpoint.
	p.tmp = tempBitmap(d.Bitmap)
	if p.mode == Incremental {
		p.base = cps[0].Name
	}
	for i := 1; i < len(cps); i++ {
		p.drop = append(p.drop, cps[i].Name)
	}
	p.est = estimate(st, p)
	return p, nil
}

func (e *Engine) addTarget(ctx context.Context, p *plan) error {
	m := e.o.Monitor
	var spec map[string]any
	if p.Target.File != "" {
		direct, reserved, err := createTarget(ctx, p.Target.File, p.node.Image.VirtualSize, p.est, e.o.TargetOwner)
		if err != nil {
			return err
		}
		p.created, p.reserved = true, reserved
		if direct {
			// O_DIRECT where the file system is a local one on a block
			// device: QEMU's buffers go to the disk without growing the
			// page cache by the whole backup (fsutil.DirectFS). A full of
			// 2 GiB took 1.4 s instead of 3.2-3.8 s and a third of the
			// CPU. Should QEMU refuse it, the target opens cached.
			err := m.Execute(ctx, "blockdev-add", targetSpec(p.tgtNode, p.Target.File, true), nil)
			if err == nil {
				p.added, p.direct = true, true
				return nil
			}
			e.log.Info("the target refused O_DIRECT; writing it through the page cache", "file", p.Target.File, "err", err)
		}
		spec = targetSpec(p.tgtNode, p.Target.File, false)
	} else {
		spec = map[string]any{"driver": "nbd", "node-name": p.tgtNode,
			"server": map[string]any{"type": "inet", "host": p.Target.NBDHost, "port": strconv.Itoa(p.Target.NBDPort)}}
	}
	if err := m.Execute(ctx, "blockdev-add", spec, nil); err != nil {
		return fmt.Errorf("opening target %s: %w", p.Target, err)
	}
	p.added = true
	return nil
}

// targetSpec is the blockdev-add of a qcow2 target file.
func targetSpec(node, file string, direct bool) map[string]any {
	// No flushes: qcow2 would otherwise fdatasync the target each time
	// new clusters' metadata depends on a refcount update, so the copy
	// waits on the disk's write-back (like qemu-img convert's default
	// cache, which is what a copy costs). The target is scratch until
	// the store imports it, and the import writes the durable copy
	// (docs/live-backup.md, "Speed").
	noFlush := map[string]any{"no-flush": true}
	fileCache := map[string]any{"no-flush": true, "direct": direct}
	return map[string]any{"driver": "qcow2", "node-name": node, "backing": nil, "cache": noFlush,
		"file": map[string]any{"driver": "file", "filename": file, "cache": fileCache}}
}

// createTarget writes an empty qcow2 (v3, 64 KiB clusters, no backing)
// of the disk's virtual size at path, which must not exist yet, owned by
// owner when that is not us, and says whether QEMU should write it with
// O_DIRECT (fsutil.DirectFS). Our own writer, not qemu-img create:
// starting qemu-img was most of a small incremental's time.
//
// An O_DIRECT target also gets about the space the backup will write
// (estimate) reserved past the header: QEMU appends each new cluster,
// and a direct write that extends a file takes the file's lock
// exclusively (ext4, XFS) and waits for it, so the job's parallel writes
// went one at a time. Into reserved space they run together: a 20 MiB
// incremental took 31-44 ms instead of 53-80 ms, a 1 GiB full 0.70 s
// instead of 0.78 s. The job trims what it did not use (trimTarget).
// Reserving is best effort: without it (no room, no fallocate) the
// writes extend the file as before.
func createTarget(ctx context.Context, path string, virtualSize, estimate int64, owner *Owner) (direct, reserved bool, err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return false, false, fmt.Errorf("creating target: %w", err)
	}
	direct = fsutil.DirectFS(f)
	if owner != nil && (owner.UID != os.Geteuid() || owner.GID != os.Getegid()) {
		if err = f.Chown(owner.UID, owner.GID); err != nil {
			err = fmt.Errorf("giving it to QEMU's user %d:%d: %w", owner.UID, owner.GID, err)
		}
	}
	var end int64
	if err == nil {
		end, err = qcow2.Write(ctx, f, (virtualSize+511)&^511, nil, nil, qcow2.WriteOptions{})
	}
	if err == nil && direct && estimate > 0 {
		reserved = unix.Fallocate(int(f.Fd()), 0, end, estimate) == nil
		if !reserved {
			// A reservation that ran out of room may have kept part of
			// what it took: give it back now, nothing trims it later.
			err = f.Truncate(end)
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		return false, false, fmt.Errorf("creating target %s: %w", path, err)
	}
	return direct, reserved, nil
}

// estimate is about the bytes a job of p will write into a file target:
// the changed clusters (the base checkpoint's count) for an incremental,
// the bytes the disk's files occupy for the others, never more than the
// disk, plus room for the L2 tables and refcounts of that many clusters.
func estimate(st *blockState, p *plan) int64 {
	const cluster = 64 << 10
	virtual := p.node.Image.VirtualSize
	var data int64
	switch p.mode {
	case Incremental:
		for _, b := range p.node.Bitmaps {
			if b.Name == p.base {
				data = b.Count
			}
		}
	case Full:
		data = st.chainBytes(p.node)
	default: // Top, Shallow
		data = p.node.Image.ActualSize
	}
	data = min(data, virtual)
	if data <= 0 {
		return 0
	}
	clusters := (data + cluster - 1) / cluster
	l2 := min(clusters*cluster, (virtual/cluster*8+cluster-1)/cluster*cluster)
	return clusters*cluster + l2 + clusters*2 + 2*cluster
}

// trimTarget gives back the reserved space the job did not use: the
// file is cut after its last byte of data. The file system reports the
// reserved, never written space as a hole (SEEK_DATA), so a cut never
// drops a byte QEMU wrote.
func trimTarget(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fd := int(f.Fd())
	var end, off int64
	for {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return err
		}
		if end, err = unix.Seek(fd, data, unix.SEEK_HOLE); err != nil {
			return err
		}
		off = end
	}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if end <= 0 || end >= st.Size() {
		return nil
	}
	return f.Truncate(end)
}

// actions are the drive's part of the one transaction.
func (p *plan) actions() []map[string]any {
	node := p.node.NodeName
	backup := map[string]any{"device": node, "target": p.tgtNode, "job-id": p.jobID,
		"auto-dismiss": false, "auto-finalize": true}
	if p.Speed > 0 {
		backup["speed"] = p.Speed
	}
	if p.Target.File != "" {
		// Into a cached target, copy_file_range from the disk's file:
		// the kernel copies (or shares extents) without a pass through
		// QEMU's buffers, about half of QEMU's CPU per byte. Where the
		// two files cannot (another file system, FUSE, compressed
		// clusters), QEMU falls back to read and write by itself. Into
		// an O_DIRECT target the kernel's copy would go through the
		// page cache again (a full took 2.9 s against 1.4 s): read and
		// write. Chunks stay at 1 MiB, the read-and-write size: larger
		// ones (up to 16 MiB) would make a -speed limit come in bursts.
		backup["x-perf"] = map[string]any{"use-copy-range": !p.direct, "max-chunk": 1 << 20}
	}
	var acts []map[string]any
	if p.newCP != "" {
		acts = append(acts, map[string]any{"type": "block-dirty-bitmap-add",
			"data": map[string]any{"node": node, "name": p.newCP, "persistent": true}},
			map[string]any{"type": "block-dirty-bitmap-add",
				"data": map[string]any{"node": node, "name": p.tmp, "persistent": false, "disabled": true}})
	}
	switch p.mode {
	case Full:
		// Without a backing file, top copies the same data as full (the
		// fresh target reads unallocated as zero) but the job, and so
		// -speed, counts only allocated bytes.
		backup["sync"] = "full"
		if p.node.BackingFile == "" {
			backup["sync"] = "top"
		}
	case Top, Shallow:
		backup["sync"] = "top"
	case Incremental:
		acts = append(acts,
			map[string]any{"type": "block-dirty-bitmap-merge",
				"data": map[string]any{"node": node, "target": p.tmp, "bitmaps": []string{p.base}}})
		backup["sync"] = "bitmap"
		backup["bitmap"] = p.tmp
		backup["bitmap-mode"] = "never"
	}
	return append(acts, map[string]any{"type": "blockdev-backup", "data": backup})
}

// wait waits until every job has concluded and returns the first
// failure or ctx's end. It follows the jobs' events: JOB_STATUS_CHANGE
// for their state, and BLOCK_JOB_COMPLETED (with "error" when the job
// failed) or BLOCK_JOB_CANCELLED for their outcome, which QEMU sends
// before the job concludes. So a job whose events all arrived costs no
// query at all. query-jobs is asked when Poll has passed since it was
// last asked (progress, and in case an event is lost) and, at the end,
// for the outcome of any job whose completion event did not arrive.
func (e *Engine) wait(ctx context.Context, plans []*plan, after uint64) error {
	m := e.o.Monitor
	status := map[string]string{}
	outcome := map[string]*string{} // job id -> its error ("" = success), once known from an event
	for _, p := range plans {
		status[p.jobID] = ""
	}
	concluded := func() bool {
		for _, s := range status {
			if s != "concluded" && s != "null" {
				return false
			}
		}
		return true
	}
	last := -1
	report := func(pct int) {
		if e.o.Progress != nil && pct != last {
			e.o.Progress(pct)
			last = pct
		}
	}
	// query reads the jobs' state, reports progress and says whether all
	// have concluded; a job that failed is an error.
	query := func() (bool, error) {
		jobs, err := queryJobs(ctx, m)
		if err != nil {
			return false, fmt.Errorf("watching the backup: %w", err)
		}
		var cur, tot int64
		done, found := 0, 0
		for _, j := range jobs {
			if _, ok := status[j.ID]; !ok {
				continue
			}
			found++
			status[j.ID] = j.Status
			cur += j.CurrentProgress
			tot += j.TotalProgress
			if j.Status == "concluded" || j.Status == "null" {
				if j.Error != "" {
					return false, fmt.Errorf("%w: %s: %s", ErrJobFailed, j.ID, j.Error)
				}
				done++
			}
		}
		if found < len(plans) {
			return false, fmt.Errorf("%w: %d of %d jobs vanished", ErrJobFailed, len(plans)-found, len(plans))
		}
		pct := 100
		if tot > 0 {
			pct = int(cur * 100 / tot)
		}
		if done < len(plans) && pct == 100 {
			pct = 99
		}
		report(pct)
		return done == len(plans), nil
	}
	// fromEvents says, once all jobs have concluded, whether their
	// completion events told every outcome, and returns the first failure.
	fromEvents := func() (bool, error) {
		for _, p := range plans {
			if outcome[p.jobID] == nil {
				return false, nil
			}
		}
		for _, p := range plans {
			if msg := *outcome[p.jobID]; msg != "" {
				return true, fmt.Errorf("%w: %s: %s", ErrJobFailed, p.jobID, msg)
			}
		}
		report(100)
		return true, nil
	}
	next := time.Now().Add(e.o.Poll)
	for {
		if concluded() {
			if known, err := fromEvents(); known {
				return err
			}
			// A completion event is missing: query-jobs has the outcome.
			if done, err := query(); err != nil || done {
				return err
			}
		}
		wctx, cancel := context.WithDeadline(ctx, next)
		ev, werr := m.WaitEvent(wctx, after, func(ev qmp.Event) bool {
			switch ev.Name {
			case "JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED":
				return true
			}
			return false
		})
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if werr == nil {
			after = ev.Seq
			var d struct {
				ID, Status, Device string
				Error              *string
			}
			if json.Unmarshal(ev.Data, &d) != nil {
				continue
			}
			switch ev.Name {
			case "JOB_STATUS_CHANGE":
				if _, ok := status[d.ID]; ok {
					status[d.ID] = d.Status
				}
			case "BLOCK_JOB_COMPLETED": // device is the job id
				if _, ok := status[d.Device]; ok {
					msg := ""
					if d.Error != nil {
						msg = *d.Error
						if msg == "" {
							msg = "failed"
						}
					}
					outcome[d.Device] = &msg
				}
			case "BLOCK_JOB_CANCELLED":
				if _, ok := status[d.Device]; ok {
					msg := "cancelled"
					outcome[d.Device] = &msg
				}
			}
			continue
		}
		if done, err := query(); err != nil || done {
			return err
		}
		next = time.Now().Add(e.o.Poll)
	}
}

// finish tidies a drive whose job succeeded.
func (e *Engine) finish(ctx context.Context, p *plan) error {
	m := e.o.Monitor
	if err := m.Execute(ctx, "job-dismiss", map[string]any{"id": p.jobID}, nil); err != nil {
		return err
	}
	if err := m.Execute(ctx, "blockdev-del", map[string]any{"node-name": p.tgtNode}, nil); err != nil {
		return err
	}
	p.added = false
	if p.reserved {
		if err := trimTarget(p.Target.File); err != nil {
			e.log.Warn("giving back the target's unused reserved space", "file", p.Target.File, "err", err)
		}
	}
	if p.tmp != "" {
		if err := removeBitmap(ctx, m, p.node.NodeName, p.tmp); err != nil {
			return err
		}
	}
	return nil
}

// abort undoes a call that failed or was cancelled: cancel the jobs, wait
// for them, drop targets, temporary and new bitmaps, delete target files.
func (e *Engine) abort(plans []*plan) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	m := e.o.Monitor
	after := m.LastSeq()
	for _, p := range plans {
		if p.startedT {
			err := m.Execute(ctx, "block-job-cancel", map[string]any{"device": p.jobID, "force": true}, nil)
			if err != nil && !isClass(err, "DeviceNotActive") {
				e.log.Warn("cancelling", "job", p.jobID, "err", err)
			}
		}
	}
	for _, p := range plans {
		if p.startedT {
			waitConcluded(ctx, m, p.jobID, after)
			if err := m.Execute(ctx, "job-dismiss", map[string]any{"id": p.jobID}, nil); err != nil {
				e.log.Debug("dismissing", "job", p.jobID, "err", err)
			}
		}
		e.undo(ctx, p)
	}
}

func (e *Engine) undo(ctx context.Context, p *plan) {
	m := e.o.Monitor
	if p.added {
		if err := m.Execute(ctx, "blockdev-del", map[string]any{"node-name": p.tgtNode}, nil); err != nil {
			e.log.Warn("removing target node", "node", p.tgtNode, "err", err)
		}
	}
	if p.startedT {
		for _, b := range []string{p.tmp, p.newCP} {
			if b == "" {
				continue
			}
			if err := removeBitmap(ctx, m, p.node.NodeName, b); err != nil && !isClass(err, "GenericError") {
				e.log.Warn("removing bitmap", "bitmap", b, "err", err)
			}
		}
	}
	if p.created {
		if err := os.Remove(p.Target.File); err != nil && !errors.Is(err, os.ErrNotExist) {
			e.log.Warn("removing partial target", "file", p.Target.File, "err", err)
		}
	}
}

// waitConcluded waits until job id is concluded or gone.
func waitConcluded(ctx context.Context, m qmp.Monitor, id string, after uint64) {
	for ctx.Err() == nil {
		jobs, err := queryJobs(ctx, m)
		if err != nil {
			return
		}
		running := false
		for _, j := range jobs {
			if j.ID == id && j.Status != "concluded" && j.Status != "null" {
				running = true
			}
		}
		if !running {
			return
		}
		wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		if ev, err := m.WaitEvent(wctx, after, func(ev qmp.Event) bool { return ev.Name == "JOB_STATUS_CHANGE" }); err == nil {
			after = ev.Seq
		}
		cancel()
	}
}

// prune drops the checkpoints of prefix on node between the base (the
// oldest) and the newest; confirmed drops the base too, so the newest
// becomes the base.
func (e *Engine) prune(ctx context.Context, node, prefix string, confirmed bool) error {
	n, err := resolveNode(ctx, e.o.Monitor, node)
	if err != nil {
		return err
	}
	cps := checkpoints(n, prefix)
	first := 1
	if confirmed {
		first = 0
	}
	for i := first; i < len(cps)-1; i++ {
		if err := removeBitmap(ctx, e.o.Monitor, node, cps[i].Name); err != nil {
			return err
		}
	}
	return nil
}

// Confirm records that the store holds the newest backup of (node,
// bitmap): its checkpoint becomes the base and the older ones go, so the
// next incremental copies only what changed since that backup.
func (e *Engine) Confirm(ctx context.Context, node, bitmap string) error {
	n, err := resolveNode(ctx, e.o.Monitor, node)
	if err != nil {
		return err
	}
	if len(checkpoints(n, bitmap)) == 0 {
		return fmt.Errorf("drive %s has no checkpoint of bitmap %s", node, bitmap)
	}
	return e.prune(ctx, n.NodeName, bitmap, true)
}

// Checkpoint is a checkpoint bitmap as QEMU reports it (for callers and
// tests that inspect the bitmap state).
type Checkpoint struct {
	Name         string
	Count        int64
	Recording    bool
	Inconsistent bool
}

// Checkpoints lists bitmap's checkpoints on node, oldest first.
func (e *Engine) Checkpoints(ctx context.Context, node, bitmap string) ([]Checkpoint, error) {
	n, err := resolveNode(ctx, e.o.Monitor, node)
	if err != nil {
		return nil, err
	}
	var out []Checkpoint
	for _, c := range checkpoints(n, bitmap) {
		out = append(out, Checkpoint{Name: c.Name, Count: c.Count, Recording: c.Recording, Inconsistent: c.Inconsistent})
	}
	return out, nil
}

// StopStray cancels backup jobs a dead engine left in QEMU (ids with
// JobPrefix), or only the one of node when node is not empty, and removes
// their targets and temporary bitmaps. It reports how many it stopped.
func (e *Engine) StopStray(ctx context.Context, node string) (int, error) {
	m := e.o.Monitor
	jobs, err := queryJobs(ctx, m)
	if err != nil {
		return 0, err
	}
	want := ""
	if node != "" {
		n, err := resolveNode(ctx, m, node)
		if err != nil {
			return 0, err
		}
		want = JobPrefix + n.NodeName
	}
	after := m.LastSeq()
	stopped := 0
	for _, j := range jobs {
		if !strings.HasPrefix(j.ID, JobPrefix) || (want != "" && j.ID != want) {
			continue
		}
		if j.Status != "concluded" && j.Status != "null" {
			err := m.Execute(ctx, "block-job-cancel", map[string]any{"device": j.ID, "force": true}, nil)
			if err != nil && !isClass(err, "DeviceNotActive") {
				return stopped, err
			}
			waitConcluded(ctx, m, j.ID, after)
		}
		if err := m.Execute(ctx, "job-dismiss", map[string]any{"id": j.ID}, nil); err != nil {
			e.log.Debug("dismissing", "job", j.ID, "err", err)
		}
		stopped++
	}
	if stopped == 0 {
		return 0, nil
	}
	nodes, err := namedNodes(ctx, m)
	if err != nil {
		return stopped, err
	}
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, targetPrefix) {
			if err := m.Execute(ctx, "blockdev-del", map[string]any{"node-name": n.NodeName}, nil); err != nil {
				e.log.Warn("removing target node", "node", n.NodeName, "err", err)
			}
		}
		for _, b := range n.Bitmaps {
			prefix, ok := strings.CutSuffix(b.Name, ".tmp")
			if !ok || b.Persistent {
				continue
			}
			// The marker says the stopped call added the newest
			// checkpoint of prefix: it goes too (no half bitmap).
			if cps := checkpoints(n, prefix); len(cps) > 0 {
				if err := removeBitmap(ctx, m, n.NodeName, cps[len(cps)-1].Name); err != nil {
					return stopped, err
				}
			}
			if err := removeBitmap(ctx, m, n.NodeName, b.Name); err != nil {
				return stopped, err
			}
		}
	}
	return stopped, nil
}

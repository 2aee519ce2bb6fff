package main

// imagestore vm backup: our own one-command live backup of a VM into the
// store, for operators without a management node. It asks the store's
// agent for an upload dir and one NBD target per disk (exportnbdimage),
// runs one batch backup of every disk into them (transfer/livebackup, one
// transaction), imports each target with its parent (import-backup), and
// confirms each disk's checkpoint to the engine only after its import
// succeeded (bakconfirm's semantics, exactly).
//
// The parent of a disk's backup is found in a host-local state file,
// <state dir>/vm/<VM>.json (the state dir of add: $IMAGESTORE_STATE_DIR,
// /var/lib/imagestore-client as root): for each disk, the install path,
// name and id of its newest imported backup. A disk with no entry there is
// backed up full, whatever its bitmaps say, so an increment never lands on
// the wrong parent.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"imagestore/agent/api"
	"imagestore/internal/fsutil"
	"imagestore/transfer/livebackup"
	"imagestore/transfer/ratelimit"
)

// vmBitmap names the checkpoints vm backup keeps on each disk.
const vmBitmap = "imagestore-vm"

// vmDisk is one disk of the VM as QEMU reports it.
type vmDisk struct {
	Key    string // the guest device id (e.g. virtio-disk0), else the node name
	Node   string // the format node
	Size   int64  // virtual size, bytes
	File   string // the image file QEMU runs the disk on
	Format string // its format (qcow2, raw)
}

// vmState is the host-local state file of one VM.
type vmState struct {
	Disks map[string]vmBackup `json:"disks"`
}

// vmBackup is one disk's backup in the store.
type vmBackup struct {
	Disk        string `json:"disk"`
	Mode        string `json:"mode,omitempty"`
	Name        string `json:"name"`
	ID          string `json:"id"`
	InstallPath string `json:"installPath"`
	File        string `json:"file,omitempty"`   // the disk's image file (vm restore writes it)
	Format      string `json:"format,omitempty"` // its format
}

func cmdVM(ctx context.Context, g *globals, args []string) error {
	if len(args) == 0 {
		return usageErr("vm backup|restore ...")
	}
	switch args[0] {
	case "backup":
		return vmBackupCmd(ctx, g, args[1:])
	case "restore":
		return vmRestoreCmd(ctx, g, args[1:])
	case "-h", "-help", "--help":
		fs := g.subFlags("vm")
		fmt.Fprintln(g.stderr, "usage: imagestore vm backup|restore [flags] (vm backup -h, vm restore -h)")
		fs.PrintDefaults()
		return flag.ErrHelp
	default:
		return usageErr("unknown vm command %q (want backup or restore)", args[0])
	}
}

func (g *globals) vmStatePath(domain string) string {
	return filepath.Join(g.stateDir, "vm", domain+".json")
}

func (g *globals) loadVMState(domain string) (*vmState, error) {
	st := &vmState{Disks: map[string]vmBackup{}}
	b, err := os.ReadFile(g.vmStatePath(domain))
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("state file %s: %w", g.vmStatePath(domain), err)
	}
	if st.Disks == nil {
		st.Disks = map[string]vmBackup{}
	}
	return st, nil
}

func (g *globals) saveVMState(domain string, st *vmState) error {
	p := g.vmStatePath(domain)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFile(p, append(b, '\n'), 0o600)
}

// vmDisks lists the VM's writable disks (query-block), in QEMU's order.
func vmDisks(ctx context.Context, lf *liveFlags) ([]vmDisk, error) {
	mon, err := lf.dialMonitor(ctx, 30*time.Second)
	if err != nil {
		return nil, err
	}
	defer mon.Close()
	var blocks []struct {
		Device   string `json:"device"`
		Qdev     string `json:"qdev"`
		Inserted *struct {
			NodeName string `json:"node-name"`
			File     string `json:"file"`
			Drv      string `json:"drv"`
			RO       bool   `json:"ro"`
			Image    struct {
				VirtualSize int64 `json:"virtual-size"`
			} `json:"image"`
		} `json:"inserted"`
	}
	if err := mon.Execute(ctx, "query-block", nil, &blocks); err != nil {
		return nil, fmt.Errorf("query-block: %w", err)
	}
	var disks []vmDisk
	for _, b := range blocks {
		if b.Inserted == nil || b.Inserted.RO || b.Inserted.NodeName == "" {
			continue // an empty CD-ROM drive or a read-only medium
		}
		key := b.Inserted.NodeName
		if id, ok := strings.CutPrefix(b.Qdev, "/machine/peripheral/"); ok {
			key, _, _ = strings.Cut(id, "/")
		} else if b.Qdev != "" && !strings.HasPrefix(b.Qdev, "/") {
			key = b.Qdev
		}
		disks = append(disks, vmDisk{Key: key, Node: b.Inserted.NodeName, Size: b.Inserted.Image.VirtualSize,
			File: b.Inserted.File, Format: b.Inserted.Drv})
	}
	if len(disks) == 0 {
		return nil, fmt.Errorf("VM %s has no writable disk", lf.domain)
	}
	return disks, nil
}

func vmBackupCmd(ctx context.Context, g *globals, args []string) error {
	var lf liveFlags
	var full bool
	fs := g.liveFlagSet("vm backup", &lf)
	fs.StringVar(&g.agentURL, "store", g.agentURL, "agent URL of the store (port 8001); the NBD targets are served on its host")
	fs.BoolVar(&full, "full", false, "back up every disk in full (default: incremental where a checkpoint and a parent exist)")
	if pos, err := parseArgs(fs, args); err != nil {
		return err
	} else if len(pos) != 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if err := lf.check(); err != nil {
		return err
	}
	a, err := g.agent()
	if err != nil {
		return err
	}
	su, err := url.Parse(a.base)
	if err != nil || su.Hostname() == "" {
		return usageErr("-store %q: want http(s)://host:port", g.agentURL)
	}
	st, err := g.loadVMState(lf.domain)
	if err != nil {
		return err
	}
	disks, err := vmDisks(ctx, &lf)
	if err != nil {
		return err
	}

	var dir api.AllocUploadDirReply
	if err := a.callSync(ctx, api.PathAllocUploadDir, api.AllocUploadDirRequest{ExpireHour: 1}, &dir); err != nil {
		return fmt.Errorf("allocuploaddir: %w", err)
	}
	nq := api.ExportNBDImageRequest{Workspace: dir.UploadDir, ExpireHour: 1}
	for _, d := range disks {
		nq.Sizes = append(nq.Sizes, api.Int(d.Size))
	}
	var nbd api.ExportNBDImageReply
	if err := a.callSync(ctx, api.SyncPath(api.PathExportNBDImage), nq, &nbd); err != nil {
		return fmt.Errorf("exportnbdimage: %w", err)
	}
	if len(nbd.Ports) != len(disks) || len(nbd.ImagePaths) != len(disks) {
		return fmt.Errorf("exportnbdimage: %d targets for %d disks", len(nbd.Ports), len(disks))
	}
	if nbd.TLS || nbd.PSK != "" {
		return errors.New("the store's NBD targets require TLS or a key: not supported yet by vm backup")
	}
	drives := make([]livebackup.Drive, len(disks))
	for i, d := range disks {
		m := livebackup.Auto
		if _, ok := st.Disks[d.Key]; full || !ok {
			m = livebackup.Full
		}
		drives[i] = livebackup.Drive{Node: d.Node, Bitmap: vmBitmap, Mode: m,
			Target: livebackup.Target{NBDHost: su.Hostname(), NBDPort: nbd.Ports[i]}}
	}
	var total int64
	for _, d := range disks {
		total += d.Size
	}
	p := g.newProgress("backup", total)
	var last int64
	g.onLivePct = func(pct int) { // Σcurrent/Σtotal of the jobs, as bytes of the disks
		if n := total * int64(pct) / 100; n > last {
			p.Add(n - last)
			last = n
		}
	}
	// release stops the NBD servers and removes the targets not imported
	// (best effort: they expire with the upload dir anyway).
	release := func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = a.callSync(cctx, api.SyncPath(api.PathExportNBDImageCancel), api.CancelNBDImageRequest{NBDDescription: nbd.NBDDescription}, &api.Reply{})
	}
	res, err := g.runLive(ctx, &lf, drives)
	p.Done()
	if err != nil {
		release()
		return err
	}

	var out []vmBackup
	for i, d := range disks {
		parent := ""
		if res[i].Mode != livebackup.Full {
			parent = st.Disks[d.Key].InstallPath
		}
		q := api.ImportBackupRequest{ImgURL: nbd.ImagePaths[i], Parent: parent, ProcessToRelease: nbd.NBDDescription}
		if parent == "" {
			q.Name = vmImageName(lf.domain, d.Key)
		}
		var rep api.ImportReply
		if err := a.callSync(ctx, api.SyncPath(api.PathImportBackup), q, &rep); err != nil {
			release()
			return fmt.Errorf("disk %s: import-backup: %w (the next backup still covers it)", d.Key, err)
		}
		b := vmBackup{Disk: d.Key, Mode: string(res[i].Mode), Name: rep.Name, ID: rep.ID, InstallPath: rep.InstallPath,
			File: d.File, Format: d.Format}
		st.Disks[d.Key] = b
		if err := g.saveVMState(lf.domain, st); err != nil {
			return fmt.Errorf("disk %s imported as %s:%s, but the state file: %w", d.Key, b.Name, b.ID, err)
		}
		if err := vmConfirm(ctx, &lf, d.Node); err != nil {
			fmt.Fprintf(g.stderr, "imagestore: disk %s: confirm: %v (the next incremental repeats this one's clusters)\n", d.Key, err)
		}
		out = append(out, b)
	}
	return g.printResult(out, func(w io.Writer) {
		for _, b := range out {
			fmt.Fprintf(w, "%s:%s\n", b.Name, b.ID)
		}
	})
}

// vmConfirm drops the checkpoints older than the newest on node.
func vmConfirm(ctx context.Context, lf *liveFlags, node string) error {
	mon, err := lf.dialMonitor(ctx, 30*time.Second)
	if err != nil {
		return err
	}
	defer mon.Close()
	eng, err := livebackup.New(livebackup.Options{Monitor: mon})
	if err != nil {
		return err
	}
	return eng.Confirm(ctx, node, vmBitmap)
}

// vmImageName names a disk's chain in the store: <VM>-<disk>.
func vmImageName(domain, key string) string {
	return domain + "-" + key
}

// vmRestoreCmd writes chosen backups back onto a stopped VM's disks: each
// name:id names a chain vm backup made (the state file maps it to its
// disk and the disk's image file); the chain is pulled flattened, in the
// disk's format, and atomically replaces the file.
func vmRestoreCmd(ctx context.Context, g *globals, args []string) error {
	var lf liveFlags
	fs := g.liveFlagSet("vm restore", &lf)
	conc := fs.Int("concurrency", 4, "layers downloaded in parallel")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("vm restore -domain VM name:id[,name:id...]")
	}
	if err := lf.check(); err != nil {
		return err
	}
	st, err := g.loadVMState(lf.domain)
	if err != nil {
		return err
	}
	type job struct {
		ref  string
		disk vmBackup
	}
	var jobs []job
	seen := map[string]bool{}
	for _, ref := range strings.Split(pos[0], ",") {
		name, _, _ := strings.Cut(ref, ":")
		var found *vmBackup
		for _, b := range st.Disks {
			if b.Name == name {
				found = &b
			}
		}
		if found == nil {
			return fmt.Errorf("%s: not a backup of a disk of VM %s (state file %s)", ref, lf.domain, g.vmStatePath(lf.domain))
		}
		if found.File == "" || (found.Format != "qcow2" && found.Format != "raw") {
			return fmt.Errorf("%s: disk %s has no image file of a format we write (qcow2, raw) in the state file", ref, found.Disk)
		}
		if seen[found.Disk] {
			return usageErr("two backups of disk %s", found.Disk)
		}
		seen[found.Disk] = true
		jobs = append(jobs, job{ref, *found})
	}
	for _, j := range jobs { // all checked before any is written
		if err := vmStopped(ctx, &lf, j.disk.File); err != nil {
			return err
		}
	}
	var out []pullResult
	for _, j := range jobs {
		c, ri, err := g.openImage(ctx, j.ref)
		if err != nil {
			return err
		}
		if ri.Top().Format != "qcow2" {
			c.CloseIdleConnections()
			return fmt.Errorf("%s is a %s image, not a disk backup", j.ref, ri.Top().Format)
		}
		var total int64
		for _, l := range ri.Manifest.Layers {
			total += l.Size
		}
		p := g.newProgress("restore "+j.disk.Disk, total)
		n, err := flattenRemote(ctx, c, ri, j.disk.File, j.disk.Format, *conc, ratelimit.New(0), p, true)
		p.Done()
		c.CloseIdleConnections()
		if err != nil {
			return fmt.Errorf("disk %s: %w", j.disk.Disk, err)
		}
		out = append(out, pullResult{Name: ri.Ref.Name, ID: ri.Ref.ID, InstallPath: j.disk.File, Format: j.disk.Format,
			VirtualSize: ri.Top().VirtualSize, Size: n, Layers: len(ri.Chain)})
	}
	return g.printResult(out, func(w io.Writer) {
		for _, r := range out {
			fmt.Fprintf(w, "%s:%s -> %s (%s, %d layers)\n", r.Name, r.ID, r.InstallPath, r.Format, r.Layers)
		}
	})
}

// errVMRunning: vm restore refuses a VM that runs.
var errVMRunning = errors.New("the VM is running: stop it before restoring its disks")

// vmStopped checks that nothing runs the VM: its monitor does not answer
// (within a few seconds), no backup of it runs (control socket), and no
// process holds QEMU's lock on the disk's image file.
func vmStopped(ctx context.Context, lf *liveFlags, file string) error {
	if c, err := net.DialTimeout("unix", lf.ctlPath(), time.Second); err == nil {
		c.Close()
		return fmt.Errorf("%w (a backup of it runs)", errVMRunning)
	}
	if mon, err := lf.dialMonitor(ctx, 5*time.Second); err == nil {
		mon.Close()
		return errVMRunning
	}
	if _, err := os.Stat(file); errors.Is(err, os.ErrNotExist) {
		return nil // nothing uses a file that is not there
	}
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "--output=json", file).CombinedOutput()
	switch {
	case errors.Is(err, exec.ErrNotFound):
		return fmt.Errorf("qemu-img is needed to check the disk is not in use: %w", err)
	case err != nil && strings.Contains(string(out), "lock"):
		return fmt.Errorf("%w (%s is in use: %s)", errVMRunning, file, strings.TrimSpace(string(out)))
	case err != nil:
		return fmt.Errorf("qemu-img info %s: %v: %s", file, err, strings.TrimSpace(string(out)))
	}
	return nil
}

package main

// The live-backup verbs of PROTOCOL.md §4.4 (Z7–Z10): backup, batbak,
// battopbak, stopbak, plus bakconfirm (ours). They drive QEMU through
// transfer/livebackup.
//
// Reaching the VM: when -qmp-dir DIR (default $IMAGESTORE_QMP_DIR) holds
// a QMP unix socket DIR/<VM>.qmp, that socket; otherwise libvirt's QEMU
// monitor passthrough for the domain named <VM>, through libvirtd's socket
// (-libvirt-sock, default $IMAGESTORE_LIBVIRT_SOCK or the system one). The
// running backup listens on <ctl>/<VM>.bak (the control socket), where
// stopbak reaches it (QEMU serves one client per QMP socket, and the
// running process is the one that can remove its targets); <ctl> is DIR
// when -qmp-dir is set, else /run/imagestore.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"imagestore/transfer/livebackup"
	"imagestore/transfer/qmp"
	"imagestore/transfer/qmp/libvirtqmp"
)

// liveFlags are the flags every live-backup verb shares.
type liveFlags struct {
	domain      string
	qmpDir      string
	libvirtSock string
	pointInTime bool
	oob         bool
}

func (g *globals) liveFlagSet(name string, lf *liveFlags) *flag.FlagSet {
	fs := g.subFlags(name)
	fs.StringVar(&lf.domain, "domain", "", "VM name (the libvirt domain name, i.e. the VM uuid)")
	fs.StringVar(&lf.qmpDir, "qmp-dir", os.Getenv("IMAGESTORE_QMP_DIR"), "directory of the VMs' QMP sockets <dir>/<VM>.qmp (default $IMAGESTORE_QMP_DIR)")
	sock := os.Getenv("IMAGESTORE_LIBVIRT_SOCK")
	if sock == "" {
		sock = libvirtqmp.DefaultSocket
	}
	fs.StringVar(&lf.libvirtSock, "libvirt-sock", sock, "libvirtd's unix socket, used when -qmp-dir holds no <VM>.qmp (default $IMAGESTORE_LIBVIRT_SOCK or "+libvirtqmp.DefaultSocket+")")
	fs.BoolVar(&lf.pointInTime, "point-in-time", false, "accepted: every backup is point-in-time (copy-before-write)")
	fs.BoolVar(&lf.oob, "oob", false, "accepted and ignored (out of band; its meaning is not documented)")
	return fs
}

func (lf *liveFlags) check() error {
	if lf.domain == "" {
		return usageErr("-domain is required")
	}
	if strings.ContainsAny(lf.domain, "/\x00") || lf.domain == "." || lf.domain == ".." {
		return usageErr("bad -domain %q", lf.domain)
	}
	return nil
}

// defaultCtlDir holds the control sockets when -qmp-dir is not set.
const defaultCtlDir = "/run/imagestore"

func (lf *liveFlags) qmpPath() string { return filepath.Join(lf.qmpDir, lf.domain+".qmp") }

func (lf *liveFlags) ctlDir() string {
	if lf.qmpDir != "" {
		return lf.qmpDir
	}
	return defaultCtlDir
}

func (lf *liveFlags) ctlPath() string { return filepath.Join(lf.ctlDir(), lf.domain+".bak") }

// viaQMPSocket says whether -qmp-dir holds a socket for the VM.
func (lf *liveFlags) viaQMPSocket() bool {
	if lf.qmpDir == "" {
		return false
	}
	fi, err := os.Stat(lf.qmpPath())
	return err == nil && fi.Mode().Type() == os.ModeSocket
}

// dialMonitor connects to the VM's monitor: its QMP socket when -qmp-dir
// holds one, else libvirt. wait bounds the QMP greeting (QEMU greets a
// second client only when the first leaves) or libvirt's connection.
func (lf *liveFlags) dialMonitor(ctx context.Context, wait time.Duration) (qmp.Monitor, error) {
	dctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	if lf.viaQMPSocket() {
		return qmp.Dial(dctx, lf.qmpPath(), qmp.Options{})
	}
	m, err := libvirtqmp.Dial(dctx, libvirtqmp.Options{Socket: lf.libvirtSock, Domain: lf.domain})
	if err != nil {
		if lf.qmpDir != "" {
			return nil, fmt.Errorf("no QMP socket %s, and through libvirt: %w", lf.qmpPath(), err)
		}
		return nil, err
	}
	return m, nil
}

// qemuOwner is the user QEMU runs as, to whom the target files go (QEMU
// opens them): the QMP socket's peer, or the DAC label libvirt gave the
// domain. nil when it cannot be told (the files then stay ours).
func (lf *liveFlags) qemuOwner(ctx context.Context, mon qmp.Monitor, log *slog.Logger) *livebackup.Owner {
	var uid, gid int
	var err error
	if c, ok := mon.(*qmp.Client); ok {
		uid, gid, err = c.PeerCred()
	} else {
		cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		uid, gid, err = libvirtqmp.QEMUUser(cctx, libvirtqmp.Options{Socket: lf.libvirtSock, Domain: lf.domain})
	}
	if err != nil {
		log.Warn("cannot tell which user QEMU runs as; target files stay ours", "err", err)
		return nil
	}
	return &livebackup.Owner{UID: uid, GID: gid}
}

// runLive connects, starts the control socket, runs the engine over
// drives and tidies up.
func (g *globals) runLive(ctx context.Context, lf *liveFlags, drives []livebackup.Drive) ([]livebackup.Result, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	// The monitor's greeting and capabilities round trip overlap with
	// taking the lock and the control socket (a few ms of a small
	// incremental's fixed cost). Connecting changes nothing in QEMU, and
	// the engine starts only once both are done; a call that loses the
	// lock drops its connection at once.
	type dialed struct {
		mon qmp.Monitor
		err error
	}
	dc := make(chan dialed, 1)
	go func() {
		m, err := lf.dialMonitor(ctx, 30*time.Second)
		dc <- dialed{m, err}
	}()
	stop, err := listenControl(ctx, lf.ctlPath(), drives, cancel)
	if err != nil {
		cancel(err) // a dial still waiting for the greeting gives up
		if d := <-dc; d.err == nil {
			d.mon.Close()
		}
		return nil, err
	}
	defer stop()
	d := <-dc
	if d.err != nil {
		return nil, d.err
	}
	mon := d.mon
	defer mon.Close()
	log := slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	eng, err := livebackup.New(livebackup.Options{Monitor: mon, Progress: func(p int) {
		_ = g.pct.report(p)
		if g.onLivePct != nil {
			g.onLivePct(p)
		}
	},
		TargetOwner: lf.qemuOwner(ctx, mon, log),
		Logger:      log})
	if err != nil {
		return nil, err
	}
	res, err := eng.Backup(ctx, drives)
	if err != nil {
		if c := context.Cause(ctx); c != nil && ctx.Err() != nil {
			return nil, c
		}
		return nil, err
	}
	for _, r := range res {
		if r.FellBack != "" {
			fmt.Fprintf(g.stderr, "imagestore: %s: full instead of incremental: %s\n", r.Node, r.FellBack)
		}
	}
	return res, nil
}

// errStopped is the cause a stopbak gives the running backup.
var errStopped = errors.New("backup stopped by stopbak")

// listenControl serves the control socket of a running backup: a line
// "stop" or "stop NODE" cancels it (when NODE is one of its drives); the
// reply "stopped" is written once the engine has rolled back.
//
// One backup of a VM at a time: path+".lock" is flocked for the backup's
// life (the kernel drops the lock when the process dies, so a stale socket
// is only ever removed by the lock's holder). The socket is mode 0600:
// whoever can connect can stop the backup.
func listenControl(ctx context.Context, path string, drives []livebackup.Drive, cancel context.CancelCauseFunc) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	lock, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("control lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: another backup of this VM is running (%s)", livebackup.ErrBusy, path)
		}
		return nil, fmt.Errorf("control lock %s.lock: %w", path, err)
	}
	ln, err := listenPrivate(path)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	finished := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				line, _ := bufio.NewReader(c).ReadString('\n')
				f := strings.Fields(line)
				if len(f) == 0 || f[0] != "stop" {
					fmt.Fprintln(c, "error: unknown request")
					return
				}
				match := len(f) == 1
				for _, d := range drives {
					if len(f) > 1 && d.Node == f[1] {
						match = true
					}
				}
				if !match {
					fmt.Fprintln(c, "not running")
					return
				}
				cancel(errStopped)
				<-finished
				fmt.Fprintln(c, "stopped")
			}()
		}
	}()
	return func() {
		close(finished)
		ln.Close()
		wg.Wait()
		_ = os.Remove(path)
		lock.Close() // releases the flock; the lock file stays (removing it would race)
	}, nil
}

// listenPrivate listens on a unix socket at path that only its owner can
// connect to: the socket is made in a fresh 0700 directory beside path,
// set to 0600 and renamed into place, so it is never reachable with the
// umask's mode. A socket already at path (left by a holder of the lock
// that died) is replaced.
func listenPrivate(path string) (net.Listener, error) {
	dir, err := os.MkdirTemp(filepath.Dir(path), ".bak-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false) // the caller removes path
	if err := os.Chmod(tmp, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// parseTarget reads a -dest / -destdir value: a path or nbd://HOST:P1[,P2…].
func parseNBD(s string) (host string, ports []int, ok bool, err error) {
	rest, isNBD := strings.CutPrefix(s, "nbd://")
	if !isNBD {
		return "", nil, false, nil
	}
	i := strings.LastIndex(rest, ":")
	if i <= 0 {
		return "", nil, true, fmt.Errorf("bad NBD target %q (nbd://HOST:PORT[,PORT…])", s)
	}
	host = strings.Trim(rest[:i], "[]")
	for _, p := range strings.Split(rest[i+1:], ",") {
		n, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil || n <= 0 || n > 65535 {
			return "", nil, true, fmt.Errorf("bad NBD port %q in %q", p, s)
		}
		ports = append(ports, n)
	}
	return host, ports, true, nil
}

func parseSpeed(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" || strings.EqualFold(s, "None") {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad speed %q (bytes per second, 0 = unlimited)", s)
	}
	return n, nil
}

// cmdBackup is Z7: one drive; prints the mode that ran.
func cmdBackup(ctx context.Context, g *globals, args []string) error {
	var lf liveFlags
	var bitmap, dest, drive, mode, speed string
	fs := g.liveFlagSet("backup", &lf)
	fs.StringVar(&bitmap, "bitmap", "", "dirty-bitmap name BM")
	fs.StringVar(&dest, "dest", "", "target qcow2 file, or nbd://HOST:PORT")
	fs.StringVar(&drive, "drive", "", "QEMU drive/node name")
	fs.StringVar(&mode, "mode", "auto", "full, top or auto")
	fs.StringVar(&speed, "speed", "0", "bytes per second, 0 = unlimited")
	if pos, err := parseArgs(fs, args); err != nil {
		return err
	} else if len(pos) != 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if err := lf.check(); err != nil {
		return err
	}
	if bitmap == "" || dest == "" || drive == "" {
		return usageErr("backup needs -bitmap, -dest and -drive")
	}
	m, err := livebackup.ParseMode(mode)
	if err != nil {
		return usageErr("%v", err)
	}
	sp, err := parseSpeed(speed)
	if err != nil {
		return usageErr("%v", err)
	}
	d := livebackup.Drive{Node: drive, Bitmap: bitmap, Mode: m, Speed: sp}
	host, ports, isNBD, err := parseNBD(dest)
	switch {
	case err != nil:
		return usageErr("%v", err)
	case isNBD && len(ports) != 1:
		return usageErr("-dest %s: one port expected", dest)
	case isNBD:
		d.Target = livebackup.Target{NBDHost: host, NBDPort: ports[0]}
	default:
		d.Target = livebackup.Target{File: dest}
	}
	res, err := g.runLive(ctx, &lf, []livebackup.Drive{d})
	if err != nil {
		return err
	}
	fmt.Fprintln(g.stdout, res[0].Mode)
	return nil
}

type batResult struct {
	BackupFile string `json:"backupFile"`
	Mode       string `json:"mode,omitempty"`
}

// destDrives assigns targets: a directory gets a fresh <32 hex>.qcow2 per
// drive, nbd://H:P1,P2… gives the i-th drive the i-th port.
func destDrives(destdir string, drives []livebackup.Drive) (map[string]string, error) {
	names := map[string]string{}
	host, ports, isNBD, err := parseNBD(destdir)
	if err != nil {
		return nil, usageErr("%v", err)
	}
	if isNBD {
		if len(ports) != len(drives) {
			return nil, usageErr("%d drives but %d NBD ports in %s", len(drives), len(ports), destdir)
		}
		for i := range drives {
			drives[i].Target = livebackup.Target{NBDHost: host, NBDPort: ports[i]}
			names[drives[i].Node] = ""
		}
		return names, nil
	}
	if st, err := os.Stat(destdir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("-destdir %s is not a directory", destdir)
	}
	for i := range drives {
		var b [16]byte
		_, _ = rand.Read(b[:])
		name := hex.EncodeToString(b[:]) + ".qcow2"
		drives[i].Target = livebackup.Target{File: filepath.Join(destdir, name)}
		names[drives[i].Node] = name
	}
	return names, nil
}

// batchVerb is what batbak and battopbak differ in: the -args tuple,
// whether NBD targets are allowed and whether the output names the mode.
type batchVerb struct {
	name, destHelp, argsHelp string
	arity                    int
	nbd, printMode           bool
	drive                    func(f []string) (livebackup.Drive, error)
}

// cmdBatbak is Z8: every drive in one transaction.
func cmdBatbak(ctx context.Context, g *globals, args []string) error {
	return g.runBatch(ctx, args, batchVerb{
		name: "batbak", destHelp: "target directory, or nbd://HOST:P1,P2,…",
		argsHelp: "BM,MODE,NODE,SPEED", arity: 4, nbd: true, printMode: true,
		drive: func(f []string) (livebackup.Drive, error) {
			m, err := livebackup.ParseMode(f[1])
			if err != nil {
				return livebackup.Drive{}, err
			}
			sp, err := parseSpeed(f[3])
			return livebackup.Drive{Bitmap: f[0], Mode: m, Node: f[2], Speed: sp}, err
		},
	})
}

// cmdBattopbak is Z9: the top layer of each drive, no bitmap.
func cmdBattopbak(ctx context.Context, g *globals, args []string) error {
	return g.runBatch(ctx, args, batchVerb{
		name: "battopbak", destHelp: "target directory", argsHelp: "NODE,SPEED", arity: 2,
		drive: func(f []string) (livebackup.Drive, error) {
			sp, err := parseSpeed(f[1])
			return livebackup.Drive{Node: f[0], Mode: livebackup.Shallow, Speed: sp}, err
		},
	})
}

// runBatch parses a batch verb's flags and -args tuples, backs up every
// drive in one transaction and prints {"<NODE>": {"backupFile", "mode"}}.
func (g *globals) runBatch(ctx context.Context, args []string, v batchVerb) error {
	var lf liveFlags
	var destdir, list string
	fs := g.liveFlagSet(v.name, &lf)
	fs.StringVar(&destdir, "destdir", "", v.destHelp)
	fs.StringVar(&list, "args", "", v.argsHelp+"[:"+v.argsHelp+"…] (SPEED in bytes/s)")
	if pos, err := parseArgs(fs, args); err != nil {
		return err
	} else if len(pos) != 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if err := lf.check(); err != nil {
		return err
	}
	if destdir == "" || list == "" {
		return usageErr("%s needs -destdir and -args", v.name)
	}
	var drives []livebackup.Drive
	for _, tup := range strings.Split(list, ":") {
		f := strings.Split(tup, ",")
		if len(f) != v.arity {
			return usageErr("-args tuple %q: want %s", tup, v.argsHelp)
		}
		d, err := v.drive(f)
		if err != nil {
			return usageErr("%v", err)
		}
		drives = append(drives, d)
	}
	if !v.nbd && strings.HasPrefix(destdir, "nbd://") {
		return usageErr("%s writes into a directory", v.name)
	}
	names, err := destDrives(destdir, drives)
	if err != nil {
		return err
	}
	res, err := g.runLive(ctx, &lf, drives)
	if err != nil {
		return err
	}
	out := map[string]batResult{}
	for _, r := range res {
		b := batResult{BackupFile: names[r.Node]}
		if v.printMode {
			b.Mode = string(r.Mode)
		}
		out[r.Node] = b
	}
	return json.NewEncoder(g.stdout).Encode(out)
}

// cmdStopbak is Z10: stop the VM's running backup (all of it, or the call
// that backs up -drive) and exit 0, also when nothing runs.
func cmdStopbak(ctx context.Context, g *globals, args []string) error {
	var lf liveFlags
	var drive string
	fs := g.liveFlagSet("stopbak", &lf)
	fs.StringVar(&drive, "drive", "", "stop only the backup of this drive")
	fs.Bool("force", false, "True|False|None (accepted; jobs are always cancelled at once)")
	fs.Bool("batbak", false, "accepted: the batch backup is stopped as a whole")
	if pos, err := parseArgs(fs, args); err != nil {
		return err
	} else if len(pos) != 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if lf.domain == "" {
		return usageErr("-domain is required")
	}
	if err := lf.check(); err != nil {
		return err
	}
	// A running backup holds the QMP socket; ask it through its control socket.
	if c, err := net.DialTimeout("unix", lf.ctlPath(), 2*time.Second); err == nil {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Minute))
		fmt.Fprintf(c, "stop %s\n", drive)
		reply, _ := io.ReadAll(c)
		if r := strings.TrimSpace(string(reply)); r != "stopped" && r != "not running" {
			return fmt.Errorf("the running backup answered %q", r)
		}
		return nil
	}
	// Nothing listens: clean up jobs a dead backup left in QEMU, if any.
	mon, err := lf.dialMonitor(ctx, 5*time.Second)
	if err != nil {
		fmt.Fprintf(g.stderr, "imagestore stopbak: %v; nothing to stop\n", err)
		return nil
	}
	defer mon.Close()
	eng, err := livebackup.New(livebackup.Options{Monitor: mon})
	if err != nil {
		return err
	}
	if _, err := eng.StopStray(ctx, drive); err != nil && !errors.Is(err, livebackup.ErrNoNode) {
		return err
	}
	return nil
}

// cmdBakconfirm tells the engine the store holds the newest backup of
// each listed drive, so the next incremental holds only what changed
// since it (without it, incrementals hold every write since the last
// confirmed backup, or the first).
func cmdBakconfirm(ctx context.Context, g *globals, args []string) error {
	var lf liveFlags
	var list string
	fs := g.liveFlagSet("bakconfirm", &lf)
	fs.StringVar(&list, "args", "", "BM,NODE[:BM,NODE…]")
	if pos, err := parseArgs(fs, args); err != nil {
		return err
	} else if len(pos) != 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if err := lf.check(); err != nil {
		return err
	}
	if list == "" {
		return usageErr("bakconfirm needs -args")
	}
	mon, err := lf.dialMonitor(ctx, 30*time.Second)
	if err != nil {
		return err
	}
	defer mon.Close()
	eng, err := livebackup.New(livebackup.Options{Monitor: mon})
	if err != nil {
		return err
	}
	for _, tup := range strings.Split(list, ":") {
		f := strings.Split(tup, ",")
		if len(f) != 2 {
			return usageErr("-args tuple %q: want BM,NODE", tup)
		}
		if err := eng.Confirm(ctx, f[1], f[0]); err != nil {
			return err
		}
	}
	return nil
}

// liveCommands are the live-backup verbs for the dispatch table.
func liveCommands() []command {
	return []command{
		{"backup", "backup -bitmap BM -dest FILE|nbd://H:P -domain VM -drive NODE -mode full|top|auto [-speed B/s] [-point-in-time] [-oob] [-qmp-dir DIR] [-libvirt-sock PATH]", cmdBackup, faceBoth},
		{"batbak", "batbak -domain VM -destdir DIR|nbd://H:P1,P2,... -args BM,MODE,NODE,SPEED[:...] [-point-in-time] [-oob] [-qmp-dir DIR] [-libvirt-sock PATH]", cmdBatbak, faceBoth},
		{"battopbak", "battopbak -domain VM -destdir DIR -args NODE,SPEED[:NODE,SPEED...] [-qmp-dir DIR] [-libvirt-sock PATH]", cmdBattopbak, faceBoth},
		{"stopbak", "stopbak [-force=B] -domain VM [-batbak] [-drive NODE] [-qmp-dir DIR] [-libvirt-sock PATH]", cmdStopbak, faceBoth},
		{"vm", "vm backup -domain VM [-store AGENT-URL] [-full] | vm restore -domain VM name:id[,name:id...] [-qmp-dir DIR] [-libvirt-sock PATH]", cmdVM, faceImagestore},
		{"bakconfirm", "bakconfirm -domain VM -args BM,NODE[:BM,NODE...] [-qmp-dir DIR] [-libvirt-sock PATH]", cmdBakconfirm, faceBoth},
	}
}

// Package libvirttest runs a private libvirtd for tests and a transient
// QEMU domain (type qemu, i.e. TCG, no guest OS) on it. Tests only.
//
// The daemons (virtlogd, libvirtd) run in a mount namespace of their own
// (unshare -m) where /etc/libvirt, /run/libvirt, /var/lib/libvirt,
// /var/cache/libvirt and /var/log/libvirt are bind-mounted from a
// temporary directory: the instance has its own qemu.conf (QEMU runs as
// root, as on ZStack hosts, so it can open backup targets the CLI
// creates), its own socket and state, and never touches a system
// libvirtd. systemd is not needed. Needs root.
package libvirttest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"imagestore/qcow2/qemutest"
	"imagestore/transfer/qmp"
	"imagestore/transfer/qmp/libvirtqmp"
)

const upScript = `set -e
D=$1
mount --make-rprivate /
for m in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
  mkdir -p "${m#*:}"
  mount --bind "$D/${m%%:*}" "${m#*:}"
done
virtlogd -d -p "$D/virtlogd.pid"
libvirtd -d -f /etc/libvirt/libvirtd.conf -p "$D/libvirtd.pid"
`

const libvirtdConf = `unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
`

const qemuConf = `user = "root"
group = "root"
dynamic_ownership = 0
`

// qemuConfAs runs QEMU as another user; libvirt gives it the disk images
// (dynamic ownership) and gives them back when the domain ends.
const qemuConfAs = `user = "%s"
group = "%s"
dynamic_ownership = 1
`

// DaemonOptions shape a Daemon.
type DaemonOptions struct {
	// QEMUUser and QEMUGroup are whom libvirt runs QEMU as (default root,
	// as on ZStack hosts).
	QEMUUser, QEMUGroup string
}

// Daemon is a private libvirtd.
type Daemon struct {
	Dir    string // its private tree
	Socket string // its read-write unix socket
	t      testing.TB
}

// StartDaemon starts virtlogd and libvirtd; they stop when the test ends.
func StartDaemon(t testing.TB) *Daemon {
	t.Helper()
	return StartDaemonWith(t, DaemonOptions{})
}

// StartDaemonWith is StartDaemon with options.
func StartDaemonWith(t testing.TB, o DaemonOptions) *Daemon {
	t.Helper()
	// The programs a Daemon needs; a missing one fails the test.
	for _, p := range []string{"libvirtd", "virtlogd", "unshare", "mount", "qemu-system-x86_64", "qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Fatalf("%s is required (apt-get install libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils util-linux mount): %v", p, err)
		}
	}
	if os.Geteuid() != 0 {
		t.Fatal("a private libvirtd needs root (mount namespace, QEMU as root)")
	}
	dir, err := os.MkdirTemp("", "lvd")
	if err != nil {
		t.Fatal(err)
	}
	d := &Daemon{Dir: dir, Socket: filepath.Join(dir, "run", "libvirt-sock"), t: t}
	t.Cleanup(d.stop)
	for _, s := range []string{"etc", "run", "lib", "cache", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, s), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	qconf := qemuConf
	if o.QEMUUser != "" {
		// QEMU must reach the disks and the tests' files under dir.
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		qconf = fmt.Sprintf(qemuConfAs, o.QEMUUser, o.QEMUGroup)
	}
	for n, c := range map[string]string{"etc/libvirtd.conf": libvirtdConf, "etc/qemu.conf": qconf} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("unshare", "-m", "sh", "-c", upScript, "up", dir).CombinedOutput(); err != nil {
		t.Fatalf("starting libvirtd: %v\n%s", err, out)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(d.Socket), dialers.WithLocalTimeout(2*time.Second)))
		if err := l.ConnectToURI(libvirtqmp.DefaultURI); err == nil {
			_ = l.Disconnect()
			return d
		} else if time.Now().After(deadline) {
			t.Fatalf("libvirtd did not answer on %s: %v\n%s", d.Socket, err, d.log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *Daemon) log() string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "log", "libvirtd.log"))
	return string(b)
}

// stop ends libvirtd, then virtlogd (by their pid files), waits for them
// and removes the tree (the namespace goes with its last process).
func (d *Daemon) stop() {
	for _, n := range []string{"libvirtd.pid", "virtlogd.pid"} {
		b, err := os.ReadFile(filepath.Join(d.Dir, n))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGTERM)
		for i := 0; i < 200 && syscall.Kill(pid, 0) == nil; i++ {
			time.Sleep(50 * time.Millisecond)
		}
		if syscall.Kill(pid, 0) == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	_ = os.RemoveAll(d.Dir)
}

// Domain is a running transient domain with qcow2 virtio disks
// virtio-disk0, virtio-disk1, ... (vda, vdb, ...).
type Domain struct {
	Name  string
	Files []string // the disks' qcow2 files
	d     *Daemon
	mon   *qmp.Passthrough
	t     testing.TB
}

// StartDomain creates len(sizes) empty qcow2 disks and starts a paused
// transient domain on them; it is destroyed when the test ends.
func (d *Daemon) StartDomain(name string, sizes ...int64) *Domain {
	t := d.t
	t.Helper()
	dir := filepath.Join(d.Dir, "disks-"+name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	dom := &Domain{Name: name, d: d, t: t}
	var disks strings.Builder
	for i, s := range sizes {
		f := filepath.Join(dir, fmt.Sprintf("disk%d.qcow2", i))
		qemutest.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", f, strconv.FormatInt(s, 10))
		dom.Files = append(dom.Files, f)
		fmt.Fprintf(&disks, "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='vd%c' bus='virtio'/></disk>\n", f, 'a'+i)
	}
	xml := fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    %s
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>`, name, disks.String())
	l := d.conn()
	defer l.Disconnect()
	if _, err := l.DomainCreateXML(xml, libvirt.DomainStartPaused); err != nil {
		t.Fatalf("creating domain %s: %v\n%s", name, err, d.log())
	}
	t.Cleanup(dom.destroy)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	mon, err := libvirtqmp.Dial(ctx, libvirtqmp.Options{Socket: d.Socket, Domain: name})
	if err != nil {
		t.Fatal(err)
	}
	dom.mon = mon
	return dom
}

func (d *Daemon) conn() *libvirt.Libvirt {
	d.t.Helper()
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(d.Socket)))
	if err := l.ConnectToURI(libvirtqmp.DefaultURI); err != nil {
		d.t.Fatal(err)
	}
	return l
}

func (dom *Domain) destroy() {
	if dom.mon != nil {
		dom.mon.Close()
	}
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(dom.d.Socket)))
	if err := l.ConnectToURI(libvirtqmp.DefaultURI); err != nil {
		dom.t.Errorf("destroying %s: %v", dom.Name, err)
		return
	}
	defer l.Disconnect()
	if v, err := l.DomainLookupByName(dom.Name); err == nil {
		if err := l.DomainDestroy(v); err != nil && !errors.Is(err, context.Canceled) {
			dom.t.Errorf("destroying %s: %v", dom.Name, err)
		}
	}
}

// Monitor is the harness's own monitor of the domain (through libvirt).
func (dom *Domain) Monitor() qmp.Monitor { return dom.mon }

// Write writes length bytes of pattern at off of disk as the guest would
// (HMP qemu-io on the device's backend, so dirty bitmaps see it).
func (dom *Domain) Write(disk int, off, length int64, pattern byte) {
	dom.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cl := fmt.Sprintf("qemu-io -d virtio-disk%d/virtio-backend \"write -P 0x%02x %d %d\"", disk, pattern, off, length)
	out, err := qmp.HMP(ctx, dom.mon, cl)
	if err != nil || strings.TrimSpace(out) != "" {
		dom.t.Fatalf("HMP %q: %v %q", cl, err, out)
	}
}

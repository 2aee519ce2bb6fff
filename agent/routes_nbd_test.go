package agent

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/testwait"
	"imagestore/layer"
)

// makeChain builds base <- d1 <- d2 qcow2 files with qemu-img/qemu-io and
// returns their paths (d2's chain is the source volume).
func r7makeChain(t *testing.T, dir string, size int64) []string {
	t.Helper()
	base := filepath.Join(dir, "base.qcow2")
	d1 := filepath.Join(dir, "d1.qcow2")
	d2 := filepath.Join(dir, "d2.qcow2")
	r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, r7itoa(int(size)))
	r7qemuWrite(t, base, 0x11, 0, 1<<20)
	r7qemuWrite(t, base, 0x22, 3<<20, 512<<10)
	r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, d1)
	r7qemuWrite(t, d1, 0x33, 512<<10, 1<<20)
	r7run(t, "qemu-io", "-f", "qcow2", "-c", "write -z 3145728 65536", d1)
	r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", d1, d2)
	r7qemuWrite(t, d2, 0x44, size-(128<<10), 64<<10)
	return []string{base, d1, d2}
}

func r7portClosed(port string) bool {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

func r7metricsText(t *testing.T, e *restoreEnv) string {
	t.Helper()
	res, err := http.Get(e.srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return string(b)
}

// TestRemoteTargetInstantRestore: the KVM host runs a VM read-write on
// the export (PROTOCOL D3): the guest's writes and discards are accepted
// and read back, the stored chain's blobs stay byte for byte the same,
// and remotetarget/delete stops the server and removes the overlay.
//
// It runs twice: qemu-nbd reading the blobs in place, and, on a store
// without local blob paths (S3), over the agent's own chain server.
func TestRemoteTargetInstantRestore(t *testing.T) {
	t.Parallel()
	for _, paths := range []bool{true, false} {
		t.Run(fmt.Sprintf("paths=%v", paths), func(t *testing.T) {
			t.Parallel()
			testRemoteTargetInstantRestore(t, paths)
		})
	}
}

func testRemoteTargetInstantRestore(t *testing.T, paths bool) {
	r7requireTools(t, "qemu-img", "qemu-io", "qemu-nbd")
	e := newRestoreEnvPaths(t, func(c *config.Config) { c.NBD.ClientAuth = "none" }, paths)
	files := r7makeChain(t, e.dir, 8<<20)
	imgs := e.importChain(t, "vol", files...)
	top := imgs[2]
	chainSums := func() map[string]string {
		t.Helper()
		out := map[string]string{}
		for _, img := range imgs {
			b, err := e.store.OpenBlob(context.Background(), img.Blob)
			if err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			if _, err := io.Copy(h, io.NewSectionReader(b, 0, b.Size())); err != nil {
				t.Fatal(err)
			}
			_ = b.Close()
			out[img.Blob.String()] = fmt.Sprintf("%x", h.Sum(nil))
		}
		return out
	}
	chainSockets := func() []os.DirEntry {
		t.Helper()
		ents, err := os.ReadDir(filepath.Join(e.a.root, "nbd", "chains"))
		if err != nil {
			t.Fatal(err)
		}
		return ents
	}
	before := chainSums()

	rep := e.ok(t, "/imagestore/export/remotetarget-sync", map[string]any{"installPath": top.InstallPath(), "remoteTargetType": "NBD", "hostname": "127.0.0.1"})
	uri, _ := rep["targetUri"].(string)
	pu, err := url.Parse(uri)
	if err != nil || pu.Scheme != "nbd" || pu.Hostname() != "127.0.0.1" || pu.Port() == "" {
		t.Fatalf("targetUri %q: %v", uri, err)
	}
	export := strings.TrimPrefix(pu.Path, "/")
	if export == "" || strings.ContainsAny(export, "/?&#%+ ") || rep["tls"] != false {
		t.Fatalf("export name %q in %v", export, rep)
	}
	// The guest sees the stored chain.
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, files[2])
	if n := len(chainSockets()); n != map[bool]int{true: 0, false: 1}[paths] {
		t.Fatalf("paths=%v: %d chain servers", paths, n)
	}
	if m := r7metricsText(t, e); !strings.Contains(m, `imagestore_agent_nbd_servers{kind="remote"} 1`) {
		t.Fatalf("metrics lack the remote server:\n%s", r7grepLines(m, "nbd"))
	}
	// The VM writes and discards (libvirt: driver discard='unmap'), and
	// reads back its own writes.
	r7run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x99 0 1048576", "-c", "discard 3145728 524288",
		"-c", "write -z 6291456 65536", "-c", "flush", "-c", "read -P 0x99 0 1048576", "-c", "read -P 0 3145728 524288", uri)
	want := filepath.Join(e.dir, "want.qcow2")
	r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", files[2], want)
	r7run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 1048576", "-c", "write -z 3145728 524288", "-c", "write -z 6291456 65536", want)
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, want)
	// The stored chain did not change: every blob hashes as before, and
	// the image still reads as it was stored.
	if after := chainSums(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("stored blobs changed under guest writes:\n%v\n%v", before, after)
	}
	flat := filepath.Join(e.dir, "flat.raw")
	r7flattenTo(t, e, top.InstallPath(), flat)
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", flat, files[2])

	// While served, GC cannot free the chain even once its records go.
	ctx := context.Background()
	if err := e.store.DeleteImage(ctx, top.Ref); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.GC(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if !e.store.Exists(top.Blob) {
		t.Fatal("GC freed a served blob")
	}
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, want)

	port := pu.Port()
	del := e.ok(t, "/imagestore/remotetarget/delete-sync", map[string]any{"targetUri": uri})
	if r7num(del["deleted"]) != 1 {
		t.Fatalf("delete: %v", del)
	}
	testwait.For(t, "server to stop", func() bool { return r7portClosed(port) })
	if left, err := os.ReadDir(filepath.Join(e.a.root, "nbd", "overlays")); err != nil || len(left) != 0 {
		t.Fatalf("overlay left after delete: %v %v", left, err)
	}
	if left := chainSockets(); len(left) != 0 {
		t.Fatalf("chain server left after delete: %v", left)
	}
	if del := e.ok(t, "/imagestore/remotetarget/delete-sync", map[string]any{"targetUri": uri}); r7num(del["deleted"]) != 0 {
		t.Fatalf("second delete: %v", del)
	}
	if _, err := e.store.GC(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if e.store.Exists(top.Blob) {
		t.Fatal("blob still held after the target was deleted")
	}
}

func r7num(v any) int64 {
	f, _ := v.(float64)
	return int64(f)
}

func r7grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestRemoteTargetErrors(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-nbd")
	e := newRestoreEnv(t, nil)
	raw, err := e.a.layers.Commit(context.Background(), layer.Spec{
		Record: layer.Record{Ref: blobstore.Ref{Name: "dump", ID: "1"}, Format: "gzip"},
		Reader: strings.NewReader("opaque"), Size: 6,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		body map[string]any
		want string
	}{
		{"no installPath", map[string]any{"hostname": "h"}, "missing field installPath"},
		{"unknown image", map[string]any{"installPath": "zstore://vol/nope"}, "no such image"},
		{"bad type", map[string]any{"installPath": "zstore://vol/x", "remoteTargetType": "iSCSI"}, "not supported"},
		{"opaque blob", map[string]any{"installPath": raw.InstallPath()}, "only qcow2"},
		{"bad hostname", map[string]any{"installPath": raw.InstallPath(), "hostname": "a/b"}, "not a host name"},
	} {
		t.Run(c.name, func(t *testing.T) { e.fails(t, "/imagestore/export/remotetarget-sync", c.body, c.want) })
	}
	e.fails(t, "/imagestore/remotetarget/delete-sync", map[string]any{"targetUri": "http://x/y"}, "not an nbd://")
	e.fails(t, "/imagestore/remotetarget/delete-sync", map[string]any{}, "missing field targetUri")
}

// TestNBDTargetBackupThenImport follows a single-volume NBD backup as the
// management node and a KVM host run it (PROTOCOL C3, C5): the targets are
// entries directly in the workspace, the host writes over NBD (data, and
// zeros over the parent's data with write -z), then swaps the workspace
// entry for something else through its sshfs mount, and import-backup of
// <uploadDir>/<basename(imagePaths[0])> with processToRelease stores what
// was written over NBD: the zeros as zeros, not as "unchanged".
func TestNBDTargetBackupThenImport(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io", "qemu-nbd")
	e := newRestoreEnv(t, func(c *config.Config) { c.NBD.ClientAuth = "none" })
	const size = 4 << 20
	files := r7makeChain(t, e.dir, size)
	parent := e.importChain(t, "vol", files[0])[0]
	up := e.uploadDir(t)
	ws := filepath.Join(up, "vm-1")
	if err := os.Mkdir(ws, 0o755); err != nil {
		t.Fatal(err)
	}

	rep := e.ok(t, "/imagestore/exportnbdimage-sync", map[string]any{"workspace": ws, "sizes": []any{size, 1 << 20}})
	desc, _ := rep["nbdDescription"].(string)
	paths, _ := rep["imagePaths"].([]any)
	ports, _ := rep["ports"].([]any)
	if desc == "" || len(paths) != 2 || len(ports) != 2 || rep["tls"] != false || rep["psk"] != nil {
		t.Fatalf("exportnbdimage reply %v", rep)
	}
	target := paths[0].(string)
	port := r7itoa(int(r7num(ports[0])))
	for _, p := range paths {
		if filepath.Dir(p.(string)) != ws {
			t.Fatalf("target %s not directly in the workspace %s", p, ws)
		}
	}
	if fi, err := os.Lstat(target); err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("workspace entry %s: %v", target, err)
	}
	if _, ok := e.a.nbdTargetPath(target); ok {
		t.Fatal("a served target counts as released")
	}
	if m := r7metricsText(t, e); !strings.Contains(m, `imagestore_agent_nbd_servers{kind="target"} 2`) {
		t.Fatalf("metrics lack the targets:\n%s", r7grepLines(m, "nbd"))
	}
	// The host's backup job over plain NBD: new data, and zeros where the
	// parent has data (0x11 in its first MiB).
	nbdURL := "nbd://127.0.0.1:" + port
	r7run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 2097152 65536", "-c", "write -z 0 524288", nbdURL)
	// Through sshfs the host replaces the entry the management node will
	// name; the agent must not read it.
	single := filepath.Join(up, filepath.Base(target)) // <uploadDir>/<basename>, as the MN sends it
	if err := os.Remove(target); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc/passwd", target); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(single, []byte("not the backup"), 0o644); err != nil {
		t.Fatal(err)
	}

	res := e.call(t, "/imagestore/import-backup-sync", map[string]any{
		"imgurl": single, "name": "vol", "parent": parent.InstallPath(), "processToRelease": desc, "concurrency": 4,
	})
	if !r7portClosed(port) {
		t.Fatal("import-backup did not stop the target's server")
	}
	if res["success"] != true {
		t.Fatalf("import-backup: %v", res)
	}
	want := filepath.Join(e.dir, "want.qcow2")
	r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", files[0], want)
	r7run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 2097152 65536", "-c", "write -z 0 524288", want)
	flat := filepath.Join(e.dir, "flat.raw")
	r7flattenTo(t, e, res["installPath"].(string), flat)
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", flat, want)
	// The stored layer records the zeros as zero clusters over the parent.
	img, err := e.a.images.Lookup(context.Background(), "installPath", res["installPath"].(string))
	if err != nil || img.Parent != parent.Ref.String() {
		t.Fatalf("imported %+v %v", img, err)
	}
	lp, _ := e.store.BlobPath(img.Blob)
	if m := r7run(t, "qemu-img", "map", "--output=json", "-f", "qcow2", lp); !strings.Contains(m, `"start": 0, "length": 524288, "depth": 0, "present": true, "zero": true, "data": false`) {
		t.Fatalf("zero writes not recorded as zero clusters:\n%s", m)
	}
	// The second target of the group was released too and resolves to
	// the private file, not to the workspace entry.
	p2, ok := e.a.nbdTargetPath("file://" + paths[1].(string))
	if !ok || p2 == paths[1].(string) || !strings.HasPrefix(p2, filepath.Join(e.a.root, "nbd", "targets")+"/") {
		t.Fatalf("released target not recognised: %q %v", p2, ok)
	}
	if _, ok := e.a.nbdTargetPath(files[0]); ok {
		t.Fatal("an arbitrary file counts as a released target")
	}
	// Outside the upload dirs a target's name is refused.
	e.fails(t, "/imagestore/import-backup-sync", map[string]any{"imgurl": filepath.Join(e.dir, filepath.Base(paths[1].(string))), "name": "vol"}, "escapes the upload dirs")
	// Retrying the release (a retried import) is harmless.
	if err := e.a.releaseProcess(desc); err != nil {
		t.Fatal(err)
	}
}

// flattenTo writes the stored chain of installPath as a raw file.
func r7flattenTo(t *testing.T, e *restoreEnv, installPath, dst string) {
	t.Helper()
	img, err := e.a.images.Lookup(context.Background(), "installPath", installPath)
	if err != nil {
		t.Fatal(err)
	}
	p, err := e.store.BlobPath(img.Blob)
	if errors.Is(err, blobstore.ErrNoLocalPath) {
		// No file for qemu-img: the agent's own raw export of the image.
		exp, err := e.a.exports.Create(context.Background(), jobs.Nop{}, img, "raw")
		if err != nil {
			t.Fatal(err)
		}
		_, f, err := e.a.exports.Open(exp.Token, exp.File)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		r7run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", f.Name(), dst)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	r7run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", p, dst)
}

// writePattern writes n bytes: data with zero runs, derived from seed.
func r7writePattern(t *testing.T, path string, n int, seed byte) {
	t.Helper()
	b := make([]byte, n)
	for i := range b {
		if (i>>16)%3 == 1 {
			continue // 64 KiB zero runs
		}
		b[i] = byte(i*31>>3) ^ seed
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestNBDTargetsCancelExpireConfine(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-nbd")
	e := newRestoreEnv(t, nil)
	up := e.uploadDir(t)
	outside := t.TempDir()
	for _, c := range []struct{ name, ws, want string }{
		{"outside", outside, "not inside an upload dir"},
		{"escape", up + "/../..", "not inside an upload dir"},
		{"uploads root", e.a.uploads.Root(), "not inside an upload dir"},
		{"relative", "u-x", "not an absolute path"},
		{"missing", up + "/nope", "no such file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e.fails(t, "/imagestore/exportnbdimage-sync", map[string]any{"workspace": c.ws, "sizes": []any{1 << 20}}, c.want)
		})
	}
	e.fails(t, "/imagestore/exportnbdimage-sync", map[string]any{"workspace": up}, "missing field sizes")
	e.fails(t, "/imagestore/exportnbdimage-sync", map[string]any{"workspace": up, "sizes": []any{0}}, "must be positive")

	rep := e.ok(t, "/imagestore/exportnbdimage-sync", map[string]any{"workspace": up, "sizes": []any{1 << 20}})
	target := rep["imagePaths"].([]any)[0].(string)
	port := r7itoa(int(r7num(rep["ports"].([]any)[0])))
	c := e.ok(t, "/imagestore/exportnbdimage/cancel-sync", map[string]any{"nbdDescription": rep["nbdDescription"]})
	if c["cancelled"] != true {
		t.Fatalf("cancel: %v", c)
	}
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Fatalf("cancelled target still in the workspace: %v", err)
	}
	testwait.For(t, "cancelled server to stop", func() bool { return r7portClosed(port) })
	if c := e.ok(t, "/imagestore/exportnbdimage/cancel-sync", map[string]any{"nbdDescription": rep["nbdDescription"]}); c["cancelled"] != false {
		t.Fatalf("second cancel: %v", c)
	}

	// Expiry: the group lives as long as its upload dir.
	rep = e.ok(t, "/imagestore/exportnbdimage-sync", map[string]any{"workspace": up, "sizes": []any{1 << 20}})
	target = rep["imagePaths"].([]any)[0].(string)
	e.a.nbd.Expire(context.Background(), time.Now())
	if _, err := os.Stat(target); err != nil {
		t.Fatalf("target expired early: %v", err)
	}
	e.a.nbd.Expire(context.Background(), time.Now().Add(e.a.cfg.UploadDirExpiry+time.Hour))
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Fatalf("expired target still there: %v", err)
	}
}

// TestRemoteTargetRefusesUncheckedBacking: a chain whose layer names a
// backing file other than its parent's blob (here written straight into
// the store, bypassing import and push checks) is never handed to
// qemu-nbd, which would follow the name.
func TestRemoteTargetRefusesUncheckedBacking(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-nbd")
	e := newRestoreEnv(t, nil)
	ctx := context.Background()
	put := func(file string, ref blobstore.Ref, parent string) blobstore.Image {
		t.Helper()
		f, err := os.Open(file)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		d, n, err := e.store.Put(ctx, f, -1, "")
		if err != nil {
			t.Fatal(err)
		}
		img := blobstore.Image{Ref: ref, Blob: d, Parent: parent, Size: n, Format: "qcow2", Created: time.Now()}
		if err := e.store.PutImage(ctx, img); err != nil {
			t.Fatal(err)
		}
		return img
	}
	base := filepath.Join(e.dir, "base.qcow2")
	r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
	b := put(base, blobstore.Ref{Name: "evil", ID: "base"}, "")
	for i, c := range []struct{ backing, fmt string }{
		{"/etc/passwd", "raw"},
		{`json:{"driver":"file","filename":"/etc/passwd"}`, "raw"},
		{blobstore.BackingName(b.Blob), "raw"},
	} {
		top := filepath.Join(e.dir, "top"+r7itoa(i)+".qcow2")
		r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", c.backing, "-F", c.fmt, top, "1M")
		img := put(top, blobstore.Ref{Name: "evil", ID: "top" + r7itoa(i)}, b.Ref.String())
		e.fails(t, "/imagestore/export/remotetarget-sync", map[string]any{"installPath": img.InstallPath(), "hostname": "127.0.0.1"}, "cannot be served over NBD")
	}
	// A standalone image that names a backing file is refused too.
	lone := filepath.Join(e.dir, "lone.qcow2")
	r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", lone, "1M")
	img := put(lone, blobstore.Ref{Name: "evil", ID: "lone"}, "")
	e.fails(t, "/imagestore/export/remotetarget-sync", map[string]any{"installPath": img.InstallPath(), "hostname": "127.0.0.1"}, "cannot be served over NBD")
	if err := e.a.nbd.Err(); err != nil || len(e.a.nbd.Servers()) != 0 {
		t.Fatalf("servers running after refusals: %v %v", e.a.nbd.Servers(), err)
	}
}

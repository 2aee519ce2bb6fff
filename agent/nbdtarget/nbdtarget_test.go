package nbdtarget

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"imagestore/agent/config"
	"imagestore/agent/jobs"
	"imagestore/agent/uploads"
	"imagestore/blobstore"
	"imagestore/internal/testwait"
	"imagestore/layer"
	"imagestore/qcow2"
)

func TestPrepareTLS(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	block := func(typ, body string) string {
		return "-----BEGIN " + typ + "-----\n" + body + "\n-----END " + typ + "-----\n"
	}
	leaf, ca := block("CERTIFICATE", "bGVhZg=="), block("CERTIFICATE", "Y2E=")
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	key := write("key.pem", block("PRIVATE KEY", "a2V5"))
	// A key block before the leaf is not the leaf.
	chain := write("chain.pem", block("EC PARAMETERS", "cA==")+leaf+ca)
	out := filepath.Join(dir, "tls")
	if err := prepareTLS(out, chain, key); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(out, "ca-cert.pem")); err != nil || string(b) != ca {
		t.Fatalf("ca-cert.pem = %q, %v; want the CA only", b, err)
	}
	for name, want := range map[string]string{"server-cert.pem": chain, "server-key.pem": key} {
		if got, err := os.Readlink(filepath.Join(out, name)); err != nil || got != want {
			t.Fatalf("%s -> %q %v, want %s", name, got, err, want)
		}
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("tls dir %v %v", fi, err)
	}
	self := write("self.pem", leaf)
	if err := prepareTLS(out, self, key); err == nil || !strings.Contains(err.Error(), "issuing CA") {
		t.Fatalf("self-signed certificate: %v", err)
	}
}

func TestExportNameAndURI(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, id, want string }{
		{"vol", "abc-1", "vol:abc-1"},
		{"a b", "ID_2", "image-id-2"},
		{strings.Repeat("n", 250), "x", "image-x"},
	} {
		if got := exportName(blobstore.Image{Ref: blobstore.Ref{Name: tc.name, ID: tc.id}}); got != tc.want {
			t.Errorf("exportName(%s, %s) = %s, want %s", tc.name, tc.id, got, tc.want)
		}
	}
	if got := uri("::1", 10809, "vol:1"); got != "nbd://[::1]:10809/vol:1" {
		t.Errorf("uri = %s", got)
	}
}

func TestUnavailable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := New(Options{Dir: t.TempDir(), Config: config.NBD{PortRange: "nope"}})
	err := s.Err()
	if err == nil || !strings.Contains(err.Error(), "NBD unavailable on this agent") || !strings.Contains(err.Error(), "nbd.portRange") {
		t.Fatalf("Err = %v", err)
	}
	var p recorder
	if _, err := s.ServeChain(ctx, &p, blobstore.Image{Format: "qcow2"}, "h"); !errors.Is(err, s.err) || p.image != "" {
		t.Fatalf("ServeChain: %v (image %q)", err, p.image)
	}
	if _, err := s.CreateTargets(ctx, t.TempDir(), []int64{1 << 20}, time.Hour); !errors.Is(err, s.err) {
		t.Fatalf("CreateTargets: %v", err)
	}
	if _, err := s.CancelTargets(ctx, "nbd-x"); !errors.Is(err, s.err) {
		t.Fatalf("CancelTargets: %v", err)
	}
	if _, err := s.DeleteRemotes(ctx, "", "zstore://a/b"); !errors.Is(err, s.err) {
		t.Fatalf("DeleteRemotes: %v", err)
	}
	if err := s.ReleaseForImport(ctx, ""); err != nil {
		t.Fatalf("ReleaseForImport of nothing: %v", err)
	}
	if err := s.ReleaseForImport(ctx, "nbd-x"); !errors.Is(err, s.err) {
		t.Fatalf("ReleaseForImport: %v", err)
	}
	if _, ok := s.TargetPath("/etc/passwd"); ok || s.Servers() != nil {
		t.Fatal("an unavailable service has targets or servers")
	}
	if n := testutil.CollectAndCount(s.Collector()); n != 0 {
		t.Fatalf("collector reports %d metrics", n)
	}
	s.Expire(ctx, time.Now())
	s.Close()
	var none *Service
	if err := none.Err(); err == nil {
		t.Fatal("a nil Service is available")
	}
}

type recorder struct{ image string }

func (r *recorder) SetTotal(int64)                    {}
func (r *recorder) Add(int64)                         {}
func (r *recorder) SetImage(_, installPath, _ string) { r.image = installPath }

var _ jobs.Progress = (*recorder)(nil)

func needTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-nbd", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: %v", tool, err)
		}
	}
}

// newService starts a service on 127.0.0.1 over a random slice of ports
// below the usual ephemeral range (busy ports are skipped anyway).
func newService(t *testing.T) (*Service, *blobstore.Store) {
	t.Helper()
	needTools(t)
	root := t.TempDir()
	st, err := blobstore.Open(context.Background(), blobstore.Options{Root: root, CommitGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	base := 12000 + rand.IntN(20000)
	layers, err := layer.New(layer.Options{Blobs: st})
	if err != nil {
		t.Fatal(err)
	}
	up, err := uploads.New(uploads.Options{Root: filepath.Join(root, "uploads"), Expiry: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	s := New(Options{Dir: filepath.Join(root, "nbd"), Config: config.NBD{PortRange: fmt.Sprintf("%d-%d", base, base+100), Bind: "127.0.0.1"}, Layers: layers, Uploads: up})
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		_ = st.Close()
	})
	return s, st
}

func put(t *testing.T, st *blobstore.Store, ref blobstore.Ref, parent string, data []byte, format string) blobstore.Image {
	t.Helper()
	ctx := context.Background()
	d, n, err := st.Put(ctx, bytes.NewReader(data), int64(len(data)), "")
	if err != nil {
		t.Fatal(err)
	}
	img := blobstore.Image{Ref: ref, Blob: d, Parent: parent, Size: n, Format: format, Created: time.Now()}
	if err := st.PutImage(ctx, img); err != nil {
		t.Fatal(err)
	}
	return img
}

func qcowLayer(t *testing.T, size int64, backing string, fill byte, off int64) []byte {
	t.Helper()
	guest := make([]byte, size)
	for i := off; i < off+64<<10; i++ {
		guest[i] = fill
	}
	var b bytes.Buffer
	ext := []qcow2.Extent{{Offset: off, Length: 64 << 10, Kind: qcow2.Data}}
	if _, err := qcow2.Write(context.Background(), &b, size, ext, bytes.NewReader(guest), qcow2.WriteOptions{BackingFile: backing}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func portClosed(port int) bool {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

func TestServeChainHoldsUntilDeleted(t *testing.T) {
	t.Parallel()
	s, st := newService(t)
	ctx := context.Background()
	base := put(t, st, blobstore.Ref{Name: "vol", ID: "base"}, "", qcowLayer(t, 1<<20, "", 0x11, 0), "qcow2")
	top := put(t, st, blobstore.Ref{Name: "vol", ID: "top"}, base.Ref.String(), qcowLayer(t, 1<<20, blobstore.BackingName(base.Blob), 0x22, 512<<10), "qcow2")
	opaque := put(t, st, blobstore.Ref{Name: "dump", ID: "1"}, "", []byte("opaque"), "gzip")

	var p recorder
	if _, err := s.ServeChain(ctx, &p, opaque, "127.0.0.1"); err == nil || !strings.Contains(err.Error(), "only qcow2") || p.image != "" {
		t.Fatalf("ServeChain of an opaque blob: %v (image %q)", err, p.image)
	}
	evil := put(t, st, blobstore.Ref{Name: "vol", ID: "evil"}, base.Ref.String(), qcowLayer(t, 1<<20, "/etc/passwd", 0x33, 0), "qcow2")
	if _, err := s.ServeChain(ctx, &p, evil, "127.0.0.1"); !errors.Is(err, layer.ErrInvalid) || !strings.Contains(err.Error(), "cannot be served over NBD") {
		t.Fatalf("ServeChain of a layer naming another backing file: %v", err)
	}
	if len(s.Servers()) != 0 {
		t.Fatal("a refused chain is served")
	}
	if err := st.DeleteImage(ctx, evil.Ref); err != nil {
		t.Fatal(err)
	}
	rt, err := s.ServeChain(ctx, &p, top, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("nbd://127.0.0.1:%d/vol:top", rt.Server.Port); rt.URI != want || rt.InstallPath != top.InstallPath() || p.image != top.InstallPath() {
		t.Fatalf("remote %+v, want URI %s", rt, want)
	}
	if out, err := exec.Command("qemu-img", "info", rt.URI).CombinedOutput(); err != nil || !strings.Contains(string(out), "1 MiB") {
		t.Fatalf("qemu-img info %s: %v\n%s", rt.URI, err, out)
	}
	// Another restore of the same image is another export with its own
	// overlay (two guests never share writes).
	again, err := s.ServeChain(ctx, &p, top, "other-host")
	if err != nil || again.Server.ID == rt.Server.ID || again.Server.Path == rt.Server.Path || !strings.HasPrefix(again.URI, "nbd://other-host:") {
		t.Fatalf("serving a served image again: %+v %v", again, err)
	}
	if err := testutil.CollectAndCompare(s.Collector(), strings.NewReader(expectServers(0, 2))); err != nil {
		t.Fatal(err)
	}
	if n, err := s.DeleteRemotes(ctx, again.URI, ""); n != 1 || err != nil {
		t.Fatalf("delete of the second export: %d %v", n, err)
	}
	if _, err := os.Stat(again.Server.Path); !os.IsNotExist(err) {
		t.Fatalf("overlay kept after delete: %v", err)
	}
	// Held while served, even once the records are gone.
	for _, img := range []blobstore.Image{top, base} {
		if err := st.DeleteImage(ctx, img.Ref); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.GC(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if !st.Exists(top.Blob) || !st.Exists(base.Blob) {
		t.Fatal("GC freed a served chain")
	}
	if n, err := s.DeleteRemotes(ctx, "", "zstore://vol/other"); n != 0 || err != nil {
		t.Fatalf("delete of another image: %d %v", n, err)
	}
	if n, err := s.DeleteRemotes(ctx, fmt.Sprintf("nbd://elsewhere:%d/vol:top", rt.Server.Port), top.InstallPath()); n != 1 || err != nil {
		t.Fatalf("delete: %d %v", n, err)
	}
	if !portClosed(rt.Server.Port) || len(s.Servers()) != 0 {
		t.Fatal("server still running after delete")
	}
	if _, err := st.GC(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if st.Exists(top.Blob) {
		t.Fatal("chain still held after delete")
	}
}

// expectServers is the exposition of the servers gauge.
func expectServers(target, remote int) string {
	return fmt.Sprintf(`# HELP imagestore_agent_nbd_servers Running qemu-nbd servers by kind: target (writable backup targets) or remote (stored chain exports).
# TYPE imagestore_agent_nbd_servers gauge
imagestore_agent_nbd_servers{kind="remote"} %d
imagestore_agent_nbd_servers{kind="target"} %d
`, remote, target)
}

// workspace allocates an upload dir and returns a directory inside it.
func workspace(t *testing.T, s *Service) string {
	t.Helper()
	d, err := s.uploads.Alloc(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ws := filepath.Join(d.Path, "vm")
	if err := os.Mkdir(ws, 0o755); err != nil {
		t.Fatal(err)
	}
	return ws
}

func TestTargetsReleaseAndCancel(t *testing.T) {
	t.Parallel()
	s, _ := newService(t)
	ctx := context.Background()
	ws := workspace(t, s)
	sizes := []int64{3 << 20, 1 << 20, 2 << 20}
	g, err := s.CreateTargets(ctx, ws, sizes, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(g.Description, "nbd-") || len(g.Servers) != 3 || len(g.Paths) != 3 {
		t.Fatalf("targets %+v", g)
	}
	if err := testutil.CollectAndCompare(s.Collector(), strings.NewReader(expectServers(3, 0))); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for i, p := range g.Paths {
		// Directly in the workspace, a unique name, the same file qemu-nbd
		// serves from the private dir.
		if filepath.Dir(p) != ws || seen[filepath.Base(p)] || !strings.Contains(filepath.Base(p), g.Description) {
			t.Fatalf("imagePaths[%d] = %s (workspace %s, group %s)", i, p, ws, g.Description)
		}
		seen[filepath.Base(p)] = true
		pub, err1 := os.Lstat(p)
		priv, err2 := os.Lstat(g.Servers[i].Path)
		if err1 != nil || err2 != nil || !pub.Mode().IsRegular() || !os.SameFile(pub, priv) {
			t.Fatalf("workspace entry %s: %v %v", p, err1, err2)
		}
		// Ports in the order of the sizes: each serves a disk of its size.
		out, err := exec.Command("qemu-img", "info", "--output=json", fmt.Sprintf("nbd://127.0.0.1:%d", g.Servers[i].Port)).Output()
		if err != nil {
			t.Fatal(err)
		}
		var info struct {
			VirtualSize int64 `json:"virtual-size"`
		}
		if err := json.Unmarshal(out, &info); err != nil || info.VirtualSize != sizes[i] {
			t.Fatalf("port %d serves %d bytes (%v), want %d", g.Servers[i].Port, info.VirtualSize, err, sizes[i])
		}
		// qcow2 v3: zero writes can be recorded as zero clusters.
		f, err := os.Open(g.Servers[i].Path)
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := f.Stat()
		im, err := qcow2.Open(f, fi.Size())
		if err != nil || im.Version() != 3 {
			t.Fatalf("target %s: %v, version %d", g.Servers[i].Path, err, im.Version())
		}
		f.Close()
	}
	path := g.Paths[0]
	if _, ok := s.TargetPath(path); ok {
		t.Fatal("a served target counts as released")
	}
	if err := s.ReleaseForImport(ctx, g.Description); err != nil {
		t.Fatal(err)
	}
	if !portClosed(g.Servers[0].Port) {
		t.Fatal("release did not stop the server")
	}
	// The workspace entry (or the upload dir's, as the management node
	// names a single volume's) resolves to the private file.
	for _, p := range []string{"file://" + path, path, filepath.Join(filepath.Dir(ws), filepath.Base(path))} {
		if got, ok := s.TargetPath(p); !ok || got != g.Servers[0].Path {
			t.Fatalf("released target %s: %q %v", p, got, ok)
		}
	}
	if _, ok := s.TargetPath(filepath.Join(ws, "nbd-0123456789abcdef-0.qcow2")); ok {
		t.Fatal("an unknown target name resolves")
	}
	if err := s.ReleaseForImport(ctx, g.Description); err != nil {
		t.Fatalf("a retried release: %v", err)
	}

	g2, err := s.CreateTargets(ctx, ws, []int64{1 << 20}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := s.CancelTargets(ctx, g2.Description); !ok || err != nil {
		t.Fatalf("cancel: %v %v", ok, err)
	}
	for _, p := range []string{g2.Servers[0].Path, g2.Paths[0]} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Fatalf("cancelled target kept at %s: %v", p, err)
		}
	}
	if ok, err := s.CancelTargets(ctx, g2.Description); ok || err != nil {
		t.Fatalf("second cancel: %v %v", ok, err)
	}

	g3, err := s.CreateTargets(ctx, ws, []int64{1 << 20}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s.Expire(ctx, time.Now())
	if _, err := os.Stat(g3.Servers[0].Path); err != nil {
		t.Fatalf("target expired early: %v", err)
	}
	s.Expire(ctx, time.Now().Add(2*time.Hour))
	for _, p := range []string{g3.Servers[0].Path, g3.Paths[0]} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Fatalf("expired target kept at %s: %v", p, err)
		}
	}

	// A workspace outside the upload dirs is refused, and nothing is left
	// serving.
	if _, err := s.CreateTargets(ctx, t.TempDir(), []int64{1 << 20}, time.Hour); err == nil || !strings.Contains(err.Error(), "not inside an upload dir") {
		t.Fatalf("CreateTargets outside the upload dirs: %v", err)
	}
	testwait.For(t, "no writable server left", func() bool { w, _ := s.mgr.Count(); return w == 0 })
}

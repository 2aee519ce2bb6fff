package nbdtarget

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/agent/uploads"
	"imagestore/blobstore"
	"imagestore/blobstore/blobstoretest"
	"imagestore/internal/testwait"
	"imagestore/layer"
	"imagestore/qcow2"
)

// newNoPathService is newService over a local store whose BlobPath
// answers blobstore.ErrNoLocalPath, as a store on S3 does.
func newNoPathService(t *testing.T) (*Service, *blobstore.Store) {
	t.Helper()
	needTools(t)
	root := t.TempDir()
	local, err := blobstore.NewLocal(blobstore.LocalOptions{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	st, err := blobstore.Open(context.Background(), blobstore.Options{Root: root, Backend: blobstoretest.NoPaths(local), CommitGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	layers, err := layer.New(layer.Options{Blobs: st})
	if err != nil {
		t.Fatal(err)
	}
	up, err := uploads.New(uploads.Options{Root: filepath.Join(root, "uploads"), Expiry: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	base := 12000 + rand.IntN(20000)
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

// fill is an io.ReaderAt of one repeated byte.
type fill byte

func (f fill) ReadAt(p []byte, _ int64) (int, error) {
	for i := range p {
		p[i] = byte(f)
	}
	return len(p), nil
}

// sparseLayer is a canonical qcow2 layer of size virtual bytes holding
// 64 KiB of b at each offset in offs.
func sparseLayer(t *testing.T, size int64, backing string, b byte, offs ...int64) []byte {
	t.Helper()
	var ext []qcow2.Extent
	for _, o := range offs {
		ext = append(ext, qcow2.Extent{Offset: o, Length: 64 << 10, Kind: qcow2.Data})
	}
	var buf bytes.Buffer
	if _, err := qcow2.Write(context.Background(), &buf, size, ext, fill(b), qcow2.WriteOptions{BackingFile: backing}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// flatRaw writes the chain of img's guest view, read with our reader, as
// a sparse raw file (what a raw export of the image holds).
func flatRaw(t *testing.T, s *Service, img blobstore.Image) string {
	t.Helper()
	c, closeChain, err := s.layers.OpenChain(context.Background(), img.Ref)
	if err != nil {
		t.Fatal(err)
	}
	defer closeChain()
	p := filepath.Join(t.TempDir(), "flat.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := qcow2.FlattenRawSparse(context.Background(), f, c.Chain); err != nil {
		t.Fatal(err)
	}
	return p
}

func qemuPID(t *testing.T, s *Service, id string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.dir, id+".pid"))
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

func sockets(t *testing.T, s *Service) []string {
	t.Helper()
	ents, err := os.ReadDir(s.chainDir())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// TestServeChainWithoutPaths: on a store without local blob paths the
// chain is served by our own chain server under a qemu-nbd overlay: the
// guest sees the chain, its writes land in the overlay and never in a
// blob, and the chain server and the hold end with the export (delete,
// a crashed qemu-nbd, Close).
func TestServeChainWithoutPaths(t *testing.T) {
	t.Parallel()
	s, st := newNoPathService(t)
	ctx := context.Background()
	const size = 8 << 20
	base := put(t, st, blobstore.Ref{Name: "vol", ID: "base"}, "", sparseLayer(t, size, "", 0x11, 0, 3<<20, size-64<<10), "qcow2")
	top := put(t, st, blobstore.Ref{Name: "vol", ID: "top"}, base.Ref.String(), sparseLayer(t, size, blobstore.BackingName(base.Blob), 0x22, 3<<20, 5<<20), "qcow2")
	if _, err := st.BlobPath(top.Blob); !errorsIsNoPath(err) {
		t.Fatalf("BlobPath on the test store: %v", err)
	}
	flat := flatRaw(t, s, top)

	var p recorder
	rt, err := s.ServeChain(ctx, &p, top, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("nbd://127.0.0.1:%d/vol:top", rt.Server.Port); rt.URI != want {
		t.Fatalf("URI %s, want %s", rt.URI, want)
	}
	if socks := sockets(t, s); len(socks) != 1 {
		t.Fatalf("chain server sockets %v, want one", socks)
	}
	run := func(name string, args ...string) {
		t.Helper()
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil || strings.Contains(string(out), "fail") {
			t.Fatalf("%s %q: %v\n%s", name, args, err, out)
		}
	}
	run("qemu-img", "compare", "-f", "raw", "-F", "raw", rt.URI, flat)
	run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 3M 64k", "-c", "read -P 0 1M 64k", rt.URI)

	// The guest writes and discards: visible to it, in no blob.
	run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", "-c", "discard 5M 64k", "-c", "read -P 0x77 0 64k", "-c", "read -P 0 5M 64k", rt.URI)
	if err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", rt.URI, flat).Run(); err == nil {
		t.Fatal("the guest's writes are not visible")
	}
	for _, img := range []blobstore.Image{base, top} {
		if err := st.VerifyBlob(ctx, img.Blob); err != nil {
			t.Fatalf("blob %s after guest writes: %v", img.Blob, err)
		}
	}
	run("qemu-img", "compare", "-f", "raw", "-F", "raw", flatRaw(t, s, top), flat)

	// Held while served.
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
	if n, err := s.DeleteRemotes(ctx, rt.URI, ""); n != 1 || err != nil {
		t.Fatalf("delete: %d %v", n, err)
	}
	if !portClosed(rt.Server.Port) || len(s.Servers()) != 0 {
		t.Fatal("qemu-nbd still running after delete")
	}
	if socks := sockets(t, s); len(socks) != 0 {
		t.Fatalf("chain server still listening after delete: %v", socks)
	}
	if _, err := os.Stat(rt.Server.Path); !os.IsNotExist(err) {
		t.Fatalf("overlay kept after delete: %v", err)
	}
	if _, err := st.GC(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if st.Exists(top.Blob) || st.Exists(base.Blob) {
		t.Fatal("chain still held after delete")
	}
}

// TestChainServerEndsWithQemuNBD: a qemu-nbd that dies takes its chain
// server with it (at the next call that looks), and Close stops the rest.
func TestChainServerEndsWithQemuNBD(t *testing.T) {
	t.Parallel()
	s, st := newNoPathService(t)
	ctx := context.Background()
	img := put(t, st, blobstore.Ref{Name: "vol", ID: "a"}, "", sparseLayer(t, 1<<20, "", 0x11, 0), "qcow2")
	var p recorder
	a, err := s.ServeChain(ctx, &p, img, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.ServeChain(ctx, &p, img, "127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	if socks := sockets(t, s); len(socks) != 2 {
		t.Fatalf("sockets %v, want two", socks)
	}
	if err := syscall.Kill(qemuPID(t, s, a.Server.ID), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, "the killed qemu-nbd is noticed", func() bool { return len(s.Servers()) == 1 })
	if n, err := s.DeleteRemotes(ctx, "nbd://127.0.0.1:1/none", ""); n != 0 || err != nil {
		t.Fatalf("delete of nothing: %d %v", n, err)
	}
	if socks := sockets(t, s); len(socks) != 1 {
		t.Fatalf("sockets %v after a qemu-nbd died, want one", socks)
	}
	s.Close()
	if socks := sockets(t, s); len(socks) != 0 {
		t.Fatalf("sockets %v after Close", socks)
	}
}

// TestInstantRestoreStartsAtOnce: an 8 GiB (and a 1 TiB) chain on a store without
// local paths answers reads as soon as ServeChain returns; nothing is
// read whole first. The figures (next to the in-place route of a store
// with paths) are printed, not asserted.
func TestInstantRestoreStartsAtOnce(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		size  int64
		paths bool
	}{{8 << 30, false}, {8 << 30, true}, {1 << 40, false}} {
		size, paths := tc.size, tc.paths
		var s *Service
		var st *blobstore.Store
		if paths {
			s, st = newService(t)
		} else {
			s, st = newNoPathService(t)
		}
		ctx := context.Background()
		base := put(t, st, blobstore.Ref{Name: "big", ID: "base"}, "", sparseLayer(t, size, "", 0x11, 0, 4<<30, size-64<<10), "qcow2")
		top := put(t, st, blobstore.Ref{Name: "big", ID: "top"}, base.Ref.String(), sparseLayer(t, size, blobstore.BackingName(base.Blob), 0x22, 1<<30, 6<<30), "qcow2")
		start := time.Now()
		var p recorder
		rt, err := s.ServeChain(ctx, &p, top, "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		served := time.Since(start)
		out, err := exec.Command("qemu-io", "-f", "raw", "-c", "read -P 0x22 6G 64k", "-c", "read -P 0x11 4G 64k", "-c", "read -P 0 2G 64k", rt.URI).CombinedOutput()
		if err != nil || strings.Contains(string(out), "fail") {
			t.Fatalf("paths=%v: first reads: %v\n%s", paths, err, out)
		}
		if socks := sockets(t, s); len(socks) != map[bool]int{true: 0, false: 1}[paths] {
			t.Fatalf("paths=%v: chain server sockets %v", paths, socks)
		}
		t.Logf("%d GiB virtual chain (2 layers, %d + %d blob bytes), local paths %v: ServeChain returned after %v, first reads done after %v",
			size>>30, base.Size, top.Size, paths, served.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	}
}

func errorsIsNoPath(err error) bool { return errors.Is(err, blobstore.ErrNoLocalPath) }

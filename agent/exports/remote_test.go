package exports

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/testwait"
	"imagestore/qcow2/qemutest"
)

// serveNBD serves file (of format) writable with a real qemu-nbd on
// 127.0.0.1 under export name "tgt" and returns nbd://127.0.0.1:<port>/tgt.
func serveNBD(t *testing.T, file, format string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cmd := exec.Command("qemu-nbd", "-f", format, "-x", "tgt", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "--persistent", "--cache=none", file)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("qemu-nbd: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	testwait.For(t, "qemu-nbd to listen", func() bool {
		select {
		case <-exited:
			t.Fatalf("qemu-nbd exited: %s", out.String())
		default:
		}
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return fmt.Sprintf("nbd://127.0.0.1:%d/tgt", port)
}

// TestWriteRemoteNBD runs twice: qemu-img reading the blobs in place,
// and (a store without local paths) reading the same guest view from our
// own NBD server; the targets must come out the same.
func TestWriteRemoteNBD(t *testing.T) {
	t.Parallel()
	for _, paths := range []bool{true, false} {
		t.Run(fmt.Sprintf("paths=%v", paths), func(t *testing.T) {
			t.Parallel()
			testWriteRemote(t, newEnvPaths(t, paths))
		})
	}
}

func testWriteRemote(t *testing.T, e *env) {
	s := e.service(t, nil)
	ctx := context.Background()
	dir := t.TempDir()
	const size = 4 << 20
	guest := make([]byte, size)
	for i := range 512 << 10 {
		guest[i] = byte(i%253) | 1
	}
	base := e.put(t, blobstore.Ref{Name: "vol", ID: "base"}, "", qcowLayer(t, guest, "", [2]int64{0, 384 << 10}), "qcow2")
	for i := 2 << 20; i < 2<<20+(64<<10); i++ {
		guest[i] = 0xa5
	}
	top := e.put(t, blobstore.Ref{Name: "vol", ID: "top"}, base.Ref.String(),
		qcowLayer(t, guest, blobstore.BackingName(base.Blob), [2]int64{384 << 10, 128 << 10}, [2]int64{2 << 20, 64 << 10}), "qcow2")
	top.VirtualSize = size
	if _, err := e.store.BlobPath(top.Blob); (err == nil) != e.paths || (!e.paths && !errors.Is(err, blobstore.ErrNoLocalPath)) {
		t.Fatalf("paths=%v: BlobPath: %v", e.paths, err)
	}
	want := filepath.Join(dir, "want.raw")
	if err := os.WriteFile(want, guest, 0o600); err != nil {
		t.Fatal(err)
	}
	raw := bytes.Repeat([]byte("raw image "), 100000)
	rawImg := e.put(t, blobstore.Ref{Name: "disk", ID: "r"}, "", raw, "raw")
	wantRaw := filepath.Join(dir, "want2.raw")
	if err := os.WriteFile(wantRaw, raw, 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name, targetFmt string
		img             blobstore.Image
		want            string
		concurrency     int
		size            int
	}{
		{"chain into raw", "raw", top, want, 4, size},
		{"chain into qcow2", "qcow2", top, want, 0, size},
		{"raw image", "raw", rawImg, wantRaw, 1, len(raw)},
	} {
		target := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+"."+tc.targetFmt)
		// Garbage first: every byte of the target must be written,
		// zeros included.
		qemutest.Run(t, "qemu-img", "create", "-q", "-f", tc.targetFmt, target, strconv.Itoa(tc.size))
		qemutest.Run(t, "qemu-io", "-f", tc.targetFmt, "-c", "write -P 0xee 0 "+strconv.Itoa(tc.size), target)
		u := serveNBD(t, target, tc.targetFmt)
		var p recorder
		if err := s.WriteRemote(ctx, &p, tc.img, RemoteTarget{URL: u, Concurrency: tc.concurrency}); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if out, err := qemutest.RunErr("qemu-img", "compare", "-U", "-f", tc.targetFmt, "-F", "raw", target, tc.want); err != nil {
			t.Fatalf("%s: target differs from the image: %v: %s", tc.name, err, out)
		}
		if p.image.Load() != tc.img.InstallPath() {
			t.Errorf("%s: progress names %v", tc.name, p.image.Load())
		}
	}

	// A target smaller than the image is refused by qemu-img, with its words.
	small := filepath.Join(dir, "small.raw")
	qemutest.Run(t, "qemu-img", "create", "-q", "-f", "raw", small, "1M")
	err := s.WriteRemote(ctx, jobs.Nop{}, top, RemoteTarget{URL: serveNBD(t, small, "raw")})
	if err == nil || !strings.Contains(err.Error(), "qemu-img convert") {
		t.Fatalf("small target: %v", err)
	}
	// Nothing listening.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close()
	if err := s.WriteRemote(ctx, jobs.Nop{}, top, RemoteTarget{URL: "nbd://" + addr + "/x"}); err == nil {
		t.Fatal("no NBD server: no error")
	}
	// A blob qemu cannot take as is.
	gz := e.put(t, blobstore.Ref{Name: "g", ID: "1"}, "", []byte("gzip"), "gzip")
	if err := s.WriteRemote(ctx, jobs.Nop{}, gz, RemoteTarget{URL: "nbd://" + addr}); err == nil || !strings.Contains(err.Error(), "format gzip") {
		t.Fatalf("gzip image: %v", err)
	}
}

func TestNBDTarget(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want, err string }{
		{"nbd://10.0.0.5:10809/vol-1:a.b", "nbd://10.0.0.5:10809/vol-1:a.b", ""},
		{"NBD://host:1", "nbd://host:1", ""},
		{"nbd://[fd00::1]:10809/x", "nbd://[fd00::1]:10809/x", ""},
		{"iscsi://10.0.0.5:3260/iqn.x/0", "", `scheme "iscsi" is not supported`},
		{"http://user:secret@h/x", "", `scheme "http" is not supported`},
		{"nbd+unix:///x?socket=/tmp/s", "", `scheme "nbd+unix" is not supported`},
		{"/var/lib/x.raw", "", `scheme "" is not supported`},
		{"nbd://h/x", "", "needs a host and a port"},
		{"nbd://h:0/x", "", "port"},
		{"nbd://h:1/x?socket=/tmp/s", "", "no user, query"},
		{"nbd://u:p@h:1/x", "", "no user, query"},
		{"nbd://h:1/a/b", "", "export name"},
		{"nbd://h:1/a%20b", "", "export name"},
		{"%zz", "", "not a URL"},
	} {
		got, err := nbdTarget(tc.in)
		if tc.err == "" {
			if err != nil || got != tc.want {
				t.Errorf("%q: %q, %v; want %q", tc.in, got, err, tc.want)
			}
			continue
		}
		if err == nil || !errors.Is(err, ErrUnsupportedTarget) || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%q: %v, want an error containing %q", tc.in, err, tc.err)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("%q: the error shows the password: %v", tc.in, err)
		}
	}
}

// nbdTarget takes a URL the management node sends: whatever it accepts
// is a plain nbd://host:port[/export] that it accepts again unchanged.
func FuzzNBDTarget(f *testing.F) {
	for _, s := range []string{"nbd://h:1/x", "nbd://[::1]:10809", "nbd://h:1/x?socket=/s", "iscsi://h/x", "nbd://u@h:1/a:b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := nbdTarget(in)
		if err != nil {
			if !errors.Is(err, ErrUnsupportedTarget) {
				t.Fatalf("%q: untyped error %v", in, err)
			}
			return
		}
		if !strings.HasPrefix(out, "nbd://") || strings.ContainsAny(out, "?#@ ") {
			t.Fatalf("%q gave %q", in, out)
		}
		if again, err := nbdTarget(out); err != nil || again != out {
			t.Fatalf("%q gave %q, which gives %q, %v", in, out, again, err)
		}
	})
}

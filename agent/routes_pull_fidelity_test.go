package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/hostxfer"
	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/faultproxy"
)

// A layer pulled from a host and the same file imported with import-backup
// are the same canonical layer (one code path: qcow2.Normalize), whether
// the pull normalizes while fetching (no all-zero data cluster) or falls
// back to normalizing from the staged copy.
// One function: both paths must be compared over the same files and store.
func TestPullFromHostMatchesImport(t *testing.T) {
	t.Parallel()
	e := hpNewEnv(t)
	ctx := context.Background()
	const size = 8 << 20
	base := filepath.Join(e.dir, "base.qcow2")
	hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", base, strconv.Itoa(size))
	hpQemuIO(t, base, "write -P 0x11 0 2M", "write -P 0x22 5M 768k")
	rec := httptest.NewRecorder()
	e.a.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/imagestore/allocuploaddir/", strings.NewReader("{}")))
	var alloc struct {
		UploadDir string `json:"uploadDir"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &alloc); err != nil || alloc.UploadDir == "" {
		t.Fatalf("allocuploaddir: %q, %v", rec.Body.String(), err)
	}
	up := alloc.UploadDir
	imported := func(t *testing.T, file, parent string) string {
		t.Helper()
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(up, randomHex(6)+".qcow2")
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			t.Fatal(err)
		}
		req := map[string]any{"imgurl": dst, "name": "imp"}
		if parent != "" {
			req["parent"] = parent
		}
		return e.ok(t, "/imagestore/import-backup/", req)["blobsum"].(string)
	}
	baseOut := e.ok(t, "/imagestore/pullfromhost/", hpMerge(e.host(), map[string]any{"path": base, "name": "vol"}))
	if got, want := baseOut["blobsum"].(string), imported(t, base, ""); got != want {
		t.Fatalf("base: pulled %s, imported %s", got, want)
	}
	parentPath := baseOut["installPath"].(string)
	parent, err := e.a.images.Lookup(ctx, "parent", parentPath)
	if err != nil {
		t.Fatal(err)
	}
	login := hostxfer.Login{Hostname: e.srv.Host, Port: e.srv.Port, Username: e.srv.User, PrivateKey: string(e.srv.PrivateKey)}

	cases := []struct {
		name    string
		create  []string // extra qemu-img create options
		cmds    []string
		onePass bool
	}{
		{"data and zeroes", nil, []string{"write -P 0x33 1M 1M", "write -z 6M 512k", "discard 5M 64k"}, true},
		{"4k clusters", []string{"-o", "cluster_size=4096"}, []string{"write -P 0x44 4k 4k", "write -P 0x45 36k 8k", "write -z 1M 4k"}, true},
		{"all-zero data cluster", nil, []string{"write -P 0x55 0 64k", "write -P 0 2M 128k", "write -P 0x56 3M 64k"}, false},
		{"empty delta", nil, nil, true},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := filepath.Join(e.dir, fmt.Sprintf("d%d.qcow2", i))
			hpRun(t, "qemu-img", append(append([]string{"create", "-q", "-f", "qcow2"}, c.create...), "-b", base, "-F", "qcow2", d)...)
			if len(c.cmds) > 0 {
				hpQemuIO(t, d, c.cmds...)
			}
			res, err := e.a.hostxfer.Pull(ctx, hostxfer.PullRequest{
				Login: login, Path: d, Parent: parentPath, Name: "pulled",
				Parallelism: 1 + i%3, Chunk: 64 << 10,
			}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.OnePass != c.onePass {
				t.Fatalf("onePass = %v, want %v", res.OnePass, c.onePass)
			}
			// One pass reads each allocated byte from the host once (staged
			// pieces are dropped once consumed, never re-read); the fallback
			// re-fetches the dropped pieces, and counts them.
			if bound := hpBound(t, d); c.onePass && res.HostBytesRead > bound {
				t.Fatalf("host bytes read %d > bound %d", res.HostBytesRead, bound)
			}
			if res.HostBytesRead < res.Allocated {
				t.Fatalf("host bytes read %d < allocated %d", res.HostBytesRead, res.Allocated)
			}
			if want := imported(t, d, parentPath); res.Image.Blob.String() != want {
				t.Fatalf("pulled %s, imported %s", res.Image.Blob, want)
			}
			// And both are what Normalize makes of the local file.
			f, err := os.Open(d)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, _ := f.Stat()
			im, err := qcow2.Open(f, st.Size())
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			if _, err := qcow2.Normalize(ctx, &buf, im, qcow2.WriteOptions{BackingFile: blobstore.BackingName(parent.Blob)}); err != nil {
				t.Fatal(err)
			}
			if want := digest.FromBytes(buf.Bytes()); res.Image.Blob != want {
				t.Fatalf("pulled %s, Normalize gives %s", res.Image.Blob, want)
			}
		})
	}
}

// TestPullFromHostLanes: a parallel pull reads over MaxLanes connections
// (the pool keeps them for the next pull), a pull with parallelism 1 over
// one, and a host that takes only one connection still gets pulled, and
// is not asked for a second one again by the next pull.
func TestPullFromHostLanes(t *testing.T) {
	t.Parallel()
	e := hpNewEnv(t)
	src := filepath.Join(e.dir, "vol.qcow2")
	hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", src, "24M")
	hpQemuIO(t, src, "write -P 0x41 0 20M")
	pull := func(addr string, par int) map[string]any {
		t.Helper()
		_, port, _ := net.SplitHostPort(addr)
		pn, _ := strconv.Atoi(port)
		return e.ok(t, "/imagestore/pullfromhost/", hpMerge(e.host(), map[string]any{
			"path": src, "name": "vol", "sshPort": pn, "hostKeyFingerprint": e.srv.Fingerprint, "parallelism": par,
		}))
	}

	p := faultproxy.New(t, e.srv.Addr)
	t.Cleanup(func() { _ = p.Close() })
	out := pull(p.Addr(), 4)
	if p.Conns() != hostxfer.MaxLanes {
		t.Fatalf("parallelism 4: %d connections, want %d", p.Conns(), hostxfer.MaxLanes)
	}
	// Both lanes carry data: the 20 MiB are read as pieces of 8, 8 and 4
	// MiB, which the lanes take in turn, so each carries at least 4 MiB.
	for i, n := range p.ConnBytes() {
		if n < 4<<20 {
			t.Fatalf("connection %d forwarded %d bytes of a 20 MiB pull (all: %v); want the reads spread over the lanes", i, n, p.ConnBytes())
		}
	}
	e.writeBack(t, out["installPath"].(string), src, "raw")
	pull(p.Addr(), 1)
	if p.Conns() != hostxfer.MaxLanes {
		t.Fatalf("after a second pull: %d connections, want the %d pooled ones reused", p.Conns(), hostxfer.MaxLanes)
	}

	// A host that drops every connection after its first.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if accepted.Add(1) > 1 {
				_ = c.Close()
				continue
			}
			up, err := net.Dial("tcp", e.srv.Addr)
			if err != nil {
				_ = c.Close()
				continue
			}
			go func() { _, _ = io.Copy(up, c); _ = up.Close() }()
			go func() { _, _ = io.Copy(c, up); _ = c.Close() }()
		}
	}()
	out = pull(ln.Addr().String(), 4)
	if accepted.Load() != 2 {
		t.Fatalf("%d connections tried, want the first and a second lane", accepted.Load())
	}
	e.writeBack(t, out["installPath"].(string), src, "raw")
	// The refusal is remembered: the next pull does not try again.
	pull(ln.Addr().String(), 4)
	if accepted.Load() != 2 {
		t.Fatalf("%d connections tried after a second pull, want no new one (the first reused, no second lane)", accepted.Load())
	}
}

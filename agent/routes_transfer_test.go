package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/faultproxy"
	"imagestore/transfer/sshtest"
)

// hpEnv is an agent over a fresh store plus a real sshd playing the KVM host.
type hpEnv struct {
	a     *Agent
	store *blobstore.Store
	srv   *sshtest.Server
	dir   string // "host" files, reachable over SFTP by absolute path
}

func hpNewEnv(t *testing.T) *hpEnv {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: %v", tool, err)
		}
	}
	srv := sshtest.Start(t)
	ctx := context.Background()
	store, err := blobstore.Open(ctx, blobstore.Options{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t)
	cfg.Root = store.Root()
	cfg.KnownHostsFile = srv.KnownHostsFile
	a, err := New(cfg, store, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = a.Close()
		_ = store.Close()
	})
	return &hpEnv{a: a, store: store, srv: srv, dir: t.TempDir()}
}

// host returns the SSH fields for the test sshd.
func (e *hpEnv) host() map[string]any {
	return map[string]any{
		"hostname": e.srv.Host, "sshPort": e.srv.Port, "username": e.srv.User,
		"privateKey": string(e.srv.PrivateKey),
	}
}

func hpMerge(ms ...map[string]any) map[string]any {
	out := map[string]any{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// call runs the -sync twin of an async route and returns the reply.
func (e *hpEnv) call(t *testing.T, route string, body map[string]any) map[string]any {
	t.Helper()
	b, _ := json.Marshal(body)
	req := httptest.NewRequest(http.MethodPost, strings.TrimSuffix(route, "/")+"-sync/", bytes.NewReader(b))
	rec := httptest.NewRecorder()
	e.a.Handler().ServeHTTP(rec, req)
	var out map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		t.Fatalf("%s: bad reply %q: %v", route, rec.Body.String(), err)
	}
	return out
}

func (e *hpEnv) ok(t *testing.T, route string, body map[string]any) map[string]any {
	t.Helper()
	out := e.call(t, route, body)
	if out["success"] != true {
		t.Fatalf("%s failed: %v", route, out["error"])
	}
	return out
}

// counts returns (images, blobs) in the store.
func (e *hpEnv) counts(t *testing.T) (int, int) {
	t.Helper()
	imgs, err := e.store.ListImages(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	nb := 0
	if err := e.store.WalkBlobs(context.Background(), func(blobstore.BlobInfo) error { nb++; return nil }); err != nil {
		t.Fatal(err)
	}
	return len(imgs), nb
}

func hpRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func hpQemuIO(t *testing.T, file string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	hpRun(t, "qemu-io", append(args, file)...)
}

// hpBound is 1.05 × (the layer's allocated host bytes + the metadata a
// reader must fetch: header cluster, L1, refcount table, L2 tables).
func hpBound(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	im, err := qcow2.Open(f, fi.Size())
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, r := range im.DataRanges() {
		data += r.Length
	}
	hdr := make([]byte, 72)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	cs := int64(1) << binary.BigEndian.Uint32(hdr[20:])
	l1Size := int64(binary.BigEndian.Uint32(hdr[36:]))
	l1Off := int64(binary.BigEndian.Uint64(hdr[40:]))
	rtClusters := int64(binary.BigEndian.Uint32(hdr[56:]))
	l1 := make([]byte, l1Size*8)
	if _, err := f.ReadAt(l1, l1Off); err != nil {
		t.Fatal(err)
	}
	var nL2 int64
	for i := 0; i < len(l1); i += 8 {
		if binary.BigEndian.Uint64(l1[i:])&0x00fffffffffffe00 != 0 {
			nL2++
		}
	}
	meta := cs + l1Size*8 + rtClusters*cs + nL2*cs
	return (data + meta) * 105 / 100
}

// writeBack flattens the stored chain of installPath to the sshd host and
// checks qemu-img compare against the source chain whose top is src.
func (e *hpEnv) writeBack(t *testing.T, installPath, src, format string) map[string]any {
	t.Helper()
	dst := filepath.Join(e.dir, fmt.Sprintf("restored-%d.%s", time.Now().UnixNano(), format))
	out := e.ok(t, "/imagestore/writetohost/", hpMerge(e.host(), map[string]any{
		"installPath": installPath, "path": dst, "format": format,
	}))
	hpRun(t, "qemu-img", "compare", "-f", "qcow2", "-F", format, src, dst)
	if format == "qcow2" {
		hpRun(t, "qemu-img", "check", dst)
		if got := hpRun(t, "qemu-img", "info", "--output=json", dst); strings.Contains(got, "backing-filename") {
			t.Fatalf("written qcow2 has a backing file: %s", got)
		}
	}
	sum := hpRun(t, "sha256sum", dst)
	if want := out["sha256"]; !strings.HasPrefix(sum, fmt.Sprint(want)) {
		t.Fatalf("reply sha256 %v, file has %s", want, sum)
	}
	fi, err := os.Stat(dst)
	if err != nil || fi.Size() != hpNum(out["size"]) {
		t.Fatalf("size on host %v (%v), reply %v", fi, err, out["size"])
	}
	// No temp file left beside the target.
	left, _ := filepath.Glob(filepath.Join(e.dir, ".*tmp*"))
	if len(left) > 0 {
		t.Fatalf("temp files left on host: %v", left)
	}
	return out
}

func hpNum(v any) int64 {
	f, _ := v.(float64)
	return int64(f)
}

// TestPullFromHostChain pulls a base made by qemu-img and five deltas
// (data, zero and discard writes), each on top of the previous pull, and
// after each flattens the stored chain back to the host and compares.
func TestPullFromHostChain(t *testing.T) {
	t.Parallel()
	e := hpNewEnv(t)
	const size = 16 << 20
	base := filepath.Join(e.dir, "base.qcow2")
	hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", base, strconv.Itoa(size))
	hpQemuIO(t, base, "write -P 0x11 0 1M", "write -P 0x22 5M 768k", "write -P 0x33 15M 1M", "write -z 10M 256k")

	out := e.ok(t, "/imagestore/pullfromhost/", hpMerge(e.host(), map[string]any{
		"path": base, "name": "vol", "parallelism": 3,
	}))
	if got, bound := hpNum(out["hostBytesRead"]), hpBound(t, base); got <= 0 || got > bound {
		t.Fatalf("base: hostBytesRead %d, bound %d", got, bound)
	}
	if hpNum(out["virtualsize"]) != size {
		t.Fatalf("virtualsize %v", out["virtualsize"])
	}
	parent := out["installPath"].(string)
	e.writeBack(t, parent, base, "qcow2")

	steps := [][]string{
		{"write -P 0x44 256k 512k", "write -P 0x45 8M 64k"},
		{"write -z 0 256k", "write -P 0x46 12M 1M"},
		{"discard 5M 512k", "write -P 0x47 14M 2M"},
		{"write -z 512k 2M", "discard 12M 256k", "write -P 0x48 3M 128k"},
		{"write -P 0x49 0 16M", "write -z 7M 1M", "discard 15M 1M"},
	}
	prev := base
	for i, cmds := range steps {
		d := filepath.Join(e.dir, fmt.Sprintf("delta%d.qcow2", i+1))
		hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", d)
		hpQemuIO(t, d, cmds...)
		imgs0, blobs0 := e.counts(t)
		out := e.ok(t, "/imagestore/pullfromhost/", hpMerge(e.host(), map[string]any{
			"path": d, "parent": parent, "parallelism": 1 + i%4,
		}))
		if got, bound := hpNum(out["hostBytesRead"]), hpBound(t, d); got > bound {
			t.Fatalf("delta %d: hostBytesRead %d > bound %d", i+1, got, bound)
		}
		imgs1, blobs1 := e.counts(t)
		if imgs1 != imgs0+1 || blobs1 != blobs0+1 {
			t.Fatalf("delta %d: images %d→%d, blobs %d→%d", i+1, imgs0, imgs1, blobs0, blobs1)
		}
		ip := out["installPath"].(string)
		img, err := e.a.images.Lookup(context.Background(), "installPath", ip)
		if err != nil || img.Parent == "" {
			t.Fatalf("delta %d: recorded %+v, %v", i+1, img, err)
		}
		// The stored layer names its parent by the canonical backing name.
		path, _ := e.store.BlobPath(img.Blob)
		info := hpRun(t, "qemu-img", "info", "--output=json", "-U", path)
		pimg, _ := e.a.images.Lookup(context.Background(), "parent", parent)
		if !strings.Contains(info, blobstore.BackingName(pimg.Blob)) {
			t.Fatalf("delta %d: backing name not canonical: %s", i+1, info)
		}
		format := "qcow2"
		if i%2 == 1 {
			format = "raw"
		}
		e.writeBack(t, ip, d, format)
		prev, parent = d, ip
	}
	// The metric counts what the replies reported (and more than nothing).
	if m := metricValue(t, e.a, "imagestore_host_read_bytes_total"); m <= 0 {
		t.Fatalf("imagestore_host_read_bytes_total = %v", m)
	}
}

func metricValue(t *testing.T, a *Agent, name string) float64 {
	t.Helper()
	mfs, err := a.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

// TestPullFromHostErrors: each failure is a clear error and nothing is committed.
func TestPullFromHostErrors(t *testing.T) {
	t.Parallel()
	e := hpNewEnv(t)
	base := filepath.Join(e.dir, "base.qcow2")
	hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	hpQemuIO(t, base, "write -P 0x5a 0 1M")
	out := e.ok(t, "/imagestore/pullfromhost/", hpMerge(e.host(), map[string]any{"path": base, "name": "vol"}))
	parent := out["installPath"].(string)

	other := filepath.Join(e.dir, "other.qcow2")
	hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", other, "32M")
	hpQemuIO(t, other, "write -P 1 0 64k")
	rawFile := filepath.Join(e.dir, "disk.raw")
	if err := os.WriteFile(rawFile, bytes.Repeat([]byte{7}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	wrongKey, _ := sshtest.GenKey(t)
	// Port 1 (tcpmux) is closed here and privileged, so no parallel test
	// can take it the way a just-released ephemeral port can be reused.
	closedPort := 1

	cases := []struct {
		name string
		body map[string]any
		want string
	}{
		{"host key mismatch", map[string]any{"path": base, "name": "x", "hostKeyFingerprint": ssh.FingerprintSHA256(wrongKey)}, "host key"},
		{"unknown host key", map[string]any{"path": base, "name": "x", "hostname": "localhost"}, "host key"},
		{"wrong password", map[string]any{"path": base, "name": "x", "privateKey": "", "password": "not-the-password"}, "refused"},
		{"unreachable", map[string]any{"path": base, "name": "x", "sshPort": closedPort}, "cannot reach"},
		{"not qcow2", map[string]any{"path": rawFile, "name": "x"}, "not a qcow2"},
		{"missing file", map[string]any{"path": filepath.Join(e.dir, "nope.qcow2"), "name": "x"}, "nope.qcow2"},
		{"size differs from parent", map[string]any{"path": other, "parent": parent}, "differs from parent"},
		{"backing file without parent", map[string]any{"path": other, "name": "x"}, "no parent"},
		{"no credentials", map[string]any{"path": base, "name": "x", "privateKey": ""}, "password or privateKey"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			imgs0, blobs0 := e.counts(t)
			out := e.call(t, "/imagestore/pullfromhost/", hpMerge(e.host(), c.body))
			msg := fmt.Sprint(out["error"])
			if out["success"] != false || !strings.Contains(msg, c.want) {
				t.Fatalf("got success=%v error %q, want an error containing %q", out["success"], msg, c.want)
			}
			if strings.Contains(msg, "BEGIN OPENSSH") || strings.Contains(msg, "not-the-password") {
				t.Fatalf("error leaks a secret: %s", msg)
			}
			if imgs1, blobs1 := e.counts(t); imgs1 != imgs0 || blobs1 != blobs0 {
				t.Fatalf("something was committed: images %d→%d, blobs %d→%d", imgs0, imgs1, blobs0, blobs1)
			}
		})
	}
}

// TestPullFromHostFaults cuts the SSH connection mid-transfer several times:
// the pull either resumes and stores exactly the source, or fails cleanly.
func TestPullFromHostFaults(t *testing.T) {
	t.Parallel()
	e := hpNewEnv(t)
	src := filepath.Join(e.dir, "vol.qcow2")
	hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", src, "24M")
	hpQemuIO(t, src, "write -P 0x61 0 6M", "write -P 0x62 10M 6M", "write -P 0x63 20M 4M")
	p := faultproxy.New(t, e.srv.Addr)
	t.Cleanup(func() { _ = p.Close() })
	p.CutAfter(3 << 20)
	p.CutNext(3)
	_, port, _ := net.SplitHostPort(p.Addr())
	pn, _ := strconv.Atoi(port)
	imgs0, blobs0 := e.counts(t)
	out := e.call(t, "/imagestore/pullfromhost/", hpMerge(e.host(), map[string]any{
		"path": src, "name": "vol", "sshPort": pn, "hostKeyFingerprint": e.srv.Fingerprint, "parallelism": 4,
	}))
	if p.Cuts() == 0 {
		t.Fatalf("the proxy never cut the connection (conns %d)", p.Conns())
	}
	imgs1, blobs1 := e.counts(t)
	if out["success"] != true {
		if imgs1 != imgs0 || blobs1 != blobs0 {
			t.Fatalf("failed (%v) but committed: images %d→%d blobs %d→%d", out["error"], imgs0, imgs1, blobs0, blobs1)
		}
		t.Logf("pull failed cleanly after %d cuts: %v", p.Cuts(), out["error"])
		return
	}
	t.Logf("pull survived %d cuts over %d connections", p.Cuts(), p.Conns())
	if imgs1 != imgs0+1 {
		t.Fatalf("images %d→%d", imgs0, imgs1)
	}
	e.writeBack(t, out["installPath"].(string), src, "raw")
}

// TestPullFromHostRateLimit: the shared budget holds across streams.
func TestPullFromHostRateLimit(t *testing.T) {
	t.Parallel()
	e := hpNewEnv(t)
	src := filepath.Join(e.dir, "vol.qcow2")
	hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", src, "32M")
	hpQemuIO(t, src, "write -P 0x71 0 3M")
	const limit = 4 << 20
	start := time.Now()
	out := e.ok(t, "/imagestore/pullfromhost/", hpMerge(e.host(), map[string]any{
		"path": src, "name": "vol", "parallelism": 4,
		"volumeReadBandwidth": limit, "networkReadBandwidth": 64 << 20,
	}))
	elapsed := time.Since(start)
	n := hpNum(out["hostBytesRead"])
	if min := time.Duration(float64(n) / limit * 0.8 * float64(time.Second)); elapsed < min {
		t.Fatalf("read %d bytes in %v at a %d B/s limit; expected at least %v", n, elapsed, limit, min)
	}

	// writetohost honours recoverBandwidth the same way.
	dst := filepath.Join(e.dir, "back.qcow2")
	start = time.Now()
	w := e.ok(t, "/imagestore/writetohost/", hpMerge(e.host(), map[string]any{
		"installPath": out["installPath"], "path": dst, "recoverBandwidth": limit,
	}))
	elapsed = time.Since(start)
	if min := time.Duration(float64(hpNum(w["size"])) / limit * 0.8 * float64(time.Second)); elapsed < min {
		t.Fatalf("wrote %v bytes in %v at a %d B/s limit; expected at least %v", w["size"], elapsed, limit, min)
	}
	hpRun(t, "qemu-img", "compare", src, dst)
}

// TestWriteToHostErrors: bad requests fail clearly and leave nothing on the host.
func TestWriteToHostErrors(t *testing.T) {
	t.Parallel()
	e := hpNewEnv(t)
	src := filepath.Join(e.dir, "vol.qcow2")
	hpRun(t, "qemu-img", "create", "-q", "-f", "qcow2", src, "8M")
	hpQemuIO(t, src, "write -P 0x7e 0 1M")
	out := e.ok(t, "/imagestore/pullfromhost/", hpMerge(e.host(), map[string]any{"path": src, "name": "vol"}))
	ip := out["installPath"].(string)
	wrongKey, _ := sshtest.GenKey(t)
	cases := []struct {
		name string
		body map[string]any
		want string
	}{
		{"unknown image", map[string]any{"installPath": "vol:" + strings.Repeat("0", 32), "path": filepath.Join(e.dir, "a")}, "no such image"},
		{"bad format", map[string]any{"installPath": ip, "path": filepath.Join(e.dir, "a"), "format": "vmdk"}, "format"},
		{"host key mismatch", map[string]any{"installPath": ip, "path": filepath.Join(e.dir, "a"), "hostKeyFingerprint": ssh.FingerprintSHA256(wrongKey)}, "host key"},
		{"missing dir", map[string]any{"installPath": ip, "path": filepath.Join(e.dir, "no", "such", "a")}, "no/such"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := e.call(t, "/imagestore/writetohost/", hpMerge(e.host(), c.body))
			if msg := fmt.Sprint(out["error"]); out["success"] != false || !strings.Contains(msg, c.want) {
				t.Fatalf("got success=%v error %q, want %q", out["success"], msg, c.want)
			}
			if _, err := os.Stat(filepath.Join(e.dir, "a")); err == nil {
				t.Fatal("a file was written")
			}
		})
	}
}

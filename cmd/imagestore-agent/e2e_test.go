package main

import (
	"bufio"
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"imagestore/internal/lockedbuf"
)

var agentBin string

// TestMain builds the real daemon once; e2e tests run it as a subprocess.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "imagestore-agent-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	agentBin = filepath.Join(dir, "imagestore-agent")
	// go test puts GOROOT/bin first on PATH, so this is the toolchain running the test.
	gobin, err := exec.LookPath("go")
	if err != nil {
		fmt.Fprintln(os.Stderr, "go not on PATH:", err)
		os.Exit(1)
	}
	out, err := exec.Command(gobin, "build", "-o", agentBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building daemon: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := rgw.Run(m)
	os.RemoveAll(dir)
	os.Exit(code)
}

const waitLong = 60 * time.Second

type daemon struct {
	t     *testing.T
	cmd   *exec.Cmd
	url   string
	root  string
	token string
	s3    *bucketStore // nil: the store is on local disk under root
	done  chan struct{}

	logs lockedbuf.Buffer
}

type daemonOpts struct {
	token       string
	parallelism int
	extra       string // more YAML
	root        string // reuse a store (restart tests)
	env         []string
	profile     string       // default imagestore: these tests exercise our own protections
	wrap        []string     // argv prefix the daemon runs under (a sandbox)
	s3          *bucketStore // keep the store in this bucket (storage.type s3); nil = under root
}

func startDaemon(t *testing.T, o daemonOpts) *daemon {
	t.Helper()
	dir := t.TempDir()
	if o.root == "" {
		o.root = filepath.Join(dir, "store")
	}
	if o.parallelism == 0 {
		o.parallelism = 4
	}
	if o.profile == "" {
		o.profile = "imagestore"
	}
	cfg := fmt.Sprintf(`profile: %s
root: %s
listen: 127.0.0.1:0
registryListen: 127.0.0.1:0
logFormat: json
logLevel: debug
parallelismDegree: %d
callbackRetries: 2
callbackMaxDelay: 100ms
callbackTimeout: 5s
gcGrace: 1ms
verifyInterval: 0s
shutdownTimeout: 20s
debug: true
token: %q
%s`, o.profile, o.root, o.parallelism, o.token, o.extra)
	if o.s3 != nil {
		cfg += "\n" + o.s3.yaml()
		o.env = append(append([]string{}, o.env...), o.s3.env()...)
	}
	cfgPath := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, root: o.root, token: o.token, s3: o.s3, done: make(chan struct{})}
	argv := append(append([]string{}, o.wrap...), agentBin, "-config", cfgPath)
	d.cmd = exec.Command(argv[0], argv[1:]...)
	d.cmd.Env = append(os.Environ(), o.env...)
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	addr := make(chan string, 1)
	go func() {
		defer close(d.done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			fmt.Fprintf(&d.logs, "%s\n", line)
			var rec struct{ Msg, Addr string }
			if json.Unmarshal(line, &rec) == nil && rec.Msg == "listening" {
				addr <- rec.Addr
			}
		}
		_ = d.cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = d.cmd.Process.Kill()
		<-d.done
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.log())
		}
	})
	select {
	case a := <-addr:
		d.url = "http://" + a
	case <-d.done:
		t.Fatalf("daemon exited before listening:\n%s", d.log())
	case <-time.After(waitLong):
		t.Fatalf("daemon did not start:\n%s", d.log())
	}
	return d
}

func (d *daemon) log() string { return d.logs.String() }

// stop sends sig and waits for exit, returning the exit code.
func (d *daemon) stop(sig syscall.Signal) int {
	d.t.Helper()
	_ = d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(waitLong):
		d.t.Fatal("daemon did not exit")
	}
	return d.cmd.ProcessState.ExitCode()
}

// mgmt plays the management node: it receives callbacks.
type mgmt struct {
	srv  *httptest.Server
	mu   sync.Mutex
	got  map[string][]byte
	hits map[string]int
	seq  int
}

func newMgmt(t *testing.T) *mgmt {
	m := &mgmt{got: map[string][]byte{}, hits: map[string]int{}}
	m.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		id := r.Header.Get("taskuuid")
		m.mu.Lock()
		m.got[id] = b
		m.hits[id]++
		m.mu.Unlock()
	}))
	t.Cleanup(m.srv.Close)
	return m
}

func (m *mgmt) newID() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seq++
	return fmt.Sprintf("task-%d-%d", time.Now().UnixNano(), m.seq)
}

func (m *mgmt) wait(t *testing.T, id string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(waitLong)
	for time.Now().Before(deadline) {
		m.mu.Lock()
		b, ok := m.got[id]
		m.mu.Unlock()
		if ok {
			var v map[string]any
			if err := json.Unmarshal(b, &v); err != nil {
				t.Fatalf("callback %s: %v: %s", id, err, b)
			}
			return v
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no callback for %s", id)
	return nil
}

type resp struct {
	code int
	body map[string]any
	raw  []byte
}

func (d *daemon) post(t *testing.T, path string, body any, hdr map[string]string) resp {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(http.MethodPost, d.url+path, rd)
	req.Header.Set("Content-Type", "application/json")
	if d.token != "" {
		req.Header.Set("Authorization", "Bearer "+d.token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	r := resp{code: res.StatusCode, raw: raw}
	_ = json.Unmarshal(raw, &r.body)
	return r
}

// sync calls a sync path and requires success.
func (d *daemon) sync(t *testing.T, path string, body any) map[string]any {
	t.Helper()
	r := d.post(t, path, body, nil)
	if r.code != 200 || r.body["success"] != true || r.body["error"] != "" {
		t.Fatalf("%s: %d %s", path, r.code, r.raw)
	}
	return r.body
}

// async calls an async path as the management node does and returns the callback body.
func (d *daemon) async(t *testing.T, m *mgmt, path string, body any) map[string]any {
	t.Helper()
	id := m.newID()
	r := d.post(t, path, body, map[string]string{"taskuuid": id, "callbackurl": m.srv.URL + "/callback"})
	if r.code != 200 || r.body["success"] != true || r.body["error"] != "" {
		t.Fatalf("%s: immediate answer %d %s", path, r.code, r.raw)
	}
	return m.wait(t, id)
}

func mustSucceed(t *testing.T, what string, v map[string]any) {
	t.Helper()
	if v["success"] != true || v["error"] != "" {
		t.Fatalf("%s failed: %v", what, v)
	}
}

func num(v any) int64 {
	f, _ := v.(float64)
	return int64(f)
}

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// writeRaw fills a file with n bytes of a pattern derived from seed.
func writeRaw(t *testing.T, path string, n int, seed byte) {
	t.Helper()
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func copyInto(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func freePortClosed(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestE2EAuth(t *testing.T) {
	d := startDaemon(t, daemonOpts{token: "s3cret-token-value"})
	for _, tc := range []struct {
		name, auth string
		want       int
	}{
		{"none", "", 401},
		{"wrong", "Bearer nope", 401},
		{"wrong scheme", "Basic s3cret-token-value", 401},
		{"prefix of token", "Bearer s3cret", 401},
		{"right", "Bearer s3cret-token-value", 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, p := range []string{"/imagestore/echo/", "/metrics", "/export/image-00000000000000000000000000000000.qcow2"} {
				req, _ := http.NewRequest(http.MethodGet, d.url+p, nil)
				if tc.auth != "" {
					req.Header.Set("Authorization", tc.auth)
				}
				res, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				res.Body.Close()
				want := tc.want
				if strings.HasPrefix(p, "/export/") {
					want = 404 // the URL is its own credential: unknown with or without the token
				}
				if res.StatusCode != want {
					t.Errorf("%s: got %d want %d", p, res.StatusCode, want)
				}
			}
		})
	}
	res, err := http.Get(d.url + "/health")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("/health without token: %d", res.StatusCode)
	}
	if strings.Contains(d.log(), "s3cret") {
		t.Fatal("token appears in the log")
	}
}

// TestE2EBackupFlow is the management node's backup flow against the built
// daemon, with the store on local disk and on S3: connect, ping, import a
// base and a delta, chain, info, hash, export, a template, delete, gc. One function
// because each call uses what the previous one returned.
func TestE2EBackupFlow(t *testing.T) {
	for _, kind := range []storageKind{onDisk, onS3} {
		t.Run(string(kind), func(t *testing.T) { testBackupFlow(t, kind) })
	}
}

func testBackupFlow(t *testing.T, kind storageKind) {
	d := startDaemon(t, daemonOpts{s3: storeFor(t, kind)})
	m := newMgmt(t)
	work := t.TempDir()

	c := d.sync(t, "/imagestore/connect/", map[string]any{"uuid": "bs-uuid-1"})
	if num(c["totalSize"]) <= 0 || num(c["freeSize"]) <= 0 {
		t.Fatalf("connect capacity: %v", c)
	}
	p := d.async(t, m, "/imagestore/ping/", map[string]any{"uuid": "bs-uuid-1"})
	mustSucceed(t, "ping", p)
	if p["uuid"] != "bs-uuid-1" {
		t.Fatalf("ping uuid %v", p["uuid"])
	}
	up := d.sync(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 2})["uploadDir"].(string)

	// base volume and a delta on top of it, made by qemu.
	base := filepath.Join(work, "base.qcow2")
	delta := filepath.Join(work, "delta.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
	runTool(t, "qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 4M 512k", base)
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", delta)
	runTool(t, "qemu-io", "-c", "write -P 0x33 512k 1M", "-c", "write -z 4M 64k", delta)

	copyInto(t, base, filepath.Join(up, "base.qcow2"))
	ip := d.sync(t, "/imagestore/installpath/allocate", map[string]any{"parent": ""})["installPath"].(string)
	bres := d.async(t, m, "/imagestore/import-backup/", map[string]any{"imgurl": "file://" + filepath.Join(up, "base.qcow2"), "name": "vol1", "installPath": ip})
	mustSucceed(t, "import base", bres)
	baseIP := bres["installPath"].(string)
	if baseIP != ip {
		t.Fatalf("base install path %s, allocated %s", baseIP, ip)
	}

	copyInto(t, delta, filepath.Join(up, "delta.qcow2"))
	ip2 := d.sync(t, "/imagestore/installpath/allocate", map[string]any{"parent": baseIP})["installPath"].(string)
	if !strings.HasPrefix(ip2, strings.TrimSuffix(baseIP, bres["id"].(string))) {
		t.Fatalf("child install path %s not under parent's name %s", ip2, baseIP)
	}
	res := d.async(t, m, "/imagestore/import-backup/", map[string]any{"imgurl": filepath.Join(up, "delta.qcow2"), "name": "ignored", "parent": baseIP, "installPath": ip2, "desc": "delta"})
	mustSucceed(t, "import delta", res)
	for _, k := range []string{"name", "id", "size", "virtualsize", "totalSize", "freeSize"} {
		if _, ok := res[k]; !ok {
			t.Fatalf("import reply lacks %s: %v", k, res)
		}
	}
	if num(res["virtualsize"]) != 8<<20 || num(res["size"]) <= 0 {
		t.Fatalf("import reply sizes: %v", res)
	}
	checkWhereBlobsAre(t, d, 2)

	chain := d.async(t, m, "/imagestore/imgchain/", map[string]any{"installPath": ip2})
	mustSucceed(t, "imgchain", chain)
	ch := chain["chain"].([]any)
	if len(ch) != 2 || ch[0].(map[string]any)["installPath"] != ip2 || ch[1].(map[string]any)["installPath"] != baseIP {
		t.Fatalf("chain: %v", ch)
	}
	info := d.async(t, m, "/imagestore/imginfo/", map[string]any{"installPath": ip2})
	mustSucceed(t, "imginfo", info)
	if info["blobsum"] != ch[0].(map[string]any)["blobsum"] || info["parent"] == "" {
		t.Fatalf("imginfo %v", info)
	}
	h := d.async(t, m, "/imagestore/getimagehash/", map[string]any{"installPath": ip2, "alogrithm": "sha256"})
	mustSucceed(t, "hash", h)
	if "sha256:"+h["hash"].(string) != info["blobsum"] {
		t.Fatalf("hash %v vs blobsum %v", h["hash"], info["blobsum"])
	}

	exp := d.async(t, m, "/imagestore/export/", map[string]any{"installPath": ip2, "extFmt": "qcow2"})
	mustSucceed(t, "export", exp)
	// imgUrl is relative; the management node puts the image's name in
	// front of its last segment, and both forms download.
	rel := exp["imgUrl"].(string)
	url := d.url + rel
	got := download(t, url, "")
	renamed := d.url + strings.Replace(rel, "/image-", "/centos%207-image-", 1)
	if !bytes.Equal(download(t, renamed, ""), got) {
		t.Fatal("the renamed export URL serves other bytes")
	}
	sum := md5.Sum(got)
	if hex.EncodeToString(sum[:]) != exp["md5Sum"] {
		t.Fatalf("md5 of download %x, reply %v", sum, exp["md5Sum"])
	}
	part := download(t, url, "bytes=100-1123")
	if !bytes.Equal(part, got[100:1124]) {
		t.Fatal("range request returned wrong bytes")
	}
	out := filepath.Join(work, "exported.qcow2")
	if err := os.WriteFile(out, got, 0o644); err != nil {
		t.Fatal(err)
	}
	runTool(t, "qemu-img", "check", out)
	runTool(t, "qemu-img", "compare", "-q", delta, out)
	mustSucceed(t, "delexp", d.async(t, m, "/imagestore/delexp/", map[string]any{"installPath": ip2}))

	// A template made from the backup (one standalone compressed layer,
	// written into the store) holds the same guest data.
	tpl := d.async(t, m, "/imagestore/template/create/", map[string]any{"installPath": ip2, "imageUuid": "tmpl-1", "compress": true, "format": "qcow2"})
	mustSucceed(t, "template/create", tpl)
	runTool(t, "qemu-img", "compare", "-q", delta, d.blobCopy(t, tpl["blobsum"].(string)))
	mustSucceed(t, "delete template", d.async(t, m, "/imagestore/delete/", map[string]any{"installPath": tpl["installPath"]}))
	if r := downloadStatus(t, url); r != 404 {
		t.Fatalf("export still served after delexp: %d", r)
	}

	// Deleting the base while the delta exists is deferred (the delta
	// still reads it); deleting the delta then reclaims both, and a
	// repeated delete of the base is a success.
	if r := d.async(t, m, "/imagestore/delete/", map[string]any{"installPath": baseIP}); r["success"] != true || r["deferred"] != true || num(r["totalSize"]) <= 0 {
		t.Fatalf("deleting a parent with children: %v", r)
	}
	if r := d.async(t, m, "/imagestore/imginfo/", map[string]any{"installPath": baseIP}); r["success"] != false {
		t.Fatalf("a deleted parent is still visible: %v", r)
	}
	mustSucceed(t, "delete delta", d.async(t, m, "/imagestore/delete/", map[string]any{"installPath": ip2}))
	if r := d.async(t, m, "/imagestore/delete/", map[string]any{"installPath": baseIP}); r["success"] != true || r["deleted"] != false {
		t.Fatalf("base not reclaimed with its last child: %v", r)
	}
	gc := d.async(t, m, "/imagestore/gc/", map[string]any{"imagesToKeep": []string{}})
	mustSucceed(t, "gc", gc)
	if num(gc["freed"]) < num(res["size"]) {
		t.Fatalf("gc freed %v bytes, the delta alone was %v", gc["freed"], res["size"])
	}
	if v := scrapeValue(t, d, "imagestore_store_blobs"); v != 0 {
		t.Fatalf("%v blobs left after gc", v)
	}
}

func download(t *testing.T, url, rng string) []byte {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	want := 200
	if rng != "" {
		want = 206
	}
	if res.StatusCode != want {
		t.Fatalf("GET %s (%s): %s", url, rng, res.Status)
	}
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func downloadStatus(t *testing.T, url string) int {
	res, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	return res.StatusCode
}

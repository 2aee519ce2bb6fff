package main

import (
	"bytes"
	"crypto/md5"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/internal/testcert"
	"imagestore/internal/tlsconf"
)

// mnStore is one backup storage as the management node sees it: the
// daemon in the zstack profile, its registry over HTTPS with ZStack's kind
// of certificate.
type mnStore struct {
	*daemon
	reg string // https://127.0.0.1:<port>
}

// startMNStore runs the real daemon as a ZStack backup storage: the default
// (zstack) profile, :8001 plain, :8000 HTTPS with certFile/keyFile, no
// token, plain NBD on its own port range, the store in bs (nil: on disk).
func startMNStore(t *testing.T, certFile, keyFile, ports string, bs *bucketStore) *mnStore {
	t.Helper()
	d := startDaemon(t, daemonOpts{profile: "zstack", s3: bs, extra: fmt.Sprintf(`registryTLS:
  cert: %s
  key: %s
nbd:
  portRange: %q
  bind: 127.0.0.1
`, certFile, keyFile, ports)})
	return &mnStore{daemon: d, reg: "https://" + regAddr(t, d)}
}

func hex32(t *testing.T) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// threadContext is what the management node adds to commands that carry it.
func threadContext(t *testing.T) map[string]any {
	return map[string]any{"threadContext": map[string]any{"api": hex32(t), "task-name": "e2e"}, "threadContextStack": []any{}}
}

func withContext(t *testing.T, body map[string]any) map[string]any {
	for k, v := range threadContext(t) {
		body[k] = v
	}
	return body
}

// mnSync posts a sync command as the management node does (§1.3).
func (s *mnStore) mnSync(t *testing.T, path string, body any) map[string]any {
	t.Helper()
	j, _ := json.Marshal(body)
	req, _ := http.NewRequest(http.MethodPost, s.url+path, bytes.NewReader(j))
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	var v map[string]any
	if res.StatusCode != 200 || json.Unmarshal(raw, &v) != nil || v["success"] != true {
		t.Fatalf("%s: %d %s", path, res.StatusCode, raw)
	}
	return v
}

// mnAsync posts an async command exactly as the management node does
// (§1.2: taskuuid and callbackurl headers, immediate status exactly 200)
// and returns the one callback's body, which must say success.
func (s *mnStore) mnAsync(t *testing.T, m *mgmt, path string, body any) map[string]any {
	t.Helper()
	j, _ := json.Marshal(body)
	id := hex32(t)
	req, _ := http.NewRequest(http.MethodPost, s.url+path, bytes.NewReader(j))
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	req.Header.Set("taskuuid", id)
	req.Header.Set("callbackurl", m.srv.URL+"/zstack/asyncrest/callback")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	raw, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("%s: immediate answer %d %s", path, res.StatusCode, raw)
	}
	v := m.wait(t, id)
	if v["success"] != true {
		t.Fatalf("%s: callback %v", path, v)
	}
	m.mu.Lock()
	hits := m.hits[id]
	m.mu.Unlock()
	if hits != 1 {
		t.Fatalf("%s: %d callbacks for one taskuuid", path, hits)
	}
	return v
}

// mnRegistry is the management node's HTTPS client of :8000: it trusts
// every certificate and sends no Authorization.
var mnRegistry = &http.Client{Timeout: time.Minute, Transport: &http.Transport{
	TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // the management node's own behaviour
}}

func (s *mnStore) v1(t *testing.T, method, path string, body any) (int, http.Header, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		j, _ := json.Marshal(body)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, s.reg+path, rd)
	req.Header.Set("Content-Type", "application/json")
	res, err := mnRegistry.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, res.Header, b
}

// v1Task posts /v1/push or /v1/pull and polls /v1/tasks/<id> on poll as the
// management node does, decoding each answer into its types (lastOpTime a
// long), until the task is terminal.
func (s *mnStore) v1Task(t *testing.T, op string, body map[string]any, poll *mnStore) string {
	t.Helper()
	code, hdr, b := s.v1(t, http.MethodPost, "/v1/"+op, body)
	id := hdr.Get("X-Sync-Task-ID")
	if code != http.StatusAccepted || id == "" || id == "existed" {
		t.Fatalf("/v1/%s: %d %q %s", op, code, id, b)
	}
	deadline := time.Now().Add(2 * waitLong)
	for time.Now().Before(deadline) {
		code, _, b := poll.v1(t, http.MethodGet, "/v1/tasks/"+id, nil)
		var task struct {
			LastOpTime int64  `json:"lastOpTime"`
			Status     string `json:"status"`
		}
		if code != 200 || json.Unmarshal(b, &task) != nil || task.LastOpTime <= 0 {
			t.Fatalf("/v1/tasks/%s: %d %s", id, code, b)
		}
		switch task.Status {
		case "success":
			return id
		case "failed":
			t.Fatalf("/v1/%s task %s failed: %s", op, id, b)
		case "waiting", "running":
		default:
			t.Fatalf("/v1/tasks/%s: status %q", id, task.Status)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("/v1/%s task %s never finished", op, id)
	return ""
}

// chainOf is imgchain's answer as "name:id@blobsum" strings, top first.
func (s *mnStore) chainOf(t *testing.T, m *mgmt, installPath string) []string {
	t.Helper()
	res := s.mnAsync(t, m, "/imagestore/imgchain/", withContext(t, map[string]any{"installPath": installPath}))
	var out []string
	for _, e := range res["chain"].([]any) {
		im := e.(map[string]any)
		out = append(out, fmt.Sprintf("%s:%s@%s", im["name"], im["id"], im["blobsum"]))
	}
	return out
}

// kvmBackup plays the KVM host's backup job: allocuploaddir, exportnbdimage
// into it, the qemu-io writes through NBD (also applied to the local
// volume vol), and import-backup of <uploadDir>/<basename(imagePaths[0])>
// with processToRelease, as the management node names it.
func kvmBackup(t *testing.T, s *mnStore, m *mgmt, vol, name, parent string, size int64, writes ...string) map[string]any {
	t.Helper()
	up := s.mnSync(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 72})["uploadDir"].(string)
	if !filepath.IsAbs(up) || !strings.HasPrefix(up, s.root) {
		t.Fatalf("uploadDir %q not an absolute path in the store %s", up, s.root)
	}
	rep := s.mnAsync(t, m, "/imagestore/exportnbdimage/", withContext(t, map[string]any{"workspace": up, "sizes": []int64{size}}))
	paths, _ := rep["imagePaths"].([]any)
	ports, _ := rep["ports"].([]any)
	desc, _ := rep["nbdDescription"].(string)
	if len(paths) != 1 || len(ports) != 1 || desc == "" || filepath.Dir(paths[0].(string)) != up {
		t.Fatalf("exportnbdimage: %v (workspace %s)", rep, up)
	}
	target := fmt.Sprintf("nbd://127.0.0.1:%d", num(ports[0]))
	var io []string
	for _, w := range writes {
		io = append(io, "-c", w)
	}
	runTool(t, "qemu-io", append(append([]string{"-f", "raw"}, io...), target)...)
	runTool(t, "qemu-io", append(append([]string{"-f", "raw"}, io...), vol)...)

	body := map[string]any{
		"imgurl": filepath.Join(up, filepath.Base(paths[0].(string))), "name": name,
		"processToRelease": desc, "concurrency": 4,
	}
	if parent != "" {
		body["parent"] = parent
	}
	res := s.mnAsync(t, m, "/imagestore/import-backup/", withContext(t, body))
	if res["name"] != name || res["id"] == "" || res["format"] != "qcow2" || num(res["virtualsize"]) != size || num(res["size"]) <= 0 {
		t.Fatalf("import-backup: %v", res)
	}
	return res
}

// blobHashes hashes the stored blobs of a chain ("name:id@blobsum").
func (d *daemon) blobHashes(t *testing.T, chain []string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, c := range chain {
		sum := c[strings.LastIndex(c, "@")+1:]
		out[sum] = d.blobSHA(t, sum)
	}
	return out
}

// TestE2EManagementNodeFlow runs the management node's whole flow against
// two real daemons in the compatible profile: connect, ping,
// allocuploaddir, exportnbdimage and the KVM host's qemu-io writes,
// import-backup (full, incremental), imgchain, export by the renamed URL,
// remotetarget with guest writes, /v1/push, /v1/pull (backup recover and
// image recovery), a template by zstore:// import, gc and delete. Every
// request is shaped as the management node sends it, callbacks go to a
// stand-in for it. One function because each step works on what the steps
// before stored. It runs with both stores on local disk, and with the first
// on S3 (so replication runs between a bucket and a disk, both ways).
func TestE2EManagementNodeFlow(t *testing.T) {
	for _, tc := range []struct {
		name   string
		a, b   storageKind
		aPorts string
		bPorts string
	}{
		{"local", onDisk, onDisk, "31800-31849", "31850-31899"},
		{"s3", onS3, onDisk, "31900-31949", "31950-31999"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testManagementNodeFlow(t, storeFor(t, tc.a), storeFor(t, tc.b), tc.aPorts, tc.bPorts)
		})
	}
}

func testManagementNodeFlow(t *testing.T, aStore, bStore *bucketStore, aPorts, bPorts string) {
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (.ci/deps installs it): %v", tool, err)
		}
	}
	zs := testcert.SelfSigned(t, tlsconf.DefaultServerName) // the one certificate ZStack gives every store
	certFile, keyFile := zs.WriteFiles(t)
	a := startMNStore(t, certFile, keyFile, aPorts, aStore)
	b := startMNStore(t, certFile, keyFile, bPorts, bStore)
	m := newMgmt(t)
	bsUUID := hex32(t)
	work := t.TempDir()
	const size = 4 << 20
	vol := filepath.Join(work, "volume.raw")
	runTool(t, "qemu-img", "create", "-q", "-f", "raw", vol, fmt.Sprint(size))
	name := hex32(t) // the volume uuid is the backups' namespace

	// connect (sync) and ping (async).
	con := a.mnSync(t, "/imagestore/connect/", map[string]any{"uuid": bsUUID})
	ips, _ := con["ipAddresses"].([]any)
	for _, ip := range ips {
		if s, _ := ip.(string); s == "" || strings.Contains(s, "::") {
			t.Fatalf("connect: ipAddresses %v would break the management node's tags", ips)
		}
	}
	if num(con["totalSize"]) <= 0 || num(con["freeSize"]) <= 0 {
		t.Fatalf("connect: %v", con)
	}
	if p := a.mnAsync(t, m, "/imagestore/ping/", map[string]any{"uuid": bsUUID}); p["uuid"] != bsUUID {
		t.Fatalf("ping: %v", p)
	}

	// A full backup, then an incremental, through NBD targets.
	full := kvmBackup(t, a, m, vol, name, "", size,
		"write -P 0x11 0 1048576", "write -P 0x22 2097152 524288")
	fullPath := fmt.Sprintf("zstore://%s/%s", name, full["id"])
	inc := kvmBackup(t, a, m, vol, name, fullPath, size,
		"write -P 0x33 524288 65536", "write -z 2097152 65536")
	top := fmt.Sprintf("zstore://%s/%s", name, inc["id"])

	chain := a.chainOf(t, m, top)
	if len(chain) != 2 || !strings.HasPrefix(chain[0], name+":"+inc["id"].(string)+"@") ||
		!strings.HasPrefix(chain[1], name+":"+full["id"].(string)+"@") {
		t.Fatalf("imgchain: %v", chain)
	}

	// export: download the URL the management node publishes (the image
	// name in front of the last segment) and compare with the volume.
	exp := a.mnAsync(t, m, "/imagestore/export/", withContext(t, map[string]any{"installPath": top, "extFmt": ""}))
	imgURL, _ := exp["imgUrl"].(string)
	if !strings.HasPrefix(imgURL, "/") || strings.Contains(imgURL, "://") {
		t.Fatalf("export imgUrl %q is not relative", imgURL)
	}
	dir, seg := imgURL[:strings.LastIndex(imgURL, "/")+1], imgURL[strings.LastIndex(imgURL, "/")+1:]
	published := a.url + dir + url.PathEscape("vol backup") + "-" + seg
	data := download(t, published, "")
	if sum := md5.Sum(data); hex.EncodeToString(sum[:]) != exp["md5Sum"] {
		t.Fatalf("export md5Sum %v, downloaded %x", exp["md5Sum"], sum)
	}
	exported := filepath.Join(work, "exported"+filepath.Ext(seg))
	if err := os.WriteFile(exported, data, 0o600); err != nil {
		t.Fatal(err)
	}
	runTool(t, "qemu-img", "compare", "-F", "raw", exported, vol)

	// remotetarget: the host runs the VM on the chain; the guest writes,
	// the stored blobs stay the same.
	before := a.blobHashes(t, chain)
	rt := a.mnAsync(t, m, "/imagestore/export/remotetarget/", withContext(t, map[string]any{"installPath": top, "remoteTargetType": "NBD", "hostname": "127.0.0.1"}))
	uri, _ := rt["targetUri"].(string)
	if !strings.HasPrefix(uri, "nbd://127.0.0.1:") {
		t.Fatalf("remotetarget: %v", rt)
	}
	runTool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", uri, vol)
	runTool(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1048576", "-c", "flush", "-c", "read -P 0x77 0 1048576", uri)
	if after := a.blobHashes(t, chain); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("guest writes changed stored blobs:\n%v\n%v", before, after)
	}
	a.mnAsync(t, m, "/imagestore/remotetarget/delete/", map[string]any{"targetUri": uri})

	// Backup sync: /v1/push to the second store, polled on the first.
	repl := map[string]any{"addr": strings.TrimPrefix(b.reg, "https://"), "ca": string(zs.CertPEM()), "name": name, "id": inc["id"]}
	a.v1Task(t, "push", withContext(t, repl), a)
	if got := b.chainOf(t, m, top); fmt.Sprint(got) != fmt.Sprint(chain) {
		t.Fatalf("the peer's chain %v, want %v (same name:id, same blobs)", got, chain)
	}

	// Backup recover: delete on the first store, /v1/pull from the second,
	// polled on the receiver.
	for _, p := range []string{top, fullPath} {
		del := a.mnAsync(t, m, "/imagestore/delete/", withContext(t, map[string]any{"installPath": p, "uuid": bsUUID}))
		if num(del["totalSize"]) <= 0 || num(del["freeSize"]) <= 0 {
			t.Fatalf("delete %s: %v", p, del)
		}
	}
	a.v1Task(t, "pull", withContext(t, map[string]any{"addr": strings.TrimPrefix(b.reg, "https://"), "ca": string(zs.CertPEM()), "name": name, "id": inc["id"]}), a)
	if got := a.chainOf(t, m, top); fmt.Sprint(got) != fmt.Sprint(chain) {
		t.Fatalf("recovered chain %v, want %v", got, chain)
	}
	exp = a.mnAsync(t, m, "/imagestore/export/", withContext(t, map[string]any{"installPath": top, "extFmt": ""}))
	data = download(t, a.url+exp["imgUrl"].(string), "")
	if err := os.WriteFile(exported, data, 0o600); err != nil {
		t.Fatal(err)
	}
	runTool(t, "qemu-img", "compare", "-F", "raw", exported, vol)

	// Image recovery: the management node posts pull to the store holding
	// the image (src) with addr = the store to recover it on (dst), and
	// polls dst.
	for _, p := range []string{top, fullPath} {
		b.mnAsync(t, m, "/imagestore/delete/", withContext(t, map[string]any{"installPath": p, "uuid": bsUUID}))
	}
	a.v1Task(t, "pull", withContext(t, map[string]any{"addr": strings.TrimPrefix(b.reg, "https://"), "ca": string(zs.CertPEM()), "name": name, "id": inc["id"]}), b)
	if got := b.chainOf(t, m, top); fmt.Sprint(got) != fmt.Sprint(chain) {
		t.Fatalf("chain recovered on dst %v, want %v", got, chain)
	}

	// Template from a volume backup: zstore://<bs-host>/<name>/<id> with
	// cacert, imported on the first store after it lost the chain, so the
	// chain comes from the second store's registry (verified as
	// store.zstack.org while dialling 127.0.0.1).
	for _, p := range []string{top, fullPath} {
		a.mnAsync(t, m, "/imagestore/delete/", withContext(t, map[string]any{"installPath": p, "uuid": bsUUID}))
	}
	gone := hex32(t)
	a.post(t, "/imagestore/imgchain/", map[string]any{"installPath": top}, map[string]string{"taskuuid": gone, "callbackurl": m.srv.URL + "/zstack/asyncrest/callback"})
	if v := m.wait(t, gone); v["success"] != false {
		t.Fatalf("the first store still holds %s: %v", top, v)
	}
	imageUUID := hex32(t)
	tpl := a.mnAsync(t, m, "/imagestore/import/", withContext(t, map[string]any{
		"imgurl": fmt.Sprintf("zstore://%s/%s/%s", strings.TrimPrefix(b.reg, "https://"), name, inc["id"]),
		"name":   imageUUID, "arch": "amd64", "desc": "template-from-backup", "tag": time.Now().Format("20060102-150405"),
		"user": hex32(t), "uuid": bsUUID, "imageuuid": imageUUID, "cacert": string(zs.CertPEM()), "concurrency": 4,
	}))
	if tpl["name"] != imageUUID || tpl["format"] != "qcow2" || num(tpl["virtualsize"]) != size || num(tpl["size"]) <= 0 {
		t.Fatalf("template import: %v", tpl)
	}
	tplPath := fmt.Sprintf("zstore://%s/%s", imageUUID, tpl["id"])
	// The chain came from the second store: the first holds it again, the same.
	if got := a.chainOf(t, m, top); fmt.Sprint(got) != fmt.Sprint(chain) {
		t.Fatalf("chain pulled for the template %v, want %v", got, chain)
	}
	if c := a.chainOf(t, m, tplPath); len(c) != 1 {
		t.Fatalf("template is not standalone: %v", c)
	}
	exp = a.mnAsync(t, m, "/imagestore/export/", withContext(t, map[string]any{"installPath": tplPath, "extFmt": ""}))
	data = download(t, a.url+exp["imgUrl"].(string), "")
	if err := os.WriteFile(exported, data, 0o600); err != nil {
		t.Fatal(err)
	}
	runTool(t, "qemu-img", "compare", "-F", "raw", exported, vol)

	// gc keeps the chain, delete reports the capacity.
	gc := a.mnAsync(t, m, "/imagestore/gc/", withContext(t, map[string]any{"imagesToKeep": []string{top, tplPath}}))
	if _, ok := gc["freed"].(float64); !ok {
		t.Fatalf("gc: %v", gc)
	}
	if got := a.chainOf(t, m, top); fmt.Sprint(got) != fmt.Sprint(chain) {
		t.Fatalf("gc lost the kept chain: %v", got)
	}
	for _, p := range []string{tplPath, top} {
		del := a.mnAsync(t, m, "/imagestore/delete/", withContext(t, map[string]any{"installPath": p, "uuid": bsUUID}))
		if num(del["totalSize"]) <= 0 || num(del["freeSize"]) <= 0 {
			t.Fatalf("delete %s: %v", p, del)
		}
	}
}

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// regAddr finds the registry port a daemon logged ("registry listening").
func regAddr(t *testing.T, d *daemon) string {
	t.Helper()
	deadline := time.Now().Add(waitLong)
	for time.Now().Before(deadline) {
		for _, line := range strings.Split(d.log(), "\n") {
			var rec struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "registry listening" {
				return rec.Addr
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("registry never listened:\n%s", d.log())
	return ""
}

// regCall does one request on a daemon's registry port.
func regCall(t *testing.T, d *daemon, method, path string, body any) (int, http.Header, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		j, _ := json.Marshal(body)
		rd = strings.NewReader(string(j))
	}
	req, _ := http.NewRequest(method, "http://"+regAddr(t, d)+path, rd)
	if d.token != "" {
		req.Header.Set("Authorization", "Bearer "+d.token)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, res.Header, b
}

type replTask struct {
	Status     string `json:"status"`
	LastOpTime int64  `json:"lastOpTime"`
	BytesDone  int64  `json:"bytesDone"`
	BytesTotal int64  `json:"bytesTotal"`
	Error      string `json:"error"`
}

// startRepl posts /v1/push or /v1/pull and returns the X-Sync-Task-ID.
func startRepl(t *testing.T, d *daemon, op string, body map[string]any) string {
	t.Helper()
	code, hdr, b := regCall(t, d, "POST", "/v1/"+op, body)
	if code != 200 && code != 202 || hdr.Get("X-Sync-Task-ID") == "" {
		t.Fatalf("/v1/%s: %d %s", op, code, b)
	}
	return hdr.Get("X-Sync-Task-ID")
}

func taskStatus(t *testing.T, d *daemon, id string) replTask {
	t.Helper()
	code, _, b := regCall(t, d, "GET", "/v1/tasks/"+id, nil)
	var rt replTask
	if code != 200 || json.Unmarshal(b, &rt) != nil {
		t.Fatalf("task %s: %d %s", id, code, b)
	}
	return rt
}

func waitTask(t *testing.T, d *daemon, id string) replTask {
	t.Helper()
	deadline := time.Now().Add(2 * waitLong)
	for time.Now().Before(deadline) {
		rt := taskStatus(t, d, id)
		switch rt.Status {
		case "success", "failed":
			return rt
		case "waiting", "running":
		default:
			t.Fatalf("task %s: unknown status %q", id, rt.Status)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("task %s never finished", id)
	return replTask{}
}

func blobFile(root, blobsum string) string {
	hexd := strings.TrimPrefix(blobsum, "sha256:")
	return filepath.Join(root, "blobs", "sha256", hexd[:2], hexd)
}

// tags lists a daemon's registry tags of a repository (none = empty).
func tags(t *testing.T, d *daemon, name string) []string {
	t.Helper()
	code, _, b := regCall(t, d, "GET", "/v2/"+name+"/tags/list", nil)
	if code == 404 {
		return nil
	}
	var tl struct{ Tags []string }
	if code != 200 || json.Unmarshal(b, &tl) != nil {
		t.Fatalf("tags: %d %s", code, b)
	}
	return tl.Tags
}

// completeListing checks that every image a daemon lists has a complete
// chain: its manifest (which needs every chain blob) is served.
func completeListing(t *testing.T, d *daemon, name string) []string {
	t.Helper()
	ids := tags(t, d, name)
	for _, id := range ids {
		if code, _, b := regCall(t, d, "HEAD", "/v2/"+name+"/manifests/"+id, nil); code != 200 {
			t.Fatalf("%s:%s listed with an incomplete chain: %d %s", name, id, code, b)
		}
	}
	return ids
}

type layerMaker struct {
	t    *testing.T
	d    *daemon
	m    *mgmt
	work string
	up   string
	prev string // source qcow2 of the last layer
	ip   string // install path of the last layer
	n    int
}

// add makes a qemu delta on top of the previous one (qemu-io commands)
// and imports it as a backup layer; it returns the source file, id and blobsum.
func (lm *layerMaker) add(cmds ...string) (src, id, blobsum string, size int64) {
	t := lm.t
	src = filepath.Join(lm.work, fmt.Sprintf("l%02d.qcow2", lm.n))
	args := []string{"create", "-q", "-f", "qcow2"}
	if lm.prev != "" {
		args = append(args, "-b", lm.prev, "-F", "qcow2")
	}
	runTool(t, "qemu-img", append(args, src, "64M")...)
	io := []string{}
	for _, c := range cmds {
		io = append(io, "-c", c)
	}
	runTool(t, "qemu-io", append(io, src)...)
	up := filepath.Join(lm.up, filepath.Base(src))
	copyInto(t, src, up)
	ip := lm.d.sync(t, "/imagestore/installpath/allocate", map[string]any{"parent": lm.ip})["installPath"].(string)
	res := lm.d.async(t, lm.m, "/imagestore/import-backup/", map[string]any{"imgurl": "file://" + up, "name": "vol", "parent": lm.ip, "installPath": ip})
	mustSucceed(t, "import-backup", res)
	info := lm.d.async(t, lm.m, "/imagestore/imginfo/", map[string]any{"installPath": ip})
	mustSucceed(t, "imginfo", info)
	lm.prev, lm.ip = src, ip
	lm.n++
	return src, res["id"].(string), info["blobsum"].(string), num(res["size"])
}

func (lm *layerMaker) name() string {
	return strings.SplitN(strings.TrimPrefix(lm.ip, "zstore://"), "/", 2)[0]
}

// TestE2EReplication replicates a 10-layer chain between two stores: a
// push, a no-op re-push, an incremental push. One function because each step
// starts from the state the step before left on both stores. It runs with
// every store on local disk, and with A and B on S3 (C stays on disk), so
// B's kill -9 mid-push and its quota happen on a bucket.
func TestE2EReplication(t *testing.T) {
	for _, kind := range []storageKind{onDisk, onS3} {
		t.Run(string(kind), func(t *testing.T) { testReplication(t, kind) })
	}
}

func testReplication(t *testing.T, kind storageKind) {
	const token = "repl-token"
	aOpts := daemonOpts{token: token, s3: storeFor(t, kind)}
	a := startDaemon(t, aOpts)
	bPort := freePortClosed(t)
	bRoot := filepath.Join(t.TempDir(), "b-store")
	bOpts := daemonOpts{token: token, root: bRoot, env: []string{"IMAGESTORE_REGISTRY_LISTEN=" + bPort}, s3: storeFor(t, kind)}
	b := startDaemon(t, bOpts)
	c := startDaemon(t, daemonOpts{token: token})
	m := newMgmt(t)
	lm := &layerMaker{t: t, d: a, m: m, work: t.TempDir(), up: a.sync(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 2})["uploadDir"].(string)}

	// A 10-layer chain on A.
	var ids, blobs []string
	for i := 0; i < 10; i++ {
		_, id, bs, _ := lm.add(fmt.Sprintf("write -P 0x%02x %dM 1M", i+1, i*3), fmt.Sprintf("write -P 0x%02x %dk 64k", 0x80+i, 32*1024+i*128))
		ids, blobs = append(ids, id), append(blobs, bs)
	}
	name, top := lm.name(), ids[9]
	toB := map[string]any{"name": name, "id": top, "addr": regAddr(t, b), "token": token}

	// Push A→B; B's chain equals the source.
	if rt := waitTask(t, a, startRepl(t, a, "push", toB)); rt.Status != "success" || rt.BytesDone != rt.BytesTotal || rt.BytesTotal <= 0 {
		t.Fatalf("push A→B: %+v", rt)
	}
	runTool(t, "qemu-img", "compare", "-q", lm.prev, b.blobCopy(t, blobs[9]))
	if got := completeListing(t, b, name); len(got) != 10 {
		t.Fatalf("B lists %v", got)
	}

	// Again: existed, and no blob byte moves.
	sentA, recvB := scrapeValue(t, a, "imagestore_replication_sent_bytes_total"), scrapeValue(t, b, "imagestore_replication_received_bytes_total")
	if id := startRepl(t, a, "push", toB); id != "existed" {
		t.Fatalf("second push: %q", id)
	}
	if s, r := scrapeValue(t, a, "imagestore_replication_sent_bytes_total"), scrapeValue(t, b, "imagestore_replication_received_bytes_total"); s != sentA || r != recvB {
		t.Fatalf("no-op push moved bytes: sent %v→%v, received %v→%v", sentA, s, recvB, r)
	}

	// A new incremental moves only its layer.
	_, id11, _, size11 := lm.add("write -P 0x77 40M 2M")
	toB["id"] = id11
	if rt := waitTask(t, a, startRepl(t, a, "push", toB)); rt.Status != "success" || rt.BytesTotal != size11 {
		t.Fatalf("incremental push: %+v (layer %d bytes)", rt, size11)
	}
	if s := scrapeValue(t, a, "imagestore_replication_sent_bytes_total"); s-sentA != float64(size11) {
		t.Fatalf("incremental push sent %v bytes, layer is %d", s-sentA, size11)
	}
	src11 := lm.prev

	// A byte flips in one of A's blobs: a push to C fails naming it, C
	// lists nothing; a pull from B repairs A.
	bad := blobs[3]
	a.corruptBlob(t, bad, 4096)
	if a.s3 != nil {
		// A's read cache holds chunks of blobs it read (immutable once
		// committed); a change behind its back shows once they are evicted,
		// or, as here, after a restart.
		a.stop(syscall.SIGTERM)
		aOpts.root = a.root
		a = startDaemon(t, aOpts)
		lm.d = a
	}
	toC := map[string]any{"name": name, "id": id11, "addr": regAddr(t, c), "token": token}
	if rt := waitTask(t, a, startRepl(t, a, "push", toC)); rt.Status != "failed" || !strings.Contains(rt.Error, bad) {
		t.Fatalf("push of a corrupt chain: %+v", rt)
	}
	if got := completeListing(t, c, name); len(got) != 0 {
		t.Fatalf("C lists %v after a failed push", got)
	}
	if rt := waitTask(t, a, startRepl(t, a, "pull", toB)); rt.Status != "success" {
		t.Fatalf("repairing pull on A: %+v", rt)
	}
	if got := a.blobSHA(t, bad); got != bad {
		t.Fatalf("A's repaired blob hashes to %s", got)
	}

	// C pulls from B (three daemons); the flattened chain equals the source.
	if rt := waitTask(t, c, startRepl(t, c, "pull", map[string]any{"name": name, "id": id11, "addr": regAddr(t, b), "token": token})); rt.Status != "success" {
		t.Fatalf("pull B→C: %+v", rt)
	}
	runTool(t, "qemu-img", "compare", "-q", src11, c.blobCopy(t, sha256Of(t, c, name, id11)))

	// kill -9 B in the middle of a push, restart it on the same port.
	_, id12, _, _ := lm.add("write -P 0x99 8M 32M")
	src12 := lm.prev
	toB["id"] = id12
	toB["networkWriteBandwidth"] = 8 << 20
	task := startRepl(t, a, "push", toB)
	deadline := time.Now().Add(waitLong)
	for taskStatus(t, a, task).BytesDone < 4<<20 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if rt := taskStatus(t, a, task); rt.Status != "running" {
		t.Fatalf("task not mid-flight when killing B: %+v", rt)
	}
	b.stop(syscall.SIGKILL)
	b = startDaemon(t, bOpts)
	for _, id := range completeListing(t, b, name) { // never a partial chain
		if id == id12 {
			t.Log("B already lists the new image (task finished around the kill)")
		}
	}
	rt := waitTask(t, a, task)
	if rt.Status == "failed" {
		t.Logf("push interrupted by the kill failed cleanly: %s; retrying", rt.Error)
		rt = waitTask(t, a, startRepl(t, a, "push", toB))
	}
	if rt.Status != "success" {
		t.Fatalf("push after B's restart: %+v", rt)
	}
	runTool(t, "qemu-img", "compare", "-q", src12, b.blobCopy(t, sha256Of(t, b, name, id12)))

	// B's quota fills: a clean failure, no partial chain listed.
	mustSucceed(t, "setquota", b.async(t, m, "/imagestore/setquota/", map[string]any{"maxCapacity": 1}))
	_, id13, _, _ := lm.add("write -P 0x42 0 16M")
	toB["id"] = id13
	delete(toB, "networkWriteBandwidth")
	if rt := waitTask(t, a, startRepl(t, a, "push", toB)); rt.Status != "failed" || !strings.Contains(strings.ToLower(rt.Error), "quota") {
		t.Fatalf("push over quota: %+v", rt)
	}
	for _, id := range completeListing(t, b, name) {
		if id == id13 {
			t.Fatal("B lists the image whose push failed")
		}
	}
}

// sha256Of returns the blobsum of name:id through the daemon's imginfo.
func sha256Of(t *testing.T, d *daemon, name, id string) string {
	t.Helper()
	code, _, body := regCall(t, d, "GET", "/v2/"+name+"/manifests/"+id, nil)
	var man struct {
		Layers []struct{ Digest string }
	}
	if code != 200 || json.Unmarshal(body, &man) != nil || len(man.Layers) == 0 {
		t.Fatalf("manifest %s:%s: %d %s", name, id, code, body)
	}
	return man.Layers[len(man.Layers)-1].Digest
}

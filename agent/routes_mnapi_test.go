package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/internal/testwait"
)

// canceljob-sync cancels every job of an API id (threadContext.api) and
// answers once they have ended; each reports its own failure.
func TestCancelJobByAPI(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, func(c *config.Config) { c.Debug = true })
	cb := newCBSink(t)
	send := func(task, api string) {
		body := fmt.Sprintf(`{"millis":600000,"threadContext":{"api":%q},"threadContextStack":[]}`, api)
		if r := e.do(t, http.MethodPost, "/imagestore/debug/sleep/", body, map[string]string{"taskuuid": task, "callbackurl": cb.srv.URL}); r.code != 200 {
			t.Fatalf("sleep: %s", r.raw)
		}
	}
	send("s1", "api-1")
	send("s2", "api-1")
	send("s3", "api-2")
	testwait.For(t, "jobs running", func() bool {
		n := 0
		for _, in := range e.a.jobs.List() {
			if in.State == "running" {
				n++
			}
		}
		return n == 3
	})
	r := e.do(t, http.MethodPost, "/imagestore/canceljob-sync", `{"cancellationApiId":"api-1"}`, nil)
	if r.code != 200 || r.body["success"] != true || fmt.Sprint(r.body["cancelled"]) != "[s1 s2]" {
		t.Fatalf("canceljob-sync: %d %s", r.code, r.raw)
	}
	for _, id := range []string{"s1", "s2"} {
		res := cb.wait(t, id)
		if res["success"] != false || !strings.Contains(res["error"].(string), "cancelled") {
			t.Fatalf("%s callback %v", id, res)
		}
	}
	if j, _ := e.a.jobs.Get("s3"); j.Info().State != "running" {
		t.Fatalf("a job of another API was touched: %s", j.Info().State)
	}
	// Nothing to cancel is a success; a missing id says which field.
	if r := e.do(t, http.MethodPost, "/imagestore/canceljob-sync/", `{"cancellationApiId":"api-1"}`, nil); r.body["success"] != true {
		t.Fatalf("nothing to cancel: %s", r.raw)
	}
	if r := e.do(t, http.MethodPost, "/imagestore/canceljob-sync/", `{}`, nil); r.code != 200 || r.body["success"] != false || !strings.Contains(r.errMsg(), "cancellationApiId") {
		t.Fatalf("no id: %d %s", r.code, r.raw)
	}
	// job/get reports the API id recorded.
	if r := e.do(t, http.MethodPost, "/imagestore/job/get/", `{"taskuuid":"s3"}`, nil); !strings.Contains(r.raw, `"api":"api-2"`) {
		t.Fatalf("job/get: %s", r.raw)
	}
}

// import/cancel stops a running URL import of the image: the import fails
// through its own callback and leaves no image and no partial data.
func TestImportCancelLeavesNothing(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	srv := newImageServer(t)
	cb := newCBSink(t)
	const image = "1b2c3d4e5f60718293a4b5c6d7e8f9a0"
	body := fmt.Sprintf(`{"imgurl":%q,"name":%q,"arch":"amd64","desc":"centos7","imageuuid":%q,"concurrency":4,"threadContext":{"api":"api-import"}}`,
		srv.URL+"/slow", image, image)
	if r := e.do(t, http.MethodPost, "/imagestore/import/", body, map[string]string{"taskuuid": "imp", "callbackurl": cb.srv.URL}); r.code != 200 {
		t.Fatalf("import: %s", r.raw)
	}
	testwait.For(t, "import receiving", func() bool {
		j, ok := e.a.jobs.Get("imp")
		return ok && j.Info().Done > 0
	})
	cancel := fmt.Sprintf(`{"imgurl":%q,"name":%q,"imageuuid":%q,"cancellationApiId":"api-cancel","threadContext":{"api":"api-cancel"}}`, srv.URL+"/slow", image, image)
	if r := e.do(t, http.MethodPost, "/imagestore/import/cancel", cancel, map[string]string{"taskuuid": "cancel", "callbackurl": cb.srv.URL}); r.code != 200 {
		t.Fatalf("import/cancel: %s", r.raw)
	}
	if res := cb.wait(t, "cancel"); res["success"] != true || fmt.Sprint(res["cancelled"]) != "[imp]" {
		t.Fatalf("import/cancel callback %v", res)
	}
	if res := cb.wait(t, "imp"); res["success"] != false || !strings.Contains(res["error"].(string), "cancelled") {
		t.Fatalf("import callback %v", res)
	}
	if imgs, err := e.store.ListImages(context.Background(), ""); err != nil || len(imgs) != 0 {
		t.Fatalf("images after a cancelled import: %v %v", imgs, err)
	}
	ents, _ := os.ReadDir(filepath.Join(e.a.root, "ingest"))
	if len(ents) != 0 {
		t.Fatalf("partial data left in ingest/: %v", ents)
	}
}

// getlocalfilesize answers files an import could read and refuses the
// rest of the host, saying why.
func TestGetLocalFileSizeConfined(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	dir, err := e.a.uploads.Alloc(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(dir.Path, "a.qcow2")
	if err := os.WriteFile(f, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc/passwd", filepath.Join(dir.Path, "link")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, want string }{
		{f, ""},
		{filepath.Join(dir.Path, "link"), "escapes the upload dirs"},
		{dir.Path + "/../../store.json", "escapes the upload dirs"},
		{"relative/file", "not an absolute path"},
		{filepath.Join(dir.Path, "absent"), "no such file"},
		{"", "missing field path"},
	} {
		r := e.do(t, http.MethodPost, "/imagestore/getlocalfilesize-sync/", fmt.Sprintf(`{"path":%q}`, tc.path), nil)
		if tc.want == "" {
			if r.body["success"] != true || r.body["size"] != float64(4096) {
				t.Fatalf("%s: %s", tc.path, r.raw)
			}
			continue
		}
		if r.code != 200 || r.body["success"] != false || !strings.Contains(r.errMsg(), tc.want) {
			t.Fatalf("%s: %d %s, want error %q", tc.path, r.code, r.raw, tc.want)
		}
	}
}

// connect never reports what breaks the management node's tags.
func TestConnectAddresses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cc   config.Connect
		want string
		si   string
	}{
		{"configured", config.Connect{IPAddresses: []string{"10.10.0.20", "192.168.1.20"}}, `["10.10.0.20","192.168.1.20"]`, `{"type":"sshfs","url":"ROOT","options":"defaults"}`},
		{"ipv6 allowed in full form", config.Connect{IPAddresses: []string{"10.0.0.1", "2001:db8:0:1:2:3:4:5"}, AllowIPv6: true, StorageInfo: "none"},
			`["10.0.0.1","2001:db8:0:1:2:3:4:5"]`, ``},
		{"nfs", config.Connect{IPAddresses: []string{"10.0.0.1"}, StorageInfo: "nfs", StorageURL: "10.0.0.1:/export/bs", StorageOptions: "vers=4"},
			`["10.0.0.1"]`, `{"type":"nfs","url":"10.0.0.1:/export/bs","options":"vers=4"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newHTEnv(t, func(c *config.Config) { c.Connect = tc.cc })
			r := e.do(t, http.MethodPost, "/imagestore/connect/", `{"uuid":"u"}`, nil)
			if !strings.Contains(r.raw, `"ipAddresses":`+tc.want) {
				t.Fatalf("%s", r.raw)
			}
			si := strings.ReplaceAll(tc.si, "ROOT", e.a.root)
			if (si == "") != !strings.Contains(r.raw, "storageInfo") || (si != "" && !strings.Contains(r.raw, `"storageInfo":`+si)) {
				t.Fatalf("storageInfo: %s, want %s", r.raw, si)
			}
		})
	}
	// Host addresses (no list configured): IPv4 only, never empty, never "::".
	e := newHTEnv(t, nil)
	r := e.do(t, http.MethodPost, "/imagestore/connect/", `{"uuid":"u"}`, nil)
	ips, _ := r.body["ipAddresses"].([]any)
	if len(ips) == 0 {
		t.Fatalf("empty ipAddresses: %s", r.raw)
	}
	for _, ip := range ips {
		if strings.Contains(ip.(string), ":") {
			t.Fatalf("IPv6 address %v listed by default: %s", ip, r.raw)
		}
	}
	// A configuration that would break the tags is refused at start.
	for _, cc := range []config.Connect{
		{IPAddresses: []string{"fe80::1"}},
		{IPAddresses: []string{"fe80::1"}, AllowIPv6: true},
		{IPAddresses: []string{"not-an-ip"}},
		{StorageInfo: "nfs"},
		{StorageInfo: "nfs", StorageURL: "a::b", StorageOptions: "x"},
		{StorageInfo: "iscsi"},
	} {
		cfg := config.Default()
		cfg.Connect = cc
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "connect.") {
			t.Errorf("%+v accepted: %v", cc, err)
		}
	}
}

// ping reports the connect uuid; it is kept across a restart (agent.json),
// so a restart alone does not force the management node to reconnect.
func TestPingUUIDAcrossRestart(t *testing.T) {
	t.Parallel()
	a, store := newHTAgent(t, nil)
	e := &htEnv{a: a, store: store}
	srv := newTestServer(t, a)
	e.srv = srv
	if r := e.do(t, http.MethodPost, "/imagestore/ping-sync/", `{"uuid":"x"}`, nil); r.body["uuid"] != "" {
		t.Fatalf("ping before any connect: %s", r.raw)
	}
	e.do(t, http.MethodPost, "/imagestore/connect/", `{"uuid":"bs-1"}`, nil)
	if r := e.do(t, http.MethodPost, "/imagestore/ping-sync/", `{"uuid":"bs-1"}`, nil); r.body["uuid"] != "bs-1" {
		t.Fatalf("ping after connect: %s", r.raw)
	}
	a2, err := New(a.cfg, store, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a2.Close() })
	e2 := &htEnv{a: a2, store: store, srv: newTestServer(t, a2)}
	if r := e2.do(t, http.MethodPost, "/imagestore/ping-sync/", `{"uuid":"bs-1"}`, nil); r.body["uuid"] != "bs-1" {
		t.Fatalf("ping after a restart: %s", r.raw)
	}
}

func newTestServer(t *testing.T, a *Agent) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	return srv
}

// gc takes a keep list of tens of MB (its own body limit, not the global
// one): a 20 MiB list is accepted and its image kept; a body over the gc
// limit fails through the callback, saying so.
func TestGCLargeKeepList(t *testing.T) {
	t.Parallel()
	const limit = 24 << 20
	e := newHTEnv(t, func(c *config.Config) { c.MaxLargeBodyBytes = limit })
	cb := newCBSink(t)
	keep := goldenPut(t, e.store, "5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60", "2c8f1e0d9b7a6c5d4e3f2a1b0c9d8e7f", "", "kept")
	gone := goldenPut(t, e.store, "1b2c3d4e5f60718293a4b5c6d7e8f9a0", "7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d", "", "collected")
	body := func(size int) string {
		var b strings.Builder
		b.WriteString(`{"imagesToKeep":["` + keep.InstallPath() + `"`)
		for i := 0; b.Len() < size-200; i++ {
			fmt.Fprintf(&b, `,"zstore://%032x/%032x"`, i, i)
		}
		b.WriteString(`],"threadContext":{"api":"gc"}}`)
		return b.String()
	}
	big := body(20 << 20)
	if r := e.do(t, http.MethodPost, "/imagestore/gc/", big, map[string]string{"taskuuid": "gc20", "callbackurl": cb.srv.URL}); r.code != 200 {
		t.Fatalf("gc: %d %.300s", r.code, r.raw)
	}
	res := cb.wait(t, "gc20")
	if res["success"] != true {
		t.Fatalf("20 MiB keep list: %v", res["error"])
	}
	if _, err := e.store.GetImage(context.Background(), keep.Ref); err != nil {
		t.Fatalf("kept image collected: %v", err)
	}
	if _, err := e.store.GetImage(context.Background(), gone.Ref); err == nil {
		t.Fatal("image not in the keep list survived")
	}
	// Other paths keep the 1 MiB limit.
	if r := e.do(t, http.MethodPost, "/imagestore/connect/", `{"uuid":"`+strings.Repeat("a", 2<<20)+`"}`, nil); r.body["success"] != false || !strings.Contains(r.errMsg(), "too large") {
		t.Fatalf("connect took a 2 MiB body: %.200s", r.raw)
	}
	over := big + strings.Repeat(" ", limit+1024-len(big)) // JSON may end in white space
	if r := e.do(t, http.MethodPost, "/imagestore/gc/", over, map[string]string{"taskuuid": "gcbig", "callbackurl": cb.srv.URL}); r.code != 200 {
		t.Fatalf("gc over the limit: %d", r.code)
	}
	if res := cb.wait(t, "gcbig"); res["success"] != false || !strings.Contains(res["error"].(string), fmt.Sprint(limit)) {
		t.Fatalf("gc over the limit: %v", res)
	}
}

// gc while an import is receiving keeps what it has written, even though
// the keep list cannot name it yet.
func TestGCKeepsInFlightImport(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	srv := newImageServer(t)
	cb := newCBSink(t)
	const image = "1b2c3d4e5f60718293a4b5c6d7e8f9a0"
	kept := goldenPut(t, e.store, "5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60", "2c8f1e0d9b7a6c5d4e3f2a1b0c9d8e7f", "", "kept")
	body := fmt.Sprintf(`{"imgurl":%q,"name":%q,"imageuuid":%q,"concurrency":4}`, srv.URL+"/slow", image, image)
	if r := e.do(t, http.MethodPost, "/imagestore/import/", body, map[string]string{"taskuuid": "imp", "callbackurl": cb.srv.URL}); r.code != 200 {
		t.Fatalf("import: %s", r.raw)
	}
	testwait.For(t, "import receiving", func() bool {
		j, ok := e.a.jobs.Get("imp")
		return ok && j.Info().Done > 0
	})
	ingests := func() int {
		ents, _ := os.ReadDir(filepath.Join(e.a.root, "ingest"))
		return len(ents)
	}
	before := ingests()
	if before == 0 {
		t.Fatal("the import has no ingest to protect")
	}
	gc := fmt.Sprintf(`{"imagesToKeep":[%q,"http://192.168.1.20:8001/imagestore/upload/x/y"]}`, kept.InstallPath())
	if r := e.do(t, http.MethodPost, "/imagestore/gc-sync/", gc, nil); r.body["success"] != true || r.body["skippedCount"] != float64(1) {
		t.Fatalf("gc: %s", r.raw)
	}
	if j, _ := e.a.jobs.Get("imp"); j.Info().State != "running" || ingests() != before {
		t.Fatalf("gc disturbed the running import: %s, %d ingests (was %d)", j.Info().State, ingests(), before)
	}
	if _, err := e.a.jobs.Cancel("imp"); err != nil {
		t.Fatal(err)
	}
	cb.wait(t, "imp")
}

// The image-metadata file through the management node's calls: written,
// read back, one image replaced, one deleted; it lives under the store root.
func TestImageMetadataFlow(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	root := e.a.root
	call := func(path string, body map[string]any) map[string]any {
		t.Helper()
		b, _ := json.Marshal(body)
		r := e.do(t, http.MethodPost, path, string(b), nil)
		if r.code != 200 || r.body["success"] != true {
			t.Fatalf("%s: %d %s", path, r.code, r.raw)
		}
		return r.body
	}
	if r := call("/imagestore/checkimagemetadatafileexist-sync/", map[string]any{"backupStoragePath": root}); r["exist"] != false {
		t.Fatalf("exist before generate: %v", r)
	}
	if r := call("/imagestore/generateimagemetadatafile-sync/", map[string]any{"backupStoragePath": root}); r["backupStorageMetaFileName"] != "bs_file_info.json" {
		t.Fatalf("generate: %v", r)
	}
	if r := call("/imagestore/checkimagemetadatafileexist-sync/", map[string]any{"backupStoragePath": root}); r["exist"] != true {
		t.Fatalf("exist after generate: %v", r)
	}
	a := `{"uuid":"aaaa","name":"a","backupStorageRefs":[{"installPath":"zstore://aaaa/1"}]}`
	b := `{"uuid":"bbbb","name":"b","backupStorageRefs":[{"installPath":"zstore://bbbb/1"}]}`
	b2 := `{"uuid":"bbbb","name":"b2","backupStorageRefs":[{"installPath":"zstore://bbbb/1"}]}`
	call("/imagestore/dumpimagemetadatatofile-sync/", map[string]any{"backupStoragePath": root, "imageMetaData": a + "\n" + b, "dumpAllMetaData": true})
	call("/imagestore/dumpimagemetadatatofile-sync/", map[string]any{"backupStoragePath": root, "imageMetaData": b2, "dumpAllMetaData": false})
	if r := call("/imagestore/getimagesmetadata-sync/", map[string]any{"backupStoragePath": root}); r["imagesMetaData"] != a+"\n"+b2+"\n" {
		t.Fatalf("read back: %q", r["imagesMetaData"])
	}
	if r := call("/imagestore/deleteimagesmetadata-sync/", map[string]any{"imageUuid": "aaaa", "imageBackupStorageUuid": "bs", "backupStoragePath": root}); r["ret"] != float64(0) {
		t.Fatalf("delete: %v", r)
	}
	got, err := os.ReadFile(filepath.Join(root, "bs_file_info.json"))
	if err != nil || string(got) != b2+"\n" {
		t.Fatalf("file after delete: %q %v", got, err)
	}
	// Missing imageUuid: a clear error.
	r := e.do(t, http.MethodPost, "/imagestore/deleteimagesmetadata-sync/", `{"backupStoragePath":"/x"}`, nil)
	if r.body["success"] != false || !strings.Contains(r.errMsg(), "imageUuid") {
		t.Fatalf("delete without imageUuid: %s", r.raw)
	}
}

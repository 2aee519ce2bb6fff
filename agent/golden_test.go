package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/blobstore"
)

// Golden exchanges: every file in agent/api/testdata/golden is one path
// of the management node's protocol, with the request exactly as the
// management node sends it (Gson: nulls absent, primitives present,
// threadContext on commands that carry it) and the Java types of the
// reply class it parses the answer into. The test sends the request to a
// fresh agent the management node's way (async: taskuuid and callbackurl
// headers, an immediate 200, the result in exactly one callback; sync:
// inline, status 200) and checks the reply strictly against those types.
//
// A fixture:
//
//	{
//	  "path":    "/imagestore/ping/",          // exact, as the management node sends it
//	  "mode":    "async",                      // or "sync"
//	  "setup":   "connected",                  // optional: a goldenSetups entry; its vars fill ${name}
//	  "request": {"uuid": "…"},                // the body; absent = empty body
//	  "reply":   {"uuid": "String", …},        // field → Java type (goldenKinds); success/error implied
//	  "success": true,                         // the outcome the test expects
//	  "error":   "…",                          // with success false: a substring of error
//	  "check":   "connect",                    // optional: a goldenChecks entry for values
//	  "noTwin":  true                          // optional: skip the -sync twin (not repeatable)
//	}
//
// Java types: long, int, boolean (primitives: must be present on
// success, since absent means 0/false to the management node); Long,
// Integer, Boolean, String (boxed: may be absent; a trailing "!" says
// present anyway); List<String>, List<Long>, List<Integer>,
// List<ImageInfo>, StorageInfo, Map<String,Long>. A value of another JSON
// kind fails the test, as it fails the management node's parse.
const goldenDir = "api/testdata/golden"

type goldenFixture struct {
	Path    string            `json:"path"`
	Mode    string            `json:"mode"`
	Setup   string            `json:"setup"`
	Request json.RawMessage   `json:"request"`
	Reply   map[string]string `json:"reply"`
	Success bool              `json:"success"`
	Error   string            `json:"error"`
	Check   string            `json:"check"`
	// NoTwin skips the -sync twin, for requests that cannot run twice
	// (an import of the same image).
	NoTwin bool `json:"noTwin"`
	// Example is an illustrative reply for readers; not compared.
	Example json.RawMessage `json:"example"`
}

// goldenEnv is what a setup gets: a fresh agent behind a server.
type goldenEnv struct {
	*htEnv
	root string
}

// goldenSetups prepare an agent for a fixture and return the values of
// the fixture's ${name} placeholders.
var goldenSetups = map[string]func(t *testing.T, e *goldenEnv) map[string]string{
	"connected": func(t *testing.T, e *goldenEnv) map[string]string {
		if r := e.do(t, http.MethodPost, "/imagestore/connect/", `{"uuid":"a6f5d0d6c5e54b6f8f0b8d9f5c1e2a3b"}`, nil); r.body["success"] != true {
			t.Fatalf("connect: %s", r.raw)
		}
		return nil
	},
	// A backup chain base ← top, and a separate image.
	"images": func(t *testing.T, e *goldenEnv) map[string]string {
		base := goldenPut(t, e.store, "5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60", "2c8f1e0d9b7a6c5d4e3f2a1b0c9d8e7f", "", "base layer")
		top := goldenPut(t, e.store, base.Name, "9d4b7a1c3e5f60718293a4b5c6d7e8f9", base.Ref.String(), "top layer")
		other := goldenPut(t, e.store, "1b2c3d4e5f60718293a4b5c6d7e8f9a0", "7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d", "", "image")
		return map[string]string{"base": base.InstallPath(), "top": top.InstallPath(), "image": other.InstallPath()}
	},
	// A file a KVM host wrote into an upload dir.
	"uploadfile": func(t *testing.T, e *goldenEnv) map[string]string {
		dir, err := e.a.uploads.Alloc(time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir.Path, "3e9c0b7a5d1f4e2a8c6b4d2f0e1a3c5b.qcow2")
		if err := os.WriteFile(p, bytes.Repeat([]byte{7}, 123456), 0o644); err != nil {
			t.Fatal(err)
		}
		return map[string]string{"path": p}
	},
	// A raw disk on an HTTP server (import downloads it).
	"httpimage": func(t *testing.T, e *goldenEnv) map[string]string {
		srv := newImageServer(t)
		srv.mu.Lock()
		srv.files["/centos7.raw"] = bytes.Repeat([]byte{3}, 1<<20)
		srv.mu.Unlock()
		return map[string]string{"url": srv.URL + "/centos7.raw"}
	},
	// A qcow2 a KVM host wrote into an upload dir (a full backup).
	"backupfile": func(t *testing.T, e *goldenEnv) map[string]string {
		return map[string]string{"path": goldenBackupFile(t, e)}
	},

	// An upload dir (a workspace for NBD targets).
	"uploaddir": func(t *testing.T, e *goldenEnv) map[string]string {
		dir, err := e.a.uploads.Alloc(time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return map[string]string{"dir": dir.Path}
	},
	// Two NBD backup targets being served.
	"nbdtargets": func(t *testing.T, e *goldenEnv) map[string]string {
		dir, err := e.a.uploads.Alloc(time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		r := e.do(t, http.MethodPost, "/imagestore/exportnbdimage-sync/", `{"workspace":"`+dir.Path+`","sizes":[1048576,2097152]}`, nil)
		if r.body["success"] != true {
			t.Fatalf("exportnbdimage: %s", r.raw)
		}
		paths, _ := json.Marshal(r.body["imagePaths"])
		ports, _ := json.Marshal(r.body["ports"])
		return map[string]string{"imagePaths": string(paths), "ports": string(ports), "desc": r.body["nbdDescription"].(string)}
	},
	// A stored qcow2 backup (import-backup of a real qcow2).
	"backup": func(t *testing.T, e *goldenEnv) map[string]string {
		return map[string]string{"installPath": goldenBackup(t, e)}
	},
	// A backup served as an instant-restore target.
	"remotetarget": func(t *testing.T, e *goldenEnv) map[string]string {
		ip := goldenBackup(t, e)
		r := e.do(t, http.MethodPost, "/imagestore/export/remotetarget-sync/", `{"installPath":"`+ip+`","remoteTargetType":"NBD","hostname":"127.0.0.1"}`, nil)
		if r.body["success"] != true {
			t.Fatalf("remotetarget: %s", r.raw)
		}
		return map[string]string{"targetUri": r.body["targetUri"].(string)}
	},
	// A package of one stored backup; the test ends checking it is gone.
	"package": func(t *testing.T, e *goldenEnv) map[string]string {
		ip := goldenBackup(t, e)
		r := e.do(t, http.MethodPost, "/imagestore/pack-exported-images-sync/", `{"installPathList":["`+ip+`"],"packageName":"vm","packageFormat":"tar.gz"}`, nil)
		u, _ := r.body["packageUrl"].(string)
		if r.body["success"] != true || u == "" {
			t.Fatalf("pack-exported-images: %s", r.raw)
		}
		if g := e.do(t, http.MethodGet, u, nil, nil); g.code != http.StatusOK {
			t.Fatalf("GET %s: %d", u, g.code)
		}
		t.Cleanup(func() {
			if g := e.do(t, http.MethodGet, u, nil, nil); g.code != http.StatusNotFound {
				t.Errorf("GET %s after delete-image-package: %d, want 404", u, g.code)
			}
		})
		return map[string]string{"packageUrl": u}
	},
	// A stored backup (0x5a in its first 64 KiB) and an empty 4 MiB NBD
	// target; the test ends checking the target holds the backup.
	"nbdsink": func(t *testing.T, e *goldenEnv) map[string]string {
		r7requireTools(t, "qemu-img", "qemu-io", "qemu-nbd")
		ip := goldenBackup(t, e)
		dir, err := e.a.uploads.Alloc(time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		r := e.do(t, http.MethodPost, "/imagestore/exportnbdimage-sync/", `{"workspace":"`+dir.Path+`","sizes":[4194304]}`, nil)
		if r.body["success"] != true {
			t.Fatalf("exportnbdimage: %s", r.raw)
		}
		path := r.body["imagePaths"].([]any)[0].(string)
		port := int(r.body["ports"].([]any)[0].(float64))
		// Garbage first: the upload must write zeros too.
		r7run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xee 0 4M", fmt.Sprintf("nbd://127.0.0.1:%d", port))
		t.Cleanup(func() {
			out := r7run(t, "qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 64k", "-c", "read -P 0 64k 4032k", path)
			if strings.Contains(out, "fail") {
				t.Errorf("NBD target does not hold the backup: %s", out)
			}
		})
		return map[string]string{"installPath": ip, "targetUrl": fmt.Sprintf("nbd://127.0.0.1:%d", port)}
	},
	// A metadata file holding one image's line.
	"metadata": func(t *testing.T, e *goldenEnv) map[string]string {
		if err := e.a.metadata.Dump(`{"uuid":"1b2c3d4e5f60718293a4b5c6d7e8f9a0","name":"centos7","backupStorageRefs":[]}`, true); err != nil {
			t.Fatal(err)
		}
		return nil
	},
	// Data paths (golden_data_test.go).
	"peerstore":  goldenPeerStore,
	"ftpimage":   goldenFTPImage,
	"httpiso":    goldenHTTPISO,
	"nbdwritten": goldenNBDWritten,
	"uploading":  goldenUploading,
	// A finished import job for image 1b2c…f9a0 (progress reads it).
	"imported": func(t *testing.T, e *goldenEnv) map[string]string {
		srv := newImageServer(t)
		srv.files["/disk.raw"] = bytes.Repeat([]byte{1}, 1<<20)
		cb := newCBSink(t)
		body := `{"imgurl":"` + srv.URL + `/disk.raw","name":"1b2c3d4e5f60718293a4b5c6d7e8f9a0","arch":"amd64","desc":"centos7",` +
			`"imageuuid":"1b2c3d4e5f60718293a4b5c6d7e8f9a0","concurrency":4}`
		r := e.do(t, http.MethodPost, "/imagestore/import/", body, map[string]string{"taskuuid": "imp1", "callbackurl": cb.srv.URL})
		if r.code != 200 {
			t.Fatalf("import: %s", r.raw)
		}
		if res := cb.wait(t, "imp1"); res["success"] != true {
			t.Fatalf("import: %v", res)
		}
		return nil
	},
}

func goldenPut(t *testing.T, store *blobstore.Store, name, id, parent, data string) blobstore.Image {
	t.Helper()
	ctx := context.Background()
	d, n, err := store.Put(ctx, strings.NewReader(data), int64(len(data)), "")
	if err != nil {
		t.Fatal(err)
	}
	img := blobstore.Image{Ref: blobstore.Ref{Name: name, ID: id}, Blob: d, Parent: parent, Created: time.Now(),
		Arch: "amd64", Size: n, VirtualSize: 1 << 30, Format: "gzip"}
	if err := store.PutImage(ctx, img); err != nil {
		t.Fatal(err)
	}
	return img
}

// goldenChecks look at values, beyond types.
var goldenChecks = map[string]func(t *testing.T, reply map[string]json.RawMessage){
	// connect feeds system tags: never empty, never "::".
	"connect": func(t *testing.T, reply map[string]json.RawMessage) {
		var ips []string
		_ = json.Unmarshal(reply["ipAddresses"], &ips)
		if len(ips) == 0 {
			t.Errorf("ipAddresses empty")
		}
		for _, ip := range ips {
			if ip == "" || strings.Contains(ip, "::") || strings.Contains(ip, ":") {
				t.Errorf("ipAddresses holds %q (IPv6 is off by default)", ip)
			}
		}
		if raw, ok := reply["storageInfo"]; ok && string(raw) != "null" {
			var si map[string]string
			_ = json.Unmarshal(raw, &si)
			for _, k := range []string{"type", "url", "options"} {
				if si[k] == "" || strings.Contains(si[k], "::") {
					t.Errorf("storageInfo.%s = %q", k, si[k])
				}
			}
		}
	},
	"ping": func(t *testing.T, reply map[string]json.RawMessage) {
		if string(reply["uuid"]) != `"a6f5d0d6c5e54b6f8f0b8d9f5c1e2a3b"` {
			t.Errorf("ping uuid %s, want the connect uuid", reply["uuid"])
		}
	},
	"chain": func(t *testing.T, reply map[string]json.RawMessage) {
		var chain []struct{ ID, Parent, Created string }
		_ = json.Unmarshal(reply["chain"], &chain)
		if len(chain) != 2 || chain[0].ID != "9d4b7a1c3e5f60718293a4b5c6d7e8f9" || chain[1].Parent != "" {
			t.Errorf("chain %+v, want top first, base last", chain)
		}
		for _, c := range chain {
			if len(c.Created) < 18 || c.Created[10] != 'T' {
				t.Errorf("created %q: the management node parses its first 18 characters", c.Created)
			}
		}
	},
	"import": func(t *testing.T, reply map[string]json.RawMessage) {
		goldenImport(t, reply, "1b2c3d4e5f60718293a4b5c6d7e8f9a0", "raw")
	},
	"import-backup": func(t *testing.T, reply map[string]json.RawMessage) {
		goldenImport(t, reply, "5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60", "qcow2")
	},
	// imgUrl is relative and ends in image-<token>.<ext> (the management
	// node renames that last segment).
	"export": func(t *testing.T, reply map[string]json.RawMessage) {
		var u string
		_ = json.Unmarshal(reply["imgUrl"], &u)
		last := u[strings.LastIndex(u, "/")+1:]
		if !strings.HasPrefix(u, "/") || strings.ContainsAny(u, "?#") || !strings.HasPrefix(last, "image-") || strings.Count(u, last) != 1 {
			t.Errorf("imgUrl %q", u)
		}
	},
	// packageUrl is relative, under /export/package/<token>/, and keeps
	// the package's name (the management node does not rename it).
	"package": func(t *testing.T, reply map[string]json.RawMessage) {
		var u string
		_ = json.Unmarshal(reply["packageUrl"], &u)
		rest, ok := strings.CutPrefix(u, "/export/package/")
		token, file, _ := strings.Cut(rest, "/")
		if !ok || len(token) != 32 || file != "vm-3c2b1a0f.tar" || strings.ContainsAny(u, "?#") {
			t.Errorf("packageUrl %q", u)
		}
		if string(reply["size"]) == "0" || len(string(reply["md5Sum"])) != 34 {
			t.Errorf("size %s md5Sum %s", reply["size"], reply["md5Sum"])
		}
	},
	// Each target is directly inside the workspace, one port each.
	"exportnbdimage": func(t *testing.T, reply map[string]json.RawMessage) {
		var paths []string
		var ports []int
		_ = json.Unmarshal(reply["imagePaths"], &paths)
		_ = json.Unmarshal(reply["ports"], &ports)
		if len(paths) != 2 || len(ports) != 2 {
			t.Fatalf("imagePaths %v ports %v, want one per size", paths, ports)
		}
		if filepath.Dir(paths[0]) != filepath.Dir(paths[1]) || !strings.HasPrefix(filepath.Base(filepath.Dir(paths[0])), "u-") {
			t.Errorf("targets not directly in the workspace: %v", paths)
		}
	},
	"targetUri": func(t *testing.T, reply map[string]json.RawMessage) {
		var u string
		_ = json.Unmarshal(reply["targetUri"], &u)
		hostPort, export, ok := strings.Cut(strings.TrimPrefix(u, "nbd://"), "/")
		if !strings.HasPrefix(u, "nbd://127.0.0.1:") || !ok || !strings.Contains(hostPort, ":") || export == "" || strings.ContainsAny(export, "/?&#%+ ") {
			t.Errorf("targetUri %q", u)
		}
	},
	// Data paths (golden_data_test.go).
	"import-iso": func(t *testing.T, r map[string]json.RawMessage) {
		goldenImport(t, r, "1b2c3d4e5f60718293a4b5c6d7e8f9a0", "iso")
	},
	"import-template": func(t *testing.T, r map[string]json.RawMessage) {
		goldenImport(t, r, "1b2c3d4e5f60718293a4b5c6d7e8f9a0", "qcow2")
	},
	"upload-session": goldenUploadSession,
	// import/cancel by imageuuid stopped the upload job of an upload://
	// import (bytes half received), not nothing.
	"cancelled-one": func(t *testing.T, reply map[string]json.RawMessage) {
		var ids []string
		_ = json.Unmarshal(reply["cancelled"], &ids)
		if len(ids) != 1 || ids[0] == "" {
			t.Errorf("cancelled %s, want the one upload job", reply["cancelled"])
		}
	},
	"uploading": goldenUploadingProgress,
	"capacity": func(t *testing.T, reply map[string]json.RawMessage) {
		var c struct{ TotalSize, FreeSize int64 }
		_ = json.Unmarshal(append(append([]byte("{"), []byte(`"totalSize":`+string(reply["totalSize"])+`,"freeSize":`+string(reply["freeSize"]))...), '}'), &c)
		if c.TotalSize <= 0 || c.FreeSize <= 0 || c.FreeSize > c.TotalSize {
			t.Errorf("capacity total %d free %d: real numbers wanted", c.TotalSize, c.FreeSize)
		}
	},
	"exist": func(t *testing.T, reply map[string]json.RawMessage) {
		if string(reply["exist"]) != "true" {
			t.Errorf("exist %s after generate", reply["exist"])
		}
	},
}

// goldenBackupFile writes a small qcow2 into a fresh upload dir.
func goldenBackupFile(t *testing.T, e *goldenEnv) string {
	t.Helper()
	dir, err := e.a.uploads.Alloc(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir.Path, "3e9c0b7a5d1f4e2a8c6b4d2f0e1a3c5b.qcow2")
	r7run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "4M")
	r7run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", p)
	return p
}

// goldenBackup stores a real qcow2 backup and returns its install path.
func goldenBackup(t *testing.T, e *goldenEnv) string {
	t.Helper()
	p := goldenBackupFile(t, e)
	r := e.do(t, http.MethodPost, "/imagestore/import-backup-sync/", `{"imgurl":"`+p+`","name":"5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60","concurrency":4}`, nil)
	ip, _ := r.body["installPath"].(string)
	if r.body["success"] != true || ip == "" {
		t.Fatalf("import-backup: %s", r.raw)
	}
	return ip
}

// goldenImport checks an import reply's values: the request's name, an
// id, the true format, real sizes.
func goldenImport(t *testing.T, reply map[string]json.RawMessage, name, format string) {
	t.Helper()
	var r struct {
		Name, ID, Format    string
		Size                int64
		VirtualSize         int64 `json:"virtualsize"`
		TotalSize, FreeSize int64
	}
	raw, _ := json.Marshal(reply)
	_ = json.Unmarshal(raw, &r)
	if r.Name != name || r.ID == "" || r.Format != format || r.Size <= 0 || r.VirtualSize <= 0 || r.TotalSize <= 0 {
		t.Errorf("import reply %+v, want name %s, format %s, real sizes", r, name, format)
	}
}

func loadGolden(t *testing.T) map[string]goldenFixture {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(goldenDir, "*.json")) // README.md is for readers
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden fixtures in %s: %v", goldenDir, err)
	}
	out := map[string]goldenFixture{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var fx goldenFixture
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&fx); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if fx.Path == "" || (fx.Mode != "sync" && fx.Mode != "async") {
			t.Fatalf("%s: path and mode (sync or async) are required", f)
		}
		for field, kind := range fx.Reply {
			if _, ok := goldenKinds()[strings.TrimSuffix(kind, "!")]; !ok {
				t.Fatalf("%s: field %s has unknown Java type %q", f, field, kind)
			}
		}
		out[strings.TrimSuffix(filepath.Base(f), ".json")] = fx
	}
	return out
}

// TestGoldenExchanges runs every fixture.
func TestGoldenExchanges(t *testing.T) {
	t.Parallel()
	fixtures := loadGolden(t)
	names := make([]string, 0, len(fixtures))
	for n := range fixtures {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		fx := fixtures[name]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := &goldenEnv{htEnv: newHTEnv(t, func(c *config.Config) {
				c.Debug = true
				// NBD on a random slice of ports (see newRestoreEnv).
				base := 12000 + rand.IntN(20000)
				c.NBD.PortRange = fmt.Sprintf("%d-%d", base, base+200)
				c.NBD.Bind = "127.0.0.1"
				c.ServerName = config.ZStackServerName // peers' certificates name only this
			})}
			e.root = e.a.root
			vars := map[string]string{}
			if fx.Setup != "" {
				setup, ok := goldenSetups[fx.Setup]
				if !ok {
					t.Fatalf("no setup %q in goldenSetups", fx.Setup)
				}
				maps.Copy(vars, setup(t, e))
			}
			vars["root"] = e.root // the store's url in the management node
			body := string(fx.Request)
			for k, v := range vars {
				// "${raw:k}" (quotes included) takes v as JSON (a list, a number).
				body = strings.ReplaceAll(body, `"${raw:`+k+`}"`, v)
				body = strings.ReplaceAll(body, "${"+k+"}", v)
			}
			if strings.Contains(body, "${") {
				t.Fatalf("unfilled placeholder in %s", body)
			}
			if fx.Mode == "sync" {
				r := goldenPost(t, e, fx.Path, body, nil)
				if r.code != http.StatusOK {
					t.Fatalf("sync answer status %d (the management node takes 200): %s", r.code, r.raw)
				}
				goldenCheck(t, fx, []byte(r.raw))
				return
			}
			cb := newCBSink(t)
			task := "0b6f4f5e1c2d4e6f8a9b0c1d2e3f4a5b"
			r := goldenPost(t, e, fx.Path, body, map[string]string{"taskuuid": task, "callbackurl": cb.srv.URL + "/zstack/asyncrest/callback"})
			if r.code != http.StatusOK {
				t.Fatalf("async answer status %d, want exactly 200: %s", r.code, r.raw)
			}
			cb.wait(t, task)
			goldenCheck(t, fx, cb.rawOf(task))
			// The -sync twin answers the same inline.
			if fx.NoTwin {
				if n := cb.count(task); n != 1 {
					t.Fatalf("%d callbacks for one taskuuid", n)
				}
				return
			}
			s := goldenPost(t, e, strings.TrimSuffix(fx.Path, "/")+"-sync/", body, nil)
			if s.code != http.StatusOK {
				t.Fatalf("-sync twin status %d: %s", s.code, s.raw)
			}
			goldenCheck(t, fx, []byte(s.raw))
			// Exactly one callback per taskuuid: a late second one would
			// show by now (the twin ran after it).
			if n := cb.count(task); n != 1 {
				t.Fatalf("%d callbacks for one taskuuid", n)
			}
		})
	}
}

// goldenPost sends body the way the management node does.
func goldenPost(t *testing.T, e *goldenEnv, path, body string, hdr map[string]string) htResp {
	t.Helper()
	h := map[string]string{"Content-Type": "application/json; charset=utf-8"}
	for k, v := range hdr {
		h[k] = v
	}
	var b any
	if body != "" {
		b = body
	}
	return e.do(t, http.MethodPost, path, b, h)
}

// goldenCheck decodes raw strictly against the fixture's Java types.
func goldenCheck(t *testing.T, fx goldenFixture, raw []byte) {
	t.Helper()
	var reply map[string]json.RawMessage
	if err := json.Unmarshal(raw, &reply); err != nil {
		t.Fatalf("reply is not a JSON object: %v: %s", err, raw)
	}
	success := true
	if err := checkJavaType("success", "Boolean", reply["success"], true); err != nil {
		t.Fatal(err)
	} else if string(reply["success"]) == "false" {
		success = false
	}
	if err := checkJavaType("error", "String", reply["error"], false); err != nil {
		t.Fatal(err)
	}
	var msg string
	_ = json.Unmarshal(reply["error"], &msg)
	if success != fx.Success {
		t.Fatalf("success %v, want %v: %s", success, fx.Success, raw)
	}
	if !success {
		if msg == "" || !strings.Contains(msg, fx.Error) {
			t.Fatalf("error %q, want one containing %q", msg, fx.Error)
		}
	}
	for field, kind := range fx.Reply {
		// On failure the management node reads only success and error;
		// primitives may then be absent.
		if err := checkJavaType(field, kind, reply[field], success); err != nil {
			t.Errorf("%v (reply %.400s)", err, raw)
		}
	}
	if success && fx.Check != "" {
		check, ok := goldenChecks[fx.Check]
		if !ok {
			t.Fatalf("no check %q in goldenChecks", fx.Check)
		}
		check(t, reply)
	}
}

// goldenKinds maps a Java type to its check; required: the reply is a
// success and a primitive (or "!") must be present.
func goldenKinds() map[string]func(v any) error {
	return map[string]func(v any) error{
		"long": isInteger(math.MinInt64, math.MaxInt64), "Long": isInteger(math.MinInt64, math.MaxInt64),
		"int": isInteger(math.MinInt32, math.MaxInt32), "Integer": isInteger(math.MinInt32, math.MaxInt32),
		"boolean": isBool, "Boolean": isBool,
		"String":        isString,
		"List<String>":  listOf(isString),
		"List<Long>":    listOf(isInteger(math.MinInt64, math.MaxInt64)),
		"List<Integer>": listOf(isInteger(math.MinInt32, math.MaxInt32)),
		"List<ImageInfo>": listOf(func(v any) error {
			return objectOf(v, map[string]string{
				"id": "String", "name": "String", "parent": "String", "blobsum": "String", "created": "String!",
				"author": "String", "arch": "String", "desc": "String", "size": "Long", "virtualsize": "Long",
			})
		}),
		"StorageInfo": func(v any) error {
			return objectOf(v, map[string]string{"type": "String", "url": "String", "options": "String"})
		},
		"Map<String,Long>": mapOf(isInteger(math.MinInt64, math.MaxInt64)),
	}
}

var javaPrimitives = []string{"long", "int", "boolean"}

// checkJavaType checks one field's JSON against a Java type the way Gson
// would parse it (and stricter: a numeric string for a long is refused).
func checkJavaType(field, kind string, raw json.RawMessage, required bool) error {
	present := raw != nil && string(raw) != "null"
	must := strings.HasSuffix(kind, "!")
	kind = strings.TrimSuffix(kind, "!")
	if !present {
		if required && (must || slices.Contains(javaPrimitives, kind)) {
			return fmt.Errorf("field %s (%s) is absent; the management node would read %s", field, kind, zeroOf(kind))
		}
		return nil
	}
	if string(raw) == "null" && slices.Contains(javaPrimitives, kind) {
		return fmt.Errorf("field %s (%s) is null", field, kind)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return fmt.Errorf("field %s: %v", field, err)
	}
	if err := goldenKinds()[kind](v); err != nil {
		return fmt.Errorf("field %s (%s): %v: %s", field, kind, err, raw)
	}
	return nil
}

func zeroOf(kind string) string {
	if kind == "boolean" {
		return "false"
	}
	if slices.Contains(javaPrimitives, kind) {
		return "0"
	}
	return "null"
}

func isInteger(lo, hi int64) func(v any) error {
	return func(v any) error {
		n, ok := v.(json.Number)
		if !ok {
			return fmt.Errorf("a JSON %s where a number is expected", jsonKind(v))
		}
		i, err := n.Int64()
		if err != nil {
			return fmt.Errorf("%s is not an integer", n)
		}
		if i < lo || i > hi {
			return fmt.Errorf("%d out of range", i)
		}
		return nil
	}
}

func isBool(v any) error {
	if _, ok := v.(bool); !ok {
		return fmt.Errorf("a JSON %s where true/false is expected", jsonKind(v))
	}
	return nil
}

func isString(v any) error {
	if _, ok := v.(string); !ok {
		return fmt.Errorf("a JSON %s where a string is expected", jsonKind(v))
	}
	return nil
}

func listOf(elem func(any) error) func(any) error {
	return func(v any) error {
		a, ok := v.([]any)
		if !ok {
			return fmt.Errorf("a JSON %s where an array is expected", jsonKind(v))
		}
		for i, e := range a {
			if err := elem(e); err != nil {
				return fmt.Errorf("[%d]: %w", i, err)
			}
		}
		return nil
	}
}

func mapOf(val func(any) error) func(any) error {
	return func(v any) error {
		m, ok := v.(map[string]any)
		if !ok {
			return fmt.Errorf("a JSON %s where an object is expected", jsonKind(v))
		}
		for k, e := range m {
			if err := val(e); err != nil {
				return fmt.Errorf("[%q]: %w", k, err)
			}
		}
		return nil
	}
}

func objectOf(v any, fields map[string]string) error {
	m, ok := v.(map[string]any)
	if !ok {
		return fmt.Errorf("a JSON %s where an object is expected", jsonKind(v))
	}
	for f, kind := range fields {
		var raw json.RawMessage
		if e, ok := m[f]; ok {
			raw, _ = json.Marshal(e)
		}
		if err := checkJavaType(f, kind, raw, true); err != nil {
			return err
		}
	}
	return nil
}

func jsonKind(v any) string {
	switch v.(type) {
	case string:
		return "string"
	case json.Number:
		return "number"
	case bool:
		return "boolean"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return "null"
}

// The checker itself: what the management node's parse would reject, it
// rejects.
func TestGoldenChecker(t *testing.T) {
	for _, tc := range []struct {
		kind, raw string
		required  bool
		ok        bool
	}{
		{"long", `12`, true, true},
		{"long", `"12"`, true, false},
		{"long", `1.5`, true, false},
		{"long", `"2025-12-06T21:40:12+08:00"`, true, false},
		{"long", ``, true, false},
		{"long", ``, false, true},
		{"Long", ``, true, true},
		{"int", `2147483648`, true, false},
		{"Integer", `2147483647`, true, true},
		{"boolean", `"true"`, true, false},
		{"Boolean!", ``, true, false},
		{"Boolean", ``, true, true},
		{"String", `3`, true, false},
		{"List<String>", `"a"`, true, false},
		{"List<String>", `["a",1]`, true, false},
		{"List<Long>", `[1,2]`, true, true},
		{"List<Integer>", `[10800,"10801"]`, true, false},
		{"StorageInfo", `{"type":"sshfs","url":"/x","options":1}`, true, false},
		{"List<ImageInfo>", `[{"id":"a","created":"2025-12-06T21:40:12+08:00","size":"1"}]`, true, false},
		{"List<ImageInfo>", `[{"id":"a","size":1}]`, true, false},
		{"List<ImageInfo>", `[{"id":"a","created":"2025-12-06T21:40:12+08:00","size":1}]`, true, true},
		{"Map<String,Long>", `{"a":1,"b":2.5}`, true, false},
	} {
		var raw json.RawMessage
		if tc.raw != "" {
			raw = json.RawMessage(tc.raw)
		}
		err := checkJavaType("f", tc.kind, raw, tc.required)
		if (err == nil) != tc.ok {
			t.Errorf("%s %s (required %v): %v, want ok=%v", tc.kind, tc.raw, tc.required, err, tc.ok)
		}
	}
}

// rawOf is the first callback body of id as it came.
func (c *cbSink) rawOf(id string) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.raw[id]) == 0 {
		return nil
	}
	return c.raw[id][0]
}

// Every path of the route table answers with and without its trailing
// slash (the management node sends several without one), and none is 404.
func TestEveryPathBothForms(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, func(c *config.Config) { c.Debug = true })
	for _, rt := range routeTable() {
		for _, p := range []string{strings.TrimSuffix(rt.Path, "/"), strings.TrimSuffix(rt.Path, "/") + "/"} {
			method := http.MethodPost
			if len(rt.Methods) > 0 {
				method = rt.Methods[0]
			}
			r := e.do(t, method, p, "{}", map[string]string{"taskuuid": "both-" + p})
			if (r.code == http.StatusNotFound && strings.Contains(r.errMsg(), "unknown path")) || r.code == http.StatusMethodNotAllowed {
				t.Errorf("%s %s: %d %s", method, p, r.code, r.raw)
			}
		}
	}
}

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"imagestore/agent/api"
	"imagestore/internal/testcert"
	"imagestore/qcow2/qemutest"
)

// shellRun runs line through bash, as the cloud's agents do (shell.call),
// and returns stdout, stderr and the exit code.
func shellRun(t *testing.T, env []string, line string) (string, string, int) {
	t.Helper()
	cmd := exec.Command("bash", "-c", line)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), errb.String(), 0
	case errors.As(err, &ee):
		return out.String(), errb.String(), ee.ExitCode()
	}
	t.Fatalf("%s: %v", line, err)
	return "", "", -1
}

// zstoreTLS starts a store whose registry presents a self-signed
// certificate for store.zstack.org only (as the cloud generates it) and
// returns the store and the ca.pem the hosts are given (the certificate).
func zstoreTLS(t *testing.T) (*store, string) {
	t.Helper()
	pair := testcert.SelfSigned(t, "store.zstack.org")
	certFile, keyFile := pair.WriteFiles(t)
	s := startStoreWith(t, "", fmt.Sprintf("tls:\n  cert: %s\n  key: %s\n", certFile, keyFile))
	return s, certFile
}

// lastJSONLine decodes the last line of out into v.
func lastJSONLine(t *testing.T, out string, v any) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), v); err != nil {
		t.Fatalf("last line of %q: %v", out, err)
	}
}

// zstep is one argument vector of the cloud's callers (docs/zstcli.md),
// as a shell line with {placeholders}, and what it must leave.
type zstep struct {
	name  string
	line  string
	code  int
	check func(t *testing.T, stdout, stderr string)
}

// TestZstcliArgumentVectors drives the binary, called through a symlink
// named zstcli, with the argument vectors the KVM agent, the management
// node and zstack-ctl use (PROTOCOL.md §4.1–§4.3), through bash, against a
// real agent whose registry is TLS with the cloud's certificate name.
func TestZstcliArgumentVectors(t *testing.T) {
	s, ca := zstoreTLS(t)
	var callbacks atomic.Int64
	cb := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { callbacks.Add(1) }))
	defer cb.Close()

	dir := t.TempDir()
	// A volume on local primary storage: a qcow2 delta on a cached base.
	base := filepath.Join(dir, "cache", "base.qcow2")
	if err := os.MkdirAll(filepath.Dir(base), 0o755); err != nil {
		t.Fatal(err)
	}
	qemutest.Create(t, base, vsize, "")
	qemutest.IO(t, base, "write -P 0x11 0 4M", "write -P 0x22 20M 1M")
	vol := filepath.Join(dir, "vol.qcow2")
	qemutest.Create(t, vol, vsize, "", "-b", "cache/base.qcow2", "-F", "qcow2")
	qemutest.IO(t, vol, "write -P 0x33 1M 1M", "write -z 20M 512k")
	data := filepath.Join(dir, "data.qcow2")
	qemutest.Create(t, data, vsize, "")
	qemutest.IO(t, data, "write -P 0x44 8M 2M")
	prog := filepath.Join(dir, "progress")
	pulled := filepath.Join(dir, "pulled")
	if err := os.Mkdir(pulled, 0o755); err != nil {
		t.Fatal(err)
	}
	const uuid = "4d7f3c0a9b1e4c2d8e6f5a4b3c2d1e0f"

	zst := zstcliBin + " -rootca " + ca // ZSTORE_CLI_PATH
	vars := map[string]string{
		"{zst}": zst, "{url}": s.addr, "{cb}": cb.URL + "/zstack/asyncrest/callback",
		"{vol}": vol, "{data}": data, "{uuid}": uuid, "{progress}": prog, "{pulled}": pulled,
	}
	expand := func(line string) string {
		for k, v := range vars {
			line = strings.ReplaceAll(line, k, v)
		}
		return line
	}
	var added, addedU addResult
	noStdout := func(t *testing.T, stdout, _ string) {
		if stdout != "" {
			t.Fatalf("stdout %q, want nothing", stdout)
		}
	}
	infoOK := func(want *addResult) func(t *testing.T, stdout, _ string) {
		return func(t *testing.T, stdout, _ string) {
			var in api.ImageInfo
			if err := json.Unmarshal([]byte(stdout), &in); err != nil || strings.Count(strings.TrimSpace(stdout), "\n") != 0 {
				t.Fatalf("info stdout %q: %v", stdout, err)
			}
			if in.Name != want.Name || in.ID != want.ID || in.VirtualSize != want.VirtualSize || in.Size != want.Size {
				t.Fatalf("info %+v, add said %+v", in, *want)
			}
		}
	}
	steps := []zstep{
		{"Z1 add (KVM commit, no uuid)", `{zst} -json add -file {vol}`, 0, func(t *testing.T, stdout, _ string) {
			lastJSONLine(t, stdout, &added)
			if added.Name == "" || added.ID == "" || added.VirtualSize != vsize || added.Size <= 0 {
				t.Fatalf("add: %+v", added)
			}
			vars["{ref}"] = added.Name + ":" + added.ID
			vars["{name1}"] = added.Name
			vars["{zref}"] = "zstore://" + added.Name + "/" + added.ID
		}},
		{"Z2 push after add", `{zst} -url {url} push  -concurrency=2 {vol}`, 0, noStdout},
		{"Z4 info of the pushed name:id", `{zst} -url {url} -json info {ref}`, 0, infoOK(&added)},
		{"info of a zstore:// path (image_already_pushed)", `{zst} -url {url} info {zref}`, 0, nil},
		{"Z2 push again is a no-op", `{zst} -url {url} push {vol}`, 0, noStdout},
		{"Z1 add with -imageUuid and -desc", `{zst} -json  -callbackurl {cb} -taskid t-1 -imageUuid {uuid} add -desc 'my image' -file {data}`, 0, func(t *testing.T, stdout, _ string) {
			lastJSONLine(t, stdout, &addedU)
			if addedU.Name != uuid || addedU.VirtualSize != vsize {
				t.Fatalf("add -imageUuid: %+v", addedU)
			}
			vars["{refU}"] = addedU.Name + ":" + addedU.ID
		}},
		{"Z2 push with callback, stage and progress", `{zst} -url {url} -callbackurl {cb} -taskid t-1 -imageUuid {uuid}  -stage 10-90 -progress {progress} push  -concurrency 2 {data}`, 0, func(t *testing.T, stdout, _ string) {
			noStdout(t, stdout, "")
			b, err := os.ReadFile(prog)
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
			prev := -1
			for _, l := range lines {
				v, err := strconv.Atoi(l)
				if err != nil || v < 10 || v > 90 || v <= prev || strings.TrimLeft(l, "0123456789") != "" {
					t.Fatalf("progress file %q: line %q", b, l)
				}
				prev = v
			}
			if lines[0] != "10" || lines[len(lines)-1] != "90" {
				t.Fatalf("progress file %q: want 10 first and 90 last", b)
			}
		}},
		{"Z4 info with desc", `{zst} -url {url} -json info {refU}`, 0, func(t *testing.T, stdout, stderr string) {
			infoOK(&addedU)(t, stdout, stderr)
			if !strings.Contains(stdout, `"desc":"my image"`) {
				t.Fatalf("info lacks the desc: %s", stdout)
			}
		}},
		{"Z3 pull (KVM, cache dir)", `{zst} -url {url} -cachedir {pulled} pull  -concurrency=2 -installpath {pulled}/vol.qcow2 {ref}`, 0, func(t *testing.T, stdout, _ string) {
			noStdout(t, stdout, "")
			qemutest.Compare(t, filepath.Join(pulled, "vol.qcow2"), vol) // the whole local chain
			for _, f := range []string{"vol.imf", "vol.imf2"} {
				var in api.ImageInfo
				b, err := os.ReadFile(filepath.Join(pulled, f))
				if err != nil || json.Unmarshal(b, &in) != nil || in.Name != added.Name || in.ID != added.ID {
					t.Fatalf("%s: %s %v", f, b, err)
				}
			}
		}},
		{"add of a pulled, unchanged file reuses its identity", `{zst} -json add -file {pulled}/vol.qcow2`, 0, func(t *testing.T, stdout, _ string) {
			var again addResult
			lastJSONLine(t, stdout, &again)
			if again != added {
				t.Fatalf("add of the pulled file: %+v, want the pulled image %+v", again, added)
			}
		}},
		{"its push sends nothing", `{zst} -url {url} push {pulled}/vol.qcow2`, 0, noStdout},
		{"and records nothing new", `{zst} -url {url} -json images -name {name1}`, 0, func(t *testing.T, stdout, _ string) {
			var infos []api.ImageInfo
			if err := json.Unmarshal([]byte(stdout), &infos); err != nil || len(infos) != 1 {
				t.Fatalf("images after pushing a pulled file: %q %v", stdout, err)
			}
		}},
		{"a pulled file changed since is a new image", `touch -d '2001-01-01' {pulled}/vol.qcow2 && {zst} -json add -file {pulled}/vol.qcow2`, 0, func(t *testing.T, stdout, _ string) {
			var other addResult
			lastJSONLine(t, stdout, &other)
			if other.Name == added.Name && other.ID == added.ID {
				t.Fatalf("add of a changed pulled file reused %s:%s", other.Name, other.ID)
			}
		}},
		{"Z3 pull without extension (MN, zstack-ctl)", `{zst} -url {url} -json pull -installpath {pulled}/zsdb {refU}`, 0, func(t *testing.T, stdout, _ string) {
			noStdout(t, stdout, "")
			qemutest.Compare(t, filepath.Join(pulled, "zsdb"), data)
			var in api.ImageInfo
			b, err := os.ReadFile(filepath.Join(pulled, "zsdb.imf2"))
			if err != nil || json.Unmarshal(b, &in) != nil || in.Desc != "my image" {
				t.Fatalf("zsdb.imf2: %s %v", b, err)
			}
		}},
		{"Z5 images -name", `{zst} -url {url} -json images -name {uuid}`, 0, func(t *testing.T, stdout, _ string) {
			var infos []api.ImageInfo
			if err := json.Unmarshal([]byte(stdout), &infos); err != nil || len(infos) != 1 || infos[0].ID != addedU.ID {
				t.Fatalf("images: %q %v", stdout, err)
			}
		}},
		{"Z5 images of an empty namespace", `{zst} -url {url} -json images -name zsbak`, 0, func(t *testing.T, stdout, _ string) {
			if stdout != "[]\n" {
				t.Fatalf("images of nothing: %q, want []", stdout)
			}
		}},
		{"second image in the uuid namespace", `{zst} -json -imageUuid {uuid} add -file {vol} && {zst} -url {url} -imageUuid {uuid} push {vol}`, 0, nil},
		{"Z6 list: one entry per namespace", `{zst} -url {url} -json list`, 0, func(t *testing.T, stdout, _ string) {
			var infos []api.ImageInfo
			if err := json.Unmarshal([]byte(stdout), &infos); err != nil || len(infos) != 2 {
				t.Fatalf("list: %q %v", stdout, err)
			}
			names := map[string]bool{infos[0].Name: true, infos[1].Name: true}
			if !names[uuid] || !names[added.Name] || infos[0].Created.IsZero() {
				t.Fatalf("list: %q", stdout)
			}
		}},
		{"Z10 stopbak with nothing running", `{zst} stopbak -domain 0a1b2c3d4e5f40718293a4b5c6d7e8f9`, 0, noStdout},
		{"Z10 stopbak -force=True -batbak", `{zst} stopbak -force=True -domain 0a1b2c3d4e5f40718293a4b5c6d7e8f9 -batbak`, 0, nil},
		{"Z10 stopbak -force=None -drive", `{zst} stopbak -force=None -domain 0a1b2c3d4e5f40718293a4b5c6d7e8f9 -drive drive-virtio-disk0`, 0, nil},
		{"Z10 stopbak -force=False", `{zst} stopbak -force=False -domain vm -batbak`, 0, nil},
		{"missing image: exit 1, stderr, no stdout", `{zst} -url {url} pull -installpath {pulled}/x.qcow2 {uuid}:00000000000000000000000000000000`, 1, noStdout},
		{"unknown flag after the verb: exit 2", `{zst} -url {url} pull -nosuchflag -installpath {pulled}/y.qcow2 {ref}`, 2, noStdout},
		{"unknown verb: exit 2", `{zst} frobnicate`, 2, noStdout},
		{"ceph install path: a clear failure", `{zst} -url {url} pull -installpath ceph://pool/img -shared {ref}`, 1, noStdout},
	}
	for _, st := range steps {
		line := expand(st.line)
		stdout, stderr, code := shellRun(t, nil, line)
		if code != st.code {
			t.Fatalf("%s: %s\nexit %d, want %d\nstdout: %s\nstderr: %s", st.name, line, code, st.code, stdout, stderr)
		}
		if code != 0 && strings.TrimSpace(stderr) == "" {
			t.Fatalf("%s: exit %d with nothing on stderr", st.name, code)
		}
		if st.check != nil {
			st.check(t, stdout, stderr)
		}
	}
	if n := callbacks.Load(); n != 0 {
		t.Fatalf("the callback URL got %d requests; zstcli must never post to it", n)
	}
	if _, err := os.Stat(filepath.Join(pulled, "x.qcow2")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a failed pull left its destination: %v", err)
	}
}

// TestZstcliRootCAVerifiesTheCloudName: -rootca trusts only that file and
// checks the name store.zstack.org, never the dialled IP; a certificate
// for the IP but not that name, or from another CA, is refused.
func TestZstcliRootCAVerifiesTheCloudName(t *testing.T) {
	s, ca := zstoreTLS(t)
	other := testcert.SelfSigned(t, "store.zstack.org")
	otherCA, _ := other.WriteFiles(t)
	cases := []struct {
		name string
		args []string
		code int
	}{
		{"the cloud's certificate, dialled by IP", []string{"-rootca", ca, "-url", s.addr, "-json", "images", "-name", "zsbak"}, 0},
		{"another CA", []string{"-rootca", otherCA, "-url", s.addr, "-json", "images", "-name", "zsbak"}, 1},
		{"no -rootca: plain http to a TLS port", []string{"-url", s.addr, "-json", "images", "-name", "zsbak"}, 1},
		{"missing CA file", []string{"-rootca", ca + ".missing", "-url", s.addr, "images", "-name", "zsbak"}, 1},
	}
	for _, c := range cases {
		out, errs, code := zcli(t, c.args...)
		if code != c.code {
			t.Errorf("%s: exit %d, want %d\nstdout: %s\nstderr: %s", c.name, code, c.code, out, errs)
		}
	}
	// The imagestore face verifies the dialled host by default: the same
	// certificate does not name 127.0.0.1.
	if _, errs, code := cli(t, "-rootca", ca, "-url", s.url, "images", "-name", "zsbak"); code != 1 || !strings.Contains(errs, "certificate") {
		t.Fatalf("imagestore face with a certificate for another name: exit %d, %s", code, errs)
	}
	if _, errs, code := cli(t, "-rootca", ca, "-tls-server-name", "store.zstack.org", "-url", s.url, "images", "-name", "zsbak"); code != 0 {
		t.Fatalf("imagestore -tls-server-name: exit %d, %s", code, errs)
	}
}

func TestPyStem(t *testing.T) {
	cases := map[string]string{
		"/a/zsdb":            "/a/zsdb",
		"/a/vol.qcow2":       "/a/vol",
		"/a/b.c/vol":         "/a/b.c/vol",
		"/a/.hidden":         "/a/.hidden",
		"/a/x.tar.gz":        "/a/x.tar",
		"rel/zsdb-2025.gz":   "rel/zsdb-2025",
		"/a/..":              "/a/..",
		"/a/...x":            "/a/...x",
		"/a/name.":           "/a/name",
		"/var/x/zsdb.sql.gz": "/var/x/zsdb.sql",
	}
	for in, want := range cases {
		if got := pyStem(in); got != want {
			t.Errorf("pyStem(%q) = %q, want %q", in, got, want)
		}
	}
}

// Package packaging_test installs what make deb builds, on this machine.
package packaging_test

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"imagestore/qcow2/qemutest"
)

// run runs a command and fails the test unless it exits 0.
func run(t *testing.T, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// unitValue returns the first value of key in a systemd unit file.
func unitValue(t *testing.T, path, key string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), key+"="); ok {
			return v
		}
	}
	t.Fatalf("%s has no %s=", path, key)
	return ""
}

// TestDebInstall builds the packages from a clean clone of this checkout
// (make deb), installs them with dpkg -i, runs the installed daemon as the
// unit says (its ExecStart, as its User=), and checks -version, ownership
// of the config and the store root, /health, imagestore_build_info and a
// push and pull with the installed client. The packages are purged after.
func TestDebInstall(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("dpkg -i needs root (CI runs as root)")
	}
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	clone := filepath.Join(t.TempDir(), "src")
	run(t, "", "git", "clone", "--quiet", repo, clone)
	head := strings.TrimSpace(run(t, clone, "git", "rev-parse", "HEAD"))
	out := run(t, clone, "make", "deb")
	var debs []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasSuffix(l, ".deb") {
			debs = append(debs, filepath.Join(clone, l))
		}
	}
	if len(debs) != 2 || !strings.Contains(debs[0], "imagestore-agent_") || !strings.Contains(debs[1], "imagestore-client_") {
		t.Fatalf("make deb printed %q", out)
	}
	_, storeErr := os.Stat("/var/lib/imagestore")
	hadStore := storeErr == nil
	t.Cleanup(func() {
		if b, err := exec.Command("dpkg", "--purge", "imagestore-agent", "imagestore-client").CombinedOutput(); err != nil {
			t.Errorf("dpkg --purge: %v\n%s", err, b)
		}
		if !hadStore {
			os.RemoveAll("/var/lib/imagestore")
		}
	})
	run(t, "", "dpkg", "-i", debs[0], debs[1])

	// Versions: stamped with the clone's commit, not dirty.
	for _, bin := range []string{"/usr/bin/imagestore-agent", "/usr/bin/imagestore", "/usr/bin/zstcli"} {
		v := run(t, "", bin, "-version")
		if !strings.Contains(v, head[:12]) || strings.Contains(v, "dirty") {
			t.Fatalf("%s -version = %q, want commit %s, clean", bin, v, head[:12])
		}
	}
	unit := "/lib/systemd/system/imagestore-agent.service"
	svcUser := unitValue(t, unit, "User")
	u, err := user.Lookup(svcUser)
	if err != nil {
		t.Fatalf("the unit's User=%s was not created: %v", svcUser, err)
	}
	gid, _ := strconv.Atoi(u.Gid)
	uid, _ := strconv.Atoi(u.Uid)
	argv := strings.Fields(unitValue(t, unit, "ExecStart"))
	var cfgPath string
	for i, a := range argv {
		if a == "-config" && i+1 < len(argv) {
			cfgPath = argv[i+1]
		}
	}
	checkOwner := func(path string, wantUID, wantGID int, wantMode os.FileMode) {
		t.Helper()
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if int(sys.Uid) != wantUID || int(sys.Gid) != wantGID || st.Mode().Perm() != wantMode {
			t.Fatalf("%s: uid %d gid %d mode %v; want %d %d %v", path, sys.Uid, sys.Gid, st.Mode().Perm(), wantUID, wantGID, wantMode)
		}
	}
	checkOwner(cfgPath, 0, gid, 0o640)
	checkOwner("/var/lib/imagestore", uid, gid, 0o750)
	if b, err := os.ReadFile(unit); err != nil || !strings.Contains(string(b), "SystemCallFilter=set_mempolicy") {
		t.Fatalf("installed unit lacks the qemu system calls: %v", err)
	}

	// The daemon from the installed files, as the service user (setpriv,
	// as systemd's User= would), on free loopback ports.
	cmd := exec.Command("setpriv", append([]string{"--reuid=" + u.Uid, "--regid=" + u.Gid, "--init-groups", "--"}, argv...)...)
	cmd.Env = append(os.Environ(), "IMAGESTORE_LISTEN=127.0.0.1:0", "IMAGESTORE_REGISTRY_LISTEN=127.0.0.1:0", "IMAGESTORE_LOG_FORMAT=json")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	addrs := make(chan [2]string, 4)
	var logs strings.Builder
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logs.WriteString(sc.Text() + "\n")
			var rec struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &rec) == nil && strings.HasSuffix(rec.Msg, "listening") {
				addrs <- [2]string{rec.Msg, rec.Addr}
			}
		}
	}()
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		<-done
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs.String())
		}
	}()
	var agentAddr, regAddr string
	for agentAddr == "" || regAddr == "" {
		select {
		case a := <-addrs:
			if a[0] == "listening" {
				agentAddr = a[1]
			} else {
				regAddr = a[1]
			}
		case <-done:
			t.Fatal("the installed daemon exited")
		case <-time.After(60 * time.Second):
			t.Fatal("the installed daemon did not start")
		}
	}
	get := func(path string) string {
		t.Helper()
		res, err := http.Get("http://" + agentAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		if res.StatusCode != 200 {
			t.Fatalf("GET %s: %d %s", path, res.StatusCode, b)
		}
		return string(b)
	}
	if h := get("/health"); !strings.Contains(h, `"status":"ok"`) {
		t.Fatalf("/health: %s", h)
	}
	if m := get("/metrics"); !strings.Contains(m, `imagestore_build_info{`) || !strings.Contains(m, `revision="`+head+`"`) {
		t.Fatalf("/metrics lacks imagestore_build_info for %s", head)
	}

	// Push and pull with the installed client.
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	qemutest.Create(t, img, 32<<20, "")
	qemutest.IO(t, img, "write -P 0x7e 1M 2M")
	res := run(t, "", "/usr/bin/imagestore", "-url", "http://"+regAddr, "-quiet", "push", "-json", "-name", "debtest", img)
	var pushed struct{ Name, ID string }
	if err := json.Unmarshal([]byte(res), &pushed); err != nil || pushed.ID == "" {
		t.Fatalf("push: %q %v", res, err)
	}
	dst := filepath.Join(dir, "pulled.qcow2")
	run(t, "", "/usr/bin/imagestore", "-url", "http://"+regAddr, "-quiet", "pull", "-installpath", dst, pushed.Name+":"+pushed.ID)
	qemutest.Compare(t, dst, img)
	if _, err := os.Stat(filepath.Join("/var/lib/imagestore", "images", "debtest", pushed.ID+".json")); err != nil {
		t.Fatalf("the image is not in the packaged store root: %v", err)
	}
}

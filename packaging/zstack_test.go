package packaging_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"imagestore/internal/testcert"
)

// freePort is a TCP port free on 127.0.0.1 right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// sh runs a shell line with env added and returns its output and exit code.
func sh(t *testing.T, env []string, line string) (string, int) {
	t.Helper()
	cmd := exec.Command("bash", "-c", line)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("%s did not return: %s", line, out.String())
	}
	return out.String(), cmd.ProcessState.ExitCode()
}

// TestZStackInstaller builds zstack-store.bin, runs it into scratch roots
// (ZSTORE_DESTDIR) as the management node's playbook does — without
// arguments (a KVM host) and with <fs_rootpath> <max_capacity> (backup
// storage) — and drives the installed files as the management node and
// zstack-ctl do: init script stop && start, the quota grep, ps -e | grep
// zstore, the zstack-ctl start line, zstcli against :8000 with the deployed
// certificate, and stop when not running.
func TestZStackInstaller(t *testing.T) {
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	cmd := exec.Command("make", "zstack-store", "OUT="+out)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "OUT="+out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make zstack-store: %v\n%s", err, b)
	}
	bin := filepath.Join(out, "zstack-store.bin")

	// A KVM host: the client only.
	client := t.TempDir()
	if o, code := sh(t, []string{"ZSTORE_DESTDIR=" + client}, "bash "+bin); code != 0 {
		t.Fatalf("client install: exit %d: %s", code, o)
	}
	cbin := filepath.Join(client, "usr/local/zstack/imagestore/bin")
	if _, err := os.Stat(filepath.Join(cbin, "zstcli")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(cbin, "zstore")); err == nil {
		t.Fatal("the client install left a zstore")
	}
	if o, code := sh(t, nil, filepath.Join(cbin, "zstcli")+" stopbak -domain vm1"); code != 0 {
		t.Fatalf("client zstcli stopbak: exit %d: %s", code, o)
	}

	// Backup storage: the playbook deploys the certificate first.
	root := t.TempDir()
	certs := filepath.Join(root, "var/lib/zstack/imagestorebackupstorage/package/certs")
	pair := testcert.SelfSigned(t, "store.zstack.org")
	testcert.Write(t, filepath.Join(certs, "ca.pem"), pair.CertPEM())
	testcert.Write(t, filepath.Join(certs, "privkey.pem"), pair.KeyPEM())
	if err := os.Chmod(filepath.Join(certs, "ca.pem"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(certs, "privkey.pem"), 0o400); err != nil {
		t.Fatal(err)
	}
	const quota = "1099511627776"
	env := []string{"ZSTORE_DESTDIR=" + root}
	if o, code := sh(t, env, "bash "+bin+" /zstack_bs "+quota); code != 0 {
		t.Fatalf("server install: exit %d: %s", code, o)
	}
	b := filepath.Join(root, "usr/local/zstack/imagestore/bin")
	for _, f := range []string{"zstore", "zstcli", "zstore.yaml", "zstack-imagestorebackupstorage"} {
		if _, err := os.Stat(filepath.Join(b, f)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "zstack_bs/registry")); err != nil {
		t.Fatalf("the reconnect check wants <fs_rootpath>/registry: %v", err)
	}
	// The management node's check: exactly one quota line with the value.
	yaml, err := os.ReadFile(filepath.Join(b, "zstore.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(regexp.MustCompile(`quota\s*:\s*`+quota).FindAll(yaml, -1)); n != 1 {
		t.Fatalf("zstore.yaml has %d quota lines for %s:\n%s", n, quota, yaml)
	}
	initScript := filepath.Join(b, "zstack-imagestorebackupstorage")
	script, _ := os.ReadFile(initScript)
	for _, h := range []string{"### BEGIN INIT INFO", "# chkconfig:", "# Provides:          zstack-imagestorebackupstorage"} {
		if !bytes.Contains(script, []byte(h)) {
			t.Fatalf("init script lacks %q", h)
		}
	}

	agentPort, regPort := freePort(t), freePort(t)
	run := append(env, fmt.Sprintf("IMAGESTORE_LISTEN=127.0.0.1:%d", agentPort), fmt.Sprintf("IMAGESTORE_REGISTRY_LISTEN=127.0.0.1:%d", regPort))
	t.Cleanup(func() { sh(t, nil, initScript+" stop") })
	// The playbook: stop && start (stop with nothing running must succeed).
	if o, code := sh(t, run, initScript+" stop && "+initScript+" start"); code != 0 {
		t.Fatalf("init stop && start: exit %d: %s", code, o)
	}
	if o, code := sh(t, nil, "ps -e | grep zstore"); code != 0 || !strings.Contains(o, "zstore") {
		t.Fatalf("ps -e | grep zstore: exit %d: %s", code, o)
	}
	health := func() string {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); ; {
			res, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/health", agentPort))
			if err == nil {
				body, _ := io.ReadAll(res.Body)
				res.Body.Close()
				return string(body)
			}
			if time.Now().After(deadline) {
				log, _ := os.ReadFile(filepath.Join(root, "var/log/zstack/zstack-store/zstore.log"))
				t.Fatalf("the agent port does not answer: %v\nlog:\n%s", err, log)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if h := health(); !strings.Contains(h, `"status":"ok"`) {
		t.Fatalf("/health: %s", h)
	}
	res, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", agentPort))
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if !regexp.MustCompile(`imagestore_store_bytes\{kind="quota"\} 1\.099511627776e\+12`).Match(metrics) {
		t.Fatalf("the quota line is not the store's quota: %s", regexp.MustCompile(`(?m)^imagestore_store_bytes.*$`).FindAll(metrics, -1))
	}
	// zstcli as the management node calls it, over :8000's TLS.
	zst := fmt.Sprintf("%s -rootca %s -url 127.0.0.1:%d -json images -name zsbak", filepath.Join(b, "zstcli"), filepath.Join(certs, "ca.pem"), regPort)
	if o, code := sh(t, nil, zst); code != 0 || o != "[]\n" {
		t.Fatalf("zstcli images over TLS: exit %d: %q", code, o)
	}
	if o, code := sh(t, nil, initScript+" status"); code != 0 {
		t.Fatalf("status while running: exit %d: %s", code, o)
	}

	// A redeploy while the daemon runs: the installer renames the new
	// zstore over the running one (its /proc/<pid>/exe turns "… (deleted)"),
	// then the playbook runs stop && start. The old daemon must go and the
	// new binary serve; then the same with restart.
	zstore := filepath.Join(b, "zstore")
	pidFile := filepath.Join(root, "var/run/zstore.pid")
	for _, verb := range []string{"stop && " + initScript + " start", "restart"} {
		old := daemonPID(t, pidFile, zstore)
		if o, code := sh(t, env, "bash "+bin+" /zstack_bs "+quota); code != 0 {
			t.Fatalf("reinstall while running: exit %d: %s", code, o)
		}
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", old)); exe != zstore+" (deleted)" {
			t.Fatalf("after the reinstall the old daemon's exe is %q, want %q", exe, zstore+" (deleted)")
		}
		if o, code := sh(t, nil, initScript+" status"); code != 0 || !strings.Contains(o, strconv.Itoa(old)) {
			t.Fatalf("status after the reinstall does not find the old daemon %d: exit %d: %s", old, code, o)
		}
		if o, code := sh(t, run, initScript+" "+verb); code != 0 {
			t.Fatalf("%s after the reinstall: exit %d: %s", verb, code, o)
		}
		if _, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", old)); err == nil {
			t.Fatalf("%s left the old daemon %d running", verb, old)
		}
		if pid := daemonPID(t, pidFile, zstore); pid == old {
			t.Fatalf("%s: the pid file still names the old daemon %d", verb, old)
		}
		if h := health(); !strings.Contains(h, `"status":"ok"`) {
			t.Fatalf("/health after %s: %s", verb, h)
		}
		if n := installedDaemons(t, zstore); len(n) != 1 {
			t.Fatalf("after %s, daemons of this install: %v, want one", verb, n)
		}
	}
	// A second daemon (here in the foreground) cannot bind the ports and
	// exits without taking over the pid file.
	first := daemonPID(t, pidFile, zstore)
	if o, code := sh(t, run, zstore+" -conf "+filepath.Join(b, "zstore.yaml")); code == 0 {
		t.Fatalf("a second daemon on the same ports exited 0: %s", o)
	}
	if pid := daemonPID(t, pidFile, zstore); pid != first {
		t.Fatalf("a second daemon that could not bind left pid %d in the pid file, want %d", pid, first)
	}
	if o, code := sh(t, nil, initScript+" stop"); code != 0 {
		t.Fatalf("stop: exit %d: %s", code, o)
	}
	if o, code := sh(t, nil, initScript+" status"); code != 3 {
		t.Fatalf("status after stop: exit %d, want 3: %s", code, o)
	}
	// Once the stopped process is reaped, zstack-ctl's line starts it and returns.
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, code := sh(t, nil, "ps -e | grep -q zstore"); code != 0 {
			break
		}
		if time.Now().After(deadline) {
			o, _ := sh(t, nil, "ps -eo pid,ppid,stat,comm | grep zstore")
			t.Fatalf("a zstore process is still listed after stop:\n%s", o)
		}
		time.Sleep(100 * time.Millisecond)
	}
	ctl := fmt.Sprintf("ps -e | grep zstore || %s -conf %s -logfile %s", filepath.Join(b, "zstore"), filepath.Join(b, "zstore.yaml"), filepath.Join(root, "var/log/zstack/zstack-store/zstore.log"))
	if o, code := sh(t, run, ctl); code != 0 {
		t.Fatalf("zstack-ctl start line: exit %d: %s", code, o)
	}
	if h := health(); !strings.Contains(h, `"status":"ok"`) {
		t.Fatalf("/health after zstack-ctl's start: %s", h)
	}
	if o, code := sh(t, nil, initScript+" stop && "+initScript+" stop"); code != 0 {
		t.Fatalf("stop twice: exit %d: %s", code, o)
	}
}

// daemonPID is the pid in pidFile, checked to be a live process running
// the installed zstore itself (the same file, not a replaced one).
func daemonPID(t *testing.T, pidFile, zstore string) int {
	t.Helper()
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatalf("the daemon wrote no pid file: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("pid file %q: %v", b, err)
	}
	exe := fmt.Sprintf("/proc/%d/exe", pid)
	running, err := os.Stat(exe)
	if err != nil {
		t.Fatalf("the pid file names %d, which does not run: %v", pid, err)
	}
	installed, err := os.Stat(zstore)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(running, installed) {
		link, _ := os.Readlink(exe)
		t.Fatalf("daemon %d runs %q, not the installed %s", pid, link, zstore)
	}
	return pid
}

// installedDaemons lists the live processes running zstore, or a zstore
// since replaced ("… (deleted)").
func installedDaemons(t *testing.T, zstore string) []string {
	t.Helper()
	exes, err := filepath.Glob("/proc/[0-9]*/exe")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range exes {
		if l, err := os.Readlink(e); err == nil && (l == zstore || l == zstore+" (deleted)") {
			out = append(out, e+" -> "+l)
		}
	}
	return out
}

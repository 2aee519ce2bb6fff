package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The unit's sandbox, applied the way systemd applies it, without a
// running systemd: the machines the tests run on have no systemd as PID 1,
// so SystemCallFilter= and RestrictAddressFamilies= are compiled with
// libseccomp (as systemd does) by testdata/seccomp-exec.c, from the sets
// systemd-analyze expands, and the daemon and qemu run under them.

const unitFile = "../../systemd/imagestore-agent.service"

// unitSandbox is the seccomp part of the unit: the allowed system calls
// and address families.
type unitSandbox struct {
	syscalls []string
	families []int
}

// unitDirectives returns every value of key in the unit, in order.
func unitDirectives(t *testing.T, key string) []string {
	t.Helper()
	f, err := os.Open(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), key+"="); ok {
			out = append(out, v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// syscallSets expands system call sets with systemd-analyze (recursively),
// memoized per test.
type syscallSets struct {
	t    *testing.T
	memo map[string][]string
}

func (s *syscallSets) expand(item string) []string {
	if !strings.HasPrefix(item, "@") {
		name, _, _ := strings.Cut(item, ":") // name:errno
		return []string{name}
	}
	if v, ok := s.memo[item]; ok {
		return v
	}
	out, err := exec.Command("systemd-analyze", "syscall-filter", item).Output()
	if err != nil {
		s.t.Fatalf("systemd-analyze syscall-filter %s: %v (install systemd)", item, err)
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") || l == item {
			continue
		}
		names = append(names, s.expand(l)...)
	}
	if len(names) == 0 {
		s.t.Fatalf("systemd-analyze knows no set %s", item)
	}
	s.memo[item] = names
	return names
}

// allowedSyscalls applies SystemCallFilter= lines as systemd does for an
// allow list: the first line allows its sets plus @default; a later line
// starting with ~ removes its sets, any other adds them.
func allowedSyscalls(t *testing.T, lines []string) []string {
	t.Helper()
	if len(lines) == 0 || strings.HasPrefix(lines[0], "~") {
		t.Fatalf("SystemCallFilter=%v: the test handles an allow list (the unit's form)", lines)
	}
	sets := &syscallSets{t: t, memo: map[string][]string{}}
	allow := map[string]bool{}
	for _, n := range sets.expand("@default") {
		allow[n] = true
	}
	for _, l := range lines {
		deny := strings.HasPrefix(l, "~")
		for _, item := range strings.Fields(strings.TrimPrefix(l, "~")) {
			for _, n := range sets.expand(item) {
				if deny {
					delete(allow, n)
				} else {
					allow[n] = true
				}
			}
		}
	}
	out := make([]string, 0, len(allow))
	for n := range allow {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

var addressFamilies = map[string]int{
	"AF_UNIX": syscall.AF_UNIX, "AF_INET": syscall.AF_INET, "AF_INET6": syscall.AF_INET6,
	"AF_NETLINK": syscall.AF_NETLINK, "AF_PACKET": syscall.AF_PACKET,
}

func allowedFamilies(t *testing.T, lines []string) []int {
	t.Helper()
	var out []int
	for _, l := range lines {
		if strings.HasPrefix(l, "~") {
			t.Fatalf("RestrictAddressFamilies=%s: the test handles an allow list (the unit's form)", l)
		}
		for _, name := range strings.Fields(l) {
			n, ok := addressFamilies[name]
			if !ok {
				t.Fatalf("RestrictAddressFamilies: unknown family %s", name)
			}
			out = append(out, n)
		}
	}
	return out
}

// shippedSandbox is the unit's own sandbox, with extra SystemCallFilter=
// lines appended (to show what a change would do).
func shippedSandbox(t *testing.T, extraFilters ...string) unitSandbox {
	t.Helper()
	return unitSandbox{
		syscalls: allowedSyscalls(t, append(unitDirectives(t, "SystemCallFilter"), extraFilters...)),
		families: allowedFamilies(t, unitDirectives(t, "RestrictAddressFamilies")),
	}
}

// seccompExec builds testdata/seccomp-exec.c once per test binary run.
func seccompExec(t *testing.T) string {
	t.Helper()
	out := filepath.Join(os.TempDir(), fmt.Sprintf("imagestore-seccomp-exec-%d", os.Getpid()))
	if _, err := os.Stat(out); err == nil {
		return out
	}
	b, err := exec.Command("cc", "-O2", "-Wall", "-o", out+".tmp", "testdata/seccomp-exec.c", "-lseccomp").CombinedOutput()
	if err != nil {
		t.Fatalf("building seccomp-exec (needs gcc and libseccomp-dev): %v\n%s", err, b)
	}
	if err := os.Rename(out+".tmp", out); err != nil {
		t.Fatal(err)
	}
	return out
}

// prefix returns the argv prefix that runs a program under the sandbox.
func (s unitSandbox) prefix(t *testing.T) []string {
	t.Helper()
	list := filepath.Join(t.TempDir(), "syscalls")
	if err := os.WriteFile(list, []byte(strings.Join(s.syscalls, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fams := make([]string, len(s.families))
	for i, f := range s.families {
		fams[i] = strconv.Itoa(f)
	}
	return []string{seccompExec(t), list, strings.Join(fams, ","), "--"}
}

// run runs argv under the sandbox; a kill by the filter is reported as such.
func (s unitSandbox) run(t *testing.T, argv ...string) error {
	t.Helper()
	p := s.prefix(t)
	cmd := exec.Command(p[0], append(p[1:], argv...)...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGSYS {
			return fmt.Errorf("%v: killed by the system call filter (SIGSYS): %s", argv, out)
		}
		return fmt.Errorf("%v: %w: %s", argv, err, out)
	}
	return err
}

// TestUnitSandboxRunsQemu: qemu-img and qemu-nbd, as the agent runs them,
// work under the unit's SystemCallFilter and RestrictAddressFamilies.
// Debian 12's qemu calls set_mempolicy, which ~@resources denies with the
// default action (kill): the same run with that call denied must be
// killed, which shows the harness catches a filter that kills a child.
func TestUnitSandboxRunsQemu(t *testing.T) {
	dir := t.TempDir()
	img, raw := filepath.Join(dir, "t.qcow2"), filepath.Join(dir, "t.raw")
	sb := shippedSandbox(t)
	steps := [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", img, "64M"},
		{"qemu-img", "info", "--output=json", img},
		{"qemu-img", "check", img},
		{"qemu-img", "convert", "-O", "raw", img, raw},
	}
	for _, argv := range steps {
		if err := sb.run(t, argv...); err != nil {
			t.Fatal(err)
		}
	}
	// qemu-nbd serving under the sandbox, read from outside.
	port := freePort(t)
	p := sb.prefix(t)
	nbd := exec.Command(p[0], append(p[1:], "qemu-nbd", "-r", "-f", "qcow2", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-t", img)...)
	var nbdOut strings.Builder
	nbd.Stdout, nbd.Stderr = &nbdOut, &nbdOut
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- nbd.Wait() }()
	defer func() {
		_ = nbd.Process.Kill()
		<-exited
	}()
	url := fmt.Sprintf("nbd://127.0.0.1:%d", port)
	var info []byte
	var err error
	for deadline := time.Now().Add(waitLong); ; {
		if info, err = exec.Command("qemu-img", "info", "--output=json", url).CombinedOutput(); err == nil {
			break
		}
		select {
		case werr := <-exited:
			t.Fatalf("qemu-nbd under the sandbox exited: %v: %s", werr, nbdOut.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-img info %s: %v: %s", url, err, info)
		}
	}
	if !strings.Contains(string(info), `"virtual-size": 67108864`) {
		t.Fatalf("qemu-img info over NBD: %s", info)
	}

	// Sensitivity: the unit as it was (set_mempolicy denied) kills qemu-img.
	broken := shippedSandbox(t, "~set_mempolicy")
	err = broken.run(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, "b.qcow2"), "64M")
	if err == nil || !strings.Contains(err.Error(), "SIGSYS") {
		t.Fatalf("qemu-img with set_mempolicy denied: %v; want a kill by the filter", err)
	}
}

// freePort returns a TCP port free on 127.0.0.1 right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestUnitSandboxDaemon runs the daemon itself under the unit's sandbox:
// connect lists the host's addresses (net.InterfaceAddrs needs
// AF_NETLINK), exportnbdimage creates targets with qemu-img and serves
// them with qemu-nbd (children inherit the filter), and /health is ok.
func TestUnitSandboxDaemon(t *testing.T) {
	sb := shippedSandbox(t)
	d := startDaemon(t, daemonOpts{wrap: sb.prefix(t)})
	conn := d.sync(t, "/imagestore/connect/", map[string]any{"uuid": "a6f5d0d6c5e54b6f8f0b8d9f5c1e2a3b"})
	// The host's own global IPv4 addresses must be listed (not only the
	// fallback, the address the request came in on).
	var want []string
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, ad := range addrs {
			if ipn, ok := ad.(*net.IPNet); ok && ipn.IP.IsGlobalUnicast() && ipn.IP.To4() != nil {
				want = append(want, ipn.IP.String())
			}
		}
	}
	if len(want) == 0 {
		t.Fatal("this machine has no global IPv4 address to check connect's ipAddresses against")
	}
	ips := fmt.Sprint(conn["ipAddresses"])
	for _, ip := range want {
		if !strings.Contains(ips, ip) {
			t.Fatalf("connect under the sandbox: ipAddresses %s lacks the host's %s", ips, ip)
		}
	}
	if strings.Contains(d.log(), "cannot list the host's addresses") {
		t.Fatalf("the daemon could not list addresses:\n%s", d.log())
	}
	up := d.sync(t, "/imagestore/allocuploaddir/", map[string]any{"expireHour": 1})
	ws, _ := up["uploadDir"].(string)
	exp := d.sync(t, "/imagestore/exportnbdimage-sync/", map[string]any{"workspace": ws, "sizes": []int64{64 << 20}})
	ports, _ := exp["ports"].([]any)
	if len(ports) != 1 {
		t.Fatalf("exportnbdimage: %v", exp)
	}
	url := fmt.Sprintf("nbd://127.0.0.1:%d", int(num(ports[0])))
	out, err := exec.Command("qemu-img", "info", "--output=json", url).CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"virtual-size": 67108864`) {
		t.Fatalf("the target qemu-nbd serves under the sandbox: %v: %s", err, out)
	}
	h := d.get(t, "/health")
	if h.code != 200 || h.body["status"] != "ok" {
		t.Fatalf("/health under the sandbox: %d %s", h.code, h.raw)
	}
	if strings.Contains(d.log(), "bad system call") {
		t.Fatalf("a child was killed by the filter:\n%s", d.log())
	}
}

// TestHealthDegradedWithoutQemu: with qemu-img and qemu-nbd not on PATH the
// daemon runs, and /health says degraded and why.
func TestHealthDegradedWithoutQemu(t *testing.T) {
	empty := t.TempDir()
	d := startDaemon(t, daemonOpts{env: []string{"PATH=" + empty}})
	h := d.get(t, "/health")
	reasons, _ := h.body["reasons"].([]any)
	if h.code != 200 || h.body["status"] != "degraded" || len(reasons) == 0 || !strings.Contains(fmt.Sprint(reasons), "qemu-") {
		t.Fatalf("/health without qemu: %d %s", h.code, h.raw)
	}
}

// get is a GET on the daemon's management port.
func (d *daemon) get(t *testing.T, path string) resp {
	t.Helper()
	res, err := http.Get(d.url + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	r := resp{code: res.StatusCode, raw: raw}
	_ = json.Unmarshal(raw, &r.body)
	return r
}

// TestUnitSecurityExposure: systemd-analyze's offline security review of
// the shipped unit stays at or below 2.0.
func TestUnitSecurityExposure(t *testing.T) {
	out, err := exec.Command("systemd-analyze", "security", "--offline=yes", "--no-pager", unitFile).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	_, rest, ok := strings.Cut(string(out), "Overall exposure level for")
	if !ok {
		t.Fatalf("no overall exposure in:\n%s", out)
	}
	_, rest, _ = strings.Cut(rest, ": ")
	f := strings.Fields(rest)
	if len(f) == 0 {
		t.Fatalf("no exposure number in:\n%s", out)
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil || v > 2.0 {
		t.Fatalf("exposure %q (want ≤ 2.0):\n%s", f[0], out)
	}
	t.Logf("systemd-analyze security: %.1f", v)
}

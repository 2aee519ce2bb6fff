package nbd

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"imagestore/internal/testcert"
)

// testPKI writes a CA and a server certificate for 127.0.0.1 signed by it:
// srvDir holds QEMU's server names, cliDir the client's ca-cert.pem.
func testPKI(t *testing.T) (srvDir, cliDir string) {
	t.Helper()
	ca := testcert.NewCA(t)
	srv := ca.Issue(t, "127.0.0.1")
	srvDir, cliDir = t.TempDir(), t.TempDir()
	testcert.Write(t, filepath.Join(srvDir, "server-cert.pem"), srv.CertPEM())
	testcert.Write(t, filepath.Join(srvDir, "server-key.pem"), srv.KeyPEM())
	testcert.Write(t, filepath.Join(srvDir, "ca-cert.pem"), ca.CertPEM())
	testcert.Write(t, filepath.Join(cliDir, "ca-cert.pem"), ca.CertPEM())
	return srvDir, cliDir
}

// tlsOpts is how a QEMU client reaches a TLS server.
func tlsOpts(cliDir string, s Server) []string {
	return []string{"--object", "tls-creds-x509,id=tls0,endpoint=client,dir=" + cliDir, "--image-opts",
		"driver=nbd,host=127.0.0.1,port=" + strconv.Itoa(s.Port) + ",tls-creds=tls0" + exportOpt(s)}
}

func exportOpt(s Server) string {
	if s.ExportName == "" {
		return ""
	}
	return ",export=" + s.ExportName
}

// TestTLS: with TLSDir every server requires TLS; a QEMU client with the
// CA reads and writes, a plain client is refused.
func TestTLS(t *testing.T) {
	srvDir, cliDir := testPKI(t)
	min, max := freeRange(t, 2)
	needTools(t)
	m, err := NewManager(Options{Dir: t.TempDir(), PortMin: min, PortMax: max, Bind: "127.0.0.1", TLSDir: srvDir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	ctx := context.Background()
	_, top := makeChain(t)
	ro, err := m.ServeOverlay(ctx, top, "top")
	if err != nil {
		t.Fatal(err)
	}
	if !ro.TLS {
		t.Fatalf("server %+v does not say TLS", ro)
	}
	out, err := exec.Command("qemu-img", "info", nbdURI(ro)).CombinedOutput()
	if err == nil {
		t.Fatalf("plain client read a TLS export: %s", out)
	}
	// qemu-img compare takes one --image-opts for both: convert instead.
	dst := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", append(append([]string{"convert"}, tlsOpts(cliDir, ro)...), "-O", "raw", dst)...)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", dst, top)

	_, servers, err := m.CreateTargets(ctx, []int64{MiB}, 0)
	if err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-io", append(tlsOpts(cliDir, servers[0]), "-c", "write -P 0x5a 0 64k", "-c", "flush")...)
	got := run(t, "qemu-io", append(tlsOpts(cliDir, servers[0]), "-c", "read -P 0x5a 0 64k")...)
	if !strings.Contains(got, "read 65536/65536") || strings.Contains(got, "Pattern verification failed") {
		t.Fatalf("read back over TLS: %s", got)
	}
}

// pskOpts is how a QEMU client presents key to a PSK server; the key goes
// in a tls-creds-psk dir of its own.
func pskOpts(t *testing.T, key string, s Server) []string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "keys.psk"), []byte(PSKIdentity+":"+key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--object", "tls-creds-psk,id=tls0,endpoint=client,username=" + PSKIdentity + ",dir=" + dir, "--image-opts",
		"driver=nbd,host=127.0.0.1,port=" + strconv.Itoa(s.Port) + ",tls-creds=tls0" + exportOpt(s)}
}

// TestPSK: with Options.PSK every export takes a key of its own (one per
// target group): the right key reads and writes; no TLS, a wrong key or
// another export's key is refused; keys are files only while their server
// runs, and a restart removes what a crash left.
func TestPSK(t *testing.T) {
	min, max := freeRange(t, 4)
	needTools(t)
	dir := t.TempDir()
	m, err := NewManager(Options{Dir: dir, PortMin: min, PortMax: max, Bind: "127.0.0.1", PSK: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	ctx := context.Background()
	_, top := makeChain(t)
	ro, err := m.ServeOverlay(ctx, top, "top")
	if err != nil {
		t.Fatal(err)
	}
	if !ro.TLS || len(ro.PSK) != 64 {
		t.Fatalf("read-only server %+v: want TLS and a 256-bit hex key", ro)
	}
	desc, servers, err := m.CreateTargets(ctx, []int64{MiB, MiB}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if servers[0].PSK == "" || servers[0].PSK != servers[1].PSK || servers[0].PSK == ro.PSK {
		t.Fatalf("target keys %q %q, export key %q: want one key per group, distinct from the export's", servers[0].PSK, servers[1].PSK, ro.PSK)
	}

	dst := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", append(append([]string{"convert"}, pskOpts(t, ro.PSK, ro)...), "-O", "raw", dst)...)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", dst, top)
	run(t, "qemu-io", append(pskOpts(t, servers[1].PSK, servers[1]), "-c", "write -P 0x5a 0 64k", "-c", "flush")...)
	got := run(t, "qemu-io", append(pskOpts(t, servers[1].PSK, servers[1]), "-c", "read -P 0x5a 0 64k")...)
	if !strings.Contains(got, "read 65536/65536") || strings.Contains(got, "Pattern verification failed") {
		t.Fatalf("read back with the key: %s", got)
	}

	wrong := strings.Repeat("ab", 32)
	for name, args := range map[string][]string{
		"no TLS":            {"info", nbdURI(ro)},
		"wrong key":         append([]string{"info"}, pskOpts(t, wrong, ro)...),
		"a target's key":    append([]string{"info"}, pskOpts(t, servers[0].PSK, ro)...),
		"target, no TLS":    {"info", nbdURI(servers[0])},
		"target, wrong key": append([]string{"info"}, pskOpts(t, wrong, servers[0])...),
	} {
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err == nil {
			t.Errorf("%s: qemu-img info succeeded: %s", name, out)
		}
	}

	keyFiles := func() []string {
		f, _ := filepath.Glob(filepath.Join(dir, pskDirName, "*", "keys.psk"))
		return f
	}
	if n := len(keyFiles()); n != 3 {
		t.Fatalf("%d key files for 3 running servers", n)
	}
	for _, f := range keyFiles() {
		if fi, err := os.Stat(f); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("key file %s: %v %v, want mode 0600", f, fi.Mode(), err)
		}
	}
	if err := m.Cancel(ctx, desc); err != nil {
		t.Fatal(err)
	}
	if n := len(keyFiles()); n != 1 {
		t.Fatalf("%d key files after cancelling the targets, want the export's only", n)
	}

	// A crash leaves keys behind; the next manager removes them.
	stale := filepath.Join(dir, pskDirName, "0123456789abcdef")
	if err := writePSK(stale, wrong); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m2, err := NewManager(Options{Dir: dir, PortMin: min, PortMax: max, Bind: "127.0.0.1", PSK: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m2.Close() })
	if f := keyFiles(); len(f) != 0 {
		t.Fatalf("key files left after a restart: %v", f)
	}
}

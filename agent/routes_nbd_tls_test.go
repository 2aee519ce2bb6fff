package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/agent/config"
	"imagestore/blobstore"
	"imagestore/internal/lockedbuf"
	"imagestore/internal/testcert"
)

// nbdPKI writes the server certificate followed by its CA (cert), its key,
// a self-signed certificate (selfSigned, whose key is selfKey) and the
// client's ca-cert.pem dir.
func nbdPKI(t *testing.T) (cert, key, selfSigned, selfKey, cliDir string) {
	t.Helper()
	dir := t.TempDir()
	ca := testcert.NewCA(t)
	srv := ca.Issue(t, "127.0.0.1")
	self := testcert.SelfSigned(t, "127.0.0.1")
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	selfSigned, selfKey = filepath.Join(dir, "self.pem"), filepath.Join(dir, "self-key.pem")
	cliDir = filepath.Join(dir, "client")
	testcert.Write(t, cert, srv.ChainPEM())
	testcert.Write(t, key, srv.KeyPEM())
	testcert.Write(t, selfSigned, self.CertPEM())
	testcert.Write(t, selfKey, self.KeyPEM())
	testcert.Write(t, filepath.Join(cliDir, "ca-cert.pem"), ca.CertPEM())
	return cert, key, selfSigned, selfKey, cliDir
}

// TestNBDTLS: an agent with TLS serves NBD only over TLS (tls:true in the
// reply); a QEMU client with the CA reads the export, a plain one cannot.
func TestNBDTLS(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io", "qemu-nbd")
	cert, key, self, selfKey, cliDir := nbdPKI(t)
	e := newRestoreEnv(t, func(c *config.Config) { c.TLS.Cert, c.TLS.Key = cert, key })
	files := r7makeChain(t, e.dir, 4<<20)
	top := e.importChain(t, "vol", files...)[2]
	rep := e.ok(t, "/imagestore/export/remotetarget-sync", map[string]any{"installPath": top.InstallPath(), "hostname": "127.0.0.1"})
	if rep["tls"] != true {
		t.Fatalf("reply does not say tls: %v", rep)
	}
	uri := rep["targetUri"].(string)
	if out, err := exec.Command("qemu-img", "info", uri).CombinedOutput(); err == nil {
		t.Fatalf("plain NBD client read a TLS-only export: %s", out)
	}
	dst := filepath.Join(e.dir, "out.raw")
	r7run(t, "qemu-img", "convert", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+cliDir,
		"--image-opts", "driver=nbd,host=127.0.0.1,port="+r7itoa(int(r7num(rep["port"])))+",export="+rep["exportName"].(string)+",tls-creds=tls0",
		"-O", "raw", dst)
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", dst, files[2])

	tg := e.ok(t, "/imagestore/exportnbdimage-sync", map[string]any{"workspace": e.uploadDir(t), "sizes": []any{1 << 20}})
	if tg["tls"] != true {
		t.Fatalf("exportnbdimage reply does not say tls: %v", tg)
	}

	// A certificate QEMU cannot serve with (self-signed, no CA) disables
	// NBD with the reason, rather than serving it in the clear.
	e2 := newRestoreEnv(t, func(c *config.Config) { c.TLS.Cert, c.TLS.Key = self, selfKey })
	e2.fails(t, "/imagestore/export/remotetarget-sync", map[string]any{"installPath": "zstore://vol/x", "hostname": "127.0.0.1"}, "issuing CA")
}

// TestNBDTokenWarning: with a token and nbd.clientAuth none, the agent
// warns at startup that anyone reaching the NBD ports can use the disks;
// with a token and the default (psk then), it does not.
func TestNBDTokenWarning(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-nbd")
	for _, tc := range []struct {
		token, auth string
		warn        bool
	}{{"", "auto", false}, {"s3cret", "auto", false}, {"s3cret", "none", true}, {"", "none", false}} {
		token := tc.token
		root := t.TempDir()
		store, err := blobstore.Open(context.Background(), blobstore.Options{Root: root})
		if err != nil {
			t.Fatal(err)
		}
		cfg := testConfig(t)
		cfg.Root = root
		cfg.Token = config.Secret(token)
		cfg.NBD.Bind = "127.0.0.1"
		cfg.NBD.ClientAuth = tc.auth
		var logs lockedbuf.Buffer
		a, err := New(cfg, store, slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil {
			t.Fatal(err)
		}
		_ = a.Close()
		_ = store.Close()
		mode := "clientAuth=none"
		if tc.token != "" && tc.auth == "auto" {
			mode = "clientAuth=psk"
		}
		if !strings.Contains(logs.String(), mode) {
			t.Fatalf("token %q, clientAuth %s: startup log does not say %s: %s", token, tc.auth, mode, logs.String())
		}
		warned := strings.Contains(logs.String(), "nbd.clientAuth is none")
		if warned != tc.warn {
			t.Fatalf("token %q, clientAuth %s: warned=%v: %s", token, tc.auth, warned, logs.String())
		}
		if strings.Contains(logs.String(), "s3cret") {
			t.Fatal("token logged")
		}
	}
}

// TestNBDPSK: with nbd.clientAuth psk (even beside agent TLS) every export
// reply carries its key; a QEMU client presenting it reads the export and
// writes the backup target, a client without it is refused.
func TestNBDPSK(t *testing.T) {
	t.Parallel()
	r7requireTools(t, "qemu-img", "qemu-io", "qemu-nbd")
	cert, key, _, _, _ := nbdPKI(t)
	e := newRestoreEnv(t, func(c *config.Config) { c.TLS.Cert, c.TLS.Key, c.NBD.ClientAuth = cert, key, "psk" })
	files := r7makeChain(t, e.dir, 4<<20)
	top := e.importChain(t, "vol", files...)[2]
	clientOpts := func(rep map[string]any, port any, export string) []string {
		t.Helper()
		if rep["tls"] != true || rep["pskIdentity"] != "imagestore" || len(fmt.Sprint(rep["psk"])) != 64 {
			t.Fatalf("reply lacks the key: %v", rep)
		}
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "keys.psk"), []byte(fmt.Sprintf("%s:%s\n", rep["pskIdentity"], rep["psk"])), 0o600); err != nil {
			t.Fatal(err)
		}
		opts := "driver=nbd,host=127.0.0.1,port=" + r7itoa(int(r7num(port))) + ",tls-creds=tls0"
		if export != "" {
			opts += ",export=" + export
		}
		return []string{"--object", "tls-creds-psk,id=tls0,endpoint=client,username=imagestore,dir=" + dir, "--image-opts", opts}
	}

	rep := e.ok(t, "/imagestore/export/remotetarget-sync", map[string]any{"installPath": top.InstallPath(), "hostname": "127.0.0.1"})
	if out, err := exec.Command("qemu-img", "info", rep["targetUri"].(string)).CombinedOutput(); err == nil {
		t.Fatalf("a client without the key read the export: %s", out)
	}
	dst := filepath.Join(e.dir, "out.raw")
	r7run(t, "qemu-img", append(append([]string{"convert"}, clientOpts(rep, rep["port"], rep["exportName"].(string))...), "-O", "raw", dst)...)
	r7run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", dst, files[2])
	again := e.ok(t, "/imagestore/export/remotetarget-sync", map[string]any{"installPath": top.InstallPath(), "hostname": "127.0.0.1"})
	// Another export of the same image has its own overlay, port and key:
	// the first one's key does not open it.
	if again["psk"] == rep["psk"] || again["port"] == rep["port"] {
		t.Fatalf("exporting a served image again: %v, first %v", again, rep)
	}
	if out, err := exec.Command("qemu-img", append([]string{"info"}, clientOpts(rep, again["port"], again["exportName"].(string))...)...).CombinedOutput(); err == nil {
		t.Fatalf("one export's key opened another: %s", out)
	}

	tg := e.ok(t, "/imagestore/exportnbdimage-sync", map[string]any{"workspace": e.uploadDir(t), "sizes": []any{1 << 20, 1 << 20}})
	ports := tg["ports"].([]any)
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write 0 4k", fmt.Sprintf("nbd://127.0.0.1:%d", int(r7num(ports[0])))).CombinedOutput(); err == nil {
		t.Fatalf("a client without the key wrote a backup target: %s", out)
	}
	for _, p := range ports {
		r7run(t, "qemu-io", append(clientOpts(tg, p, ""), "-c", "write -P 0x6b 0 64k", "-c", "flush")...)
	}
}

package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/agent/config"
	"imagestore/internal/testcert"
	"imagestore/internal/tlsconf"
)

// testPKI is a throwaway CA and a server certificate for 127.0.0.1.
type testPKI struct {
	pool              *x509.CertPool
	certFile, keyFile string
}

func newTestPKI(t *testing.T) testPKI {
	t.Helper()
	ca := testcert.NewCA(t)
	certFile, keyFile := ca.Issue(t, "127.0.0.1", "localhost").WriteFiles(t)
	return testPKI{pool: ca.Pool(), certFile: certFile, keyFile: keyFile}
}

func tlsClient(cfg *tls.Config) *http.Client {
	return &http.Client{Timeout: waitLong, Transport: &http.Transport{TLSClientConfig: cfg}}
}

func TestE2ETLS(t *testing.T) {
	pki := newTestPKI(t)
	const tok = "tls-token-value"
	d := startDaemon(t, daemonOpts{token: tok, extra: fmt.Sprintf("tls:\n  cert: %s\n  key: %s\n", pki.certFile, pki.keyFile)})
	httpsURL := "https://" + strings.TrimPrefix(d.url, "http://")

	trusted := tlsClient(&tls.Config{RootCAs: pki.pool})
	for _, tc := range []struct {
		method, path, auth string
		want               int
	}{
		{http.MethodGet, "/health", "", 200},
		{http.MethodGet, "/imagestore/echo/", "Bearer " + tok, 200},
		{http.MethodPost, "/imagestore/ping-sync/", "Bearer " + tok, 200},
		{http.MethodGet, "/imagestore/echo/", "", 401},
	} {
		req, _ := http.NewRequest(tc.method, httpsURL+tc.path, strings.NewReader("{}"))
		if tc.auth != "" {
			req.Header.Set("Authorization", tc.auth)
		}
		res, err := trusted.Do(req)
		if err != nil {
			t.Fatalf("https %s: %v", tc.path, err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != tc.want || res.TLS == nil {
			t.Fatalf("https %s: %d tls=%v %s", tc.path, res.StatusCode, res.TLS != nil, body)
		}
	}

	for _, tc := range []struct {
		name   string
		client *http.Client
		url    string
		errSub string // "" = must not answer 200 either
	}{
		{"system roots only", tlsClient(&tls.Config{}), httpsURL, "certificate"},
		{"wrong server name", tlsClient(&tls.Config{RootCAs: pki.pool, ServerName: "other.example"}), httpsURL, "certificate"},
		{"plain http", &http.Client{Timeout: waitLong}, d.url, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := tc.client.Get(tc.url + "/health")
			if err == nil {
				body, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if tc.errSub != "" || res.StatusCode == 200 || strings.Contains(string(body), "success") {
					t.Fatalf("answered %d %s", res.StatusCode, body)
				}
				return
			}
			if !strings.Contains(err.Error(), tc.errSub) {
				t.Fatalf("err %v, want one mentioning %q", err, tc.errSub)
			}
		})
	}
	if strings.Contains(d.log(), tok) {
		t.Fatal("token in the log")
	}
}

// TestE2ETLSBadConfig: TLS misconfiguration stops the daemon at start with a clear message.
func TestE2ETLSBadConfig(t *testing.T) {
	pki := newTestPKI(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		name, tls string
		code      int
		want      string
	}{
		{"cert without key", fmt.Sprintf("tls:\n  cert: %s\n", pki.certFile), 2, "tls: cert and key must be set together"},
		{"missing key file", fmt.Sprintf("tls:\n  cert: %s\n  key: %s\n", pki.certFile, filepath.Join(dir, "nope.pem")), 2, "tls.key: open " + filepath.Join(dir, "nope.pem")},
		{"missing registry cert", fmt.Sprintf("registryTLS:\n  cert: %s\n  key: %s\n", filepath.Join(dir, "gone.pem"), pki.keyFile), 2, "registryTLS.cert: open " + filepath.Join(dir, "gone.pem")},
		{"plain and cert", fmt.Sprintf("agentTLS:\n  plain: true\n  cert: %s\n  key: %s\n", pki.certFile, pki.keyFile), 2, "agentTLS: plain and cert are exclusive"},
		{"unknown profile", "profile: zstore\n", 2, `profile: "zstore", want zstack or imagestore`},
		{"key is not a key", fmt.Sprintf("tls:\n  cert: %s\n  key: %s\n", pki.certFile, pki.certFile), 1, "agent port: tls:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
			profile := "profile: imagestore\n"
			if strings.HasPrefix(tc.tls, "profile:") {
				profile = ""
			}
			cfg := fmt.Sprintf("%sroot: %s\nlisten: 127.0.0.1:0\nregistryListen: 127.0.0.1:0\n%s", profile, filepath.Join(t.TempDir(), "store"), tc.tls)
			if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(agentBin, "-config", cfgPath)
			out, err := cmd.CombinedOutput()
			if err == nil || cmd.ProcessState.ExitCode() != tc.code || !strings.Contains(string(out), tc.want) {
				t.Fatalf("exit %d (%v), want %d with %q:\n%s", cmd.ProcessState.ExitCode(), err, tc.code, tc.want, out)
			}
		})
	}
}

// TestE2EZStackProfile: the shipped default profile serves the agent port as
// plain HTTP and the registry port as HTTPS with ZStack's kind of
// certificate (self-signed, only the name store.zstack.org), without a
// token, at the same time; a client verifies that name while dialling the IP.
func TestE2EZStackProfile(t *testing.T) {
	zs := testcert.SelfSigned(t, tlsconf.DefaultServerName)
	certFile, keyFile := zs.WriteFiles(t)
	d := startDaemon(t, daemonOpts{profile: "zstack", extra: fmt.Sprintf("registryTLS:\n  cert: %s\n  key: %s\n", certFile, keyFile)})
	if !strings.Contains(d.log(), `"profile":"zstack"`) {
		t.Fatalf("profile not logged:\n%s", d.log())
	}

	// :8001 plain, no token.
	res, err := http.Post(d.url+"/imagestore/ping-sync/", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || !strings.Contains(string(b), `"success":true`) {
		t.Fatalf("plain ping: %d %s", res.StatusCode, b)
	}

	// :8000 HTTPS: verified as store.zstack.org while dialling 127.0.0.1.
	reg := "https://" + regAddr(t, d)
	good, err := tlsconf.Client(zs.CertPEM(), tlsconf.DefaultServerName)
	if err != nil {
		t.Fatal(err)
	}
	res, err = tlsClient(good).Get(reg + "/v2/")
	if err != nil {
		t.Fatalf("https registry: %v", err)
	}
	res.Body.Close()
	if res.StatusCode != 200 || res.TLS == nil {
		t.Fatalf("https registry: %d", res.StatusCode)
	}
	// The dialled IP is not a name of the certificate: a client verifying
	// it (Go's default) must fail, which is why clients configure the name.
	byIP, _ := tlsconf.Client(zs.CertPEM(), "")
	if _, err := tlsClient(byIP).Get(reg + "/v2/"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("verifying the dialled IP: %v, want a certificate error", err)
	}
	// Plain HTTP on the registry port is not served.
	if res, err := http.Get("http://" + regAddr(t, d) + "/v2/"); err == nil {
		res.Body.Close()
		if res.StatusCode == 200 {
			t.Fatal("registry answered plain HTTP")
		}
	}
}

// TestE2EZStackProfileWithoutCertificate: the shipped default profile on a
// machine without ZStack's certificate stops at once, naming the key and
// the way out.
func TestE2EZStackProfileWithoutCertificate(t *testing.T) {
	if _, err := os.Stat(config.ZStackCertFile); err == nil {
		t.Fatalf("%s exists on this machine: this test needs a machine without ZStack's certificate", config.ZStackCertFile)
	}
	cmd := exec.Command(agentBin, "-root", t.TempDir(), "-listen", "127.0.0.1:0", "-registry-listen", "127.0.0.1:0")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	if err == nil || cmd.ProcessState.ExitCode() != 2 {
		t.Fatalf("exit %d (%v), want 2:\n%s", cmd.ProcessState.ExitCode(), err, out)
	}
	for _, want := range []string{"registryTLS.cert: open " + config.ZStackCertFile, "-profile imagestore"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("message lacks %q:\n%s", want, out)
		}
	}
}

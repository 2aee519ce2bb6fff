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

	"imagestore/internal/testcert"
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
		{"missing key file", fmt.Sprintf("tls:\n  cert: %s\n  key: %s\n", pki.certFile, filepath.Join(dir, "nope.pem")), 1, "tls:"},
		{"key is not a key", fmt.Sprintf("tls:\n  cert: %s\n  key: %s\n", pki.certFile, pki.certFile), 1, "tls:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
			cfg := fmt.Sprintf("root: %s\nlisten: 127.0.0.1:0\nregistryListen: 127.0.0.1:0\n%s", filepath.Join(t.TempDir(), "store"), tc.tls)
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

package tlsconf_test

import (
	"crypto/tls"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"imagestore/internal/testcert"
	"imagestore/internal/tlsconf"
)

// serve starts an HTTPS server on 127.0.0.1 presenting pair.
func serve(t *testing.T, pair *testcert.Pair) string {
	t.Helper()
	cert, err := tls.X509KeyPair(pair.ChainPEM(), pair.KeyPEM())
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("ok"))
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.URL // https://127.0.0.1:<port>
}

func get(t *testing.T, url string, cfg *tls.Config) error {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, Proxy: nil}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	return nil
}

func TestClient(t *testing.T) {
	zstack := testcert.SelfSigned(t, tlsconf.DefaultServerName) // ZStack's shape: self-signed, one DNS name
	ca := testcert.NewCA(t)
	byIP := ca.Issue(t, "127.0.0.1")
	other := testcert.SelfSigned(t, tlsconf.DefaultServerName)

	tests := []struct {
		name       string
		server     *testcert.Pair
		caPEM      []byte
		serverName string
		ok         bool
	}{
		{"self-signed store.zstack.org dialled by IP", zstack, zstack.CertPEM(), tlsconf.DefaultServerName, true},
		{"name not in the certificate", zstack, zstack.CertPEM(), "other.example", false},
		{"empty name verifies the dialled IP, which the certificate lacks", zstack, zstack.CertPEM(), "", false},
		{"another certificate with the same name is not trusted", zstack, other.CertPEM(), tlsconf.DefaultServerName, false},
		{"CA-issued IP certificate, empty name", byIP, ca.CertPEM(), "", true},
		{"CA-issued IP certificate, configured name absent", byIP, ca.CertPEM(), tlsconf.DefaultServerName, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			url := serve(t, tc.server)
			cfg, err := tlsconf.Client(tc.caPEM, tc.serverName)
			if err != nil {
				t.Fatal(err)
			}
			err = get(t, url, cfg)
			if tc.ok && err != nil {
				t.Fatalf("want success, got %v", err)
			}
			if !tc.ok && err == nil {
				t.Fatal("want a verification failure, got success")
			}
		})
	}
}

func TestClientFile(t *testing.T) {
	zstack := testcert.SelfSigned(t, tlsconf.DefaultServerName)
	certFile, _ := zstack.WriteFiles(t)
	cfg, err := tlsconf.ClientFile(certFile, tlsconf.DefaultServerName)
	if err != nil {
		t.Fatal(err)
	}
	if err := get(t, serve(t, zstack), cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.ServerName != tlsconf.DefaultServerName || cfg.MinVersion != tls.VersionTLS12 {
		t.Fatalf("config %+v", cfg)
	}

	_, err = tlsconf.ClientFile(filepath.Join(t.TempDir(), "absent.pem"), "")
	if err == nil {
		t.Fatal("missing file accepted")
	}
	junk := filepath.Join(t.TempDir(), "junk.pem")
	testcert.Write(t, junk, []byte("not a certificate"))
	if _, err := tlsconf.ClientFile(junk, ""); !errors.Is(err, tlsconf.ErrNoCertificate) {
		t.Fatalf("junk PEM: %v", err)
	}
}

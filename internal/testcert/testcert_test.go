package testcert

import (
	"crypto/tls"
	"crypto/x509"
	"testing"
)

func TestIssuedVerifiesSelfSignedDoesNot(t *testing.T) {
	ca := NewCA(t)
	srv := ca.Issue(t, "127.0.0.1", "localhost")
	for _, name := range []string{"127.0.0.1", "localhost"} {
		if _, err := srv.Cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: name}); err != nil {
			t.Errorf("issued certificate for %s: %v", name, err)
		}
	}
	self := SelfSigned(t, "127.0.0.1")
	if _, err := self.Cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "127.0.0.1"}); err == nil {
		t.Error("a self-signed certificate verifies against the CA")
	}
	if _, err := srv.Cert.Verify(x509.VerifyOptions{Roots: NewCA(t).Pool(), DNSName: "127.0.0.1"}); err == nil {
		t.Error("a certificate verifies against another CA")
	}
	for _, p := range []*Pair{srv, self} {
		if _, err := tls.X509KeyPair(p.ChainPEM(), p.KeyPEM()); err != nil {
			t.Error(err)
		}
		cert, key := p.WriteFiles(t)
		if _, err := tls.LoadX509KeyPair(cert, key); err != nil {
			t.Error(err)
		}
	}
	if len(srv.ChainPEM()) <= len(srv.CertPEM()) || len(self.ChainPEM()) != len(self.CertPEM()) {
		t.Error("ChainPEM: issued certificates carry the CA, self-signed ones nothing more")
	}
}

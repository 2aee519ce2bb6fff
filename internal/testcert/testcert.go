// Package testcert makes throwaway X.509 certificates for tests: a CA, the
// server certificates it issues, self-signed ones. Keys are ECDSA P-256;
// certificates are valid from an hour ago for a day.
package testcert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Pair is a certificate and its private key.
type Pair struct {
	Cert   *x509.Certificate
	Key    *ecdsa.PrivateKey
	issuer *x509.Certificate // nil when self-signed
}

// CA is a certificate authority that issues server certificates.
type CA struct {
	Pair
}

// NewCA makes a fresh CA.
func NewCA(t testing.TB) *CA {
	t.Helper()
	tmpl := template(t, "imagestore test CA")
	tmpl.IsCA = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	return &CA{Pair: sign(t, tmpl, nil, nil)}
}

// Issue makes a server certificate for hosts (IP addresses or DNS names;
// the first is also the common name) signed by ca.
func (ca *CA) Issue(t testing.TB, hosts ...string) *Pair {
	t.Helper()
	p := sign(t, serverTemplate(t, hosts), ca.Cert, ca.Key)
	return &p
}

// Pool is a certificate pool trusting only ca.
func (ca *CA) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return pool
}

// SelfSigned makes a server certificate for hosts that no CA issued.
func SelfSigned(t testing.TB, hosts ...string) *Pair {
	t.Helper()
	p := sign(t, serverTemplate(t, hosts), nil, nil)
	return &p
}

// CertPEM is the certificate, PEM-encoded.
func (p *Pair) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.Cert.Raw})
}

// ChainPEM is the certificate followed by its issuer's (just the
// certificate when self-signed): what a server presents.
func (p *Pair) ChainPEM() []byte {
	b := p.CertPEM()
	if p.issuer != nil {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.issuer.Raw})...)
	}
	return b
}

// KeyPEM is the private key, PKCS#8, PEM-encoded.
func (p *Pair) KeyPEM() []byte {
	der, err := x509.MarshalPKCS8PrivateKey(p.Key)
	if err != nil {
		panic(err) // a P-256 key always marshals
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// WriteFiles writes CertPEM and KeyPEM to cert.pem and key.pem (mode
// 0600) in a fresh temp dir and returns their paths.
func (p *Pair) WriteFiles(t testing.TB) (certFile, keyFile string) {
	t.Helper()
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	Write(t, certFile, p.CertPEM())
	Write(t, keyFile, p.KeyPEM())
	return certFile, keyFile
}

// Write writes b to path with mode 0600, creating its directory (0700).
func Write(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func template(t testing.TB, cn string) *x509.Certificate {
	t.Helper()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		BasicConstraintsValid: true,
	}
}

func serverTemplate(t testing.TB, hosts []string) *x509.Certificate {
	t.Helper()
	if len(hosts) == 0 {
		hosts = []string{"127.0.0.1"}
	}
	tmpl := template(t, hosts[0])
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	return tmpl
}

// sign makes a key for tmpl and signs it with issuer's key (self-signed
// when issuer is nil).
func sign(t testing.TB, tmpl, issuer *x509.Certificate, issuerKey *ecdsa.PrivateKey) Pair {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	parent, parentKey := issuer, issuerKey
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return Pair{Cert: cert, Key: key, issuer: issuer}
}

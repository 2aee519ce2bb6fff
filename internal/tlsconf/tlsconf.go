// Package tlsconf builds the client TLS configurations our peers need: trust
// exactly the certificates of a CA PEM and verify a configured server name,
// never the host name or IP address that was dialled.
//
// ZStack issues one self-signed certificate whose only name is
// store.zstack.org (DefaultServerName) and copies it to every store and
// host; clients dial a store by IP and verify that name.
package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// DefaultServerName is the name in ZStack's store certificate, which every
// client of the ZStack-compatible profile verifies.
const DefaultServerName = "store.zstack.org"

// ErrNoCertificate: the CA PEM holds no certificate.
var ErrNoCertificate = errors.New("tlsconf: CA PEM holds no certificate")

// Client returns a client configuration that trusts only the certificates in
// caPEM and verifies the peer's certificate for serverName (also sent as
// SNI), whatever address is dialled. serverName "" verifies the dialled host
// instead (Go's default), for certificates issued to the host itself.
func Client(caPEM []byte, serverName string) (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, ErrNoCertificate
	}
	return &tls.Config{RootCAs: pool, ServerName: serverName, MinVersion: tls.VersionTLS12}, nil
}

// ClientFile is Client over the PEM file at caFile.
func ClientFile(caFile, serverName string) (*tls.Config, error) {
	b, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("tlsconf: read CA: %w", err)
	}
	c, err := Client(b, serverName)
	if err != nil {
		return nil, fmt.Errorf("%w: %s", err, caFile)
	}
	return c, nil
}

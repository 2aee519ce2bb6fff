package rgwtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"
)

// tlsName is the Ceph name of the second radosgw, the one serving HTTPS.
const tlsName = "client.rgw.tls"

// StartTLS starts a second radosgw on the cluster serving S3 over HTTPS
// only (beast's ssl_endpoint on a free loopback port) with the given
// certificate chain and key (PEM; the certificate must name 127.0.0.1),
// and returns its endpoint, "https://127.0.0.1:port". It serves the same
// users and buckets as Endpoint. A second call returns the running
// gateway's endpoint (whatever certificate it is given). The gateway stops
// with the cluster.
func (c *Cluster) StartTLS(ctx context.Context, certPEM, keyPEM []byte) (string, error) {
	c.mu.Lock()
	ep := c.tlsEndpoint
	c.mu.Unlock()
	if ep != "" {
		return ep, nil
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(certPEM) {
		return "", errors.New("rgwtest: StartTLS: no certificate in certPEM")
	}
	dir := c.path("rgw-tls")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	certFile, keyFile := c.path("rgw-tls", "cert.pem"), c.path("rgw-tls", "key.pem")
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		return "", err
	}
	// Its own key, with the first gateway's capabilities; ceph.conf's
	// "keyring = $name.keyring" finds it.
	if _, err := c.ceph(ctx, "auth", "get-or-create", tlsName, "mon", "allow rw", "osd", "allow rwx", "mgr", "allow rw",
		"-o", c.path(tlsName+".keyring")); err != nil {
		return "", fmt.Errorf("rgwtest: key for %s: %w", tlsName, err)
	}
	ports, err := freePorts(1)
	if err != nil {
		return "", err
	}
	addr := "127.0.0.1:" + strconv.Itoa(ports[0])
	frontends := fmt.Sprintf("beast ssl_endpoint=%s ssl_certificate=%s ssl_private_key=%s", addr, certFile, keyFile)
	// No cache, as the first gateway: two caching gateways would keep
	// each other's caches coherent through watches on the pool.
	if err := c.startDaemon(tlsName, "radosgw", "-n", tlsName, "--rgw_frontends="+frontends,
		"--rgw_data="+dir, "--rgw_cache_enabled=false"); err != nil {
		return "", err
	}
	ep = "https://" + addr
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	defer hc.CloseIdleConnections()
	err = c.waitFor(ctx, "radosgw to answer HTTPS on "+addr, tlsName, answers(hc, ep+"/"))
	if err != nil {
		_ = c.stop(tlsName, syscall.SIGTERM, 3*time.Second)
		return "", fmt.Errorf("rgwtest: %w", err)
	}
	c.mu.Lock()
	c.tlsEndpoint = ep
	c.mu.Unlock()
	return ep, nil
}

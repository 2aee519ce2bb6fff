package sshfs

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"net"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// hostKeyError explains a refused host key; it wraps ErrHostKey and survives
// the ssh package's "handshake failed" wrapping.
type hostKeyError struct{ msg string }

func (e *hostKeyError) Error() string { return e.msg }
func (e *hostKeyError) Unwrap() error { return ErrHostKey }

func hostKeyErrorf(format string, args ...any) error {
	return &hostKeyError{msg: ErrHostKey.Error() + ": " + fmt.Sprintf(format, args...)}
}

// hostKeyCallback builds the verifier for h and, from known_hosts, the host
// key algorithms to ask for, so a server that also has keys of other types
// presents the one we know rather than failing as "changed".
func hostKeyCallback(h Host) (ssh.HostKeyCallback, []string, error) {
	if fp := strings.TrimSpace(h.Fingerprint); fp != "" {
		if !strings.HasPrefix(fp, "SHA256:") {
			return nil, nil, hostKeyErrorf("fingerprint %q for %s must be of the form SHA256:<base64>", fp, h.Addr)
		}
		return func(_ string, _ net.Addr, key ssh.PublicKey) error {
			if got := ssh.FingerprintSHA256(key); got != fp {
				return hostKeyErrorf("host key for %s has fingerprint %s, but %s is pinned (possible man-in-the-middle attack, or the host was reinstalled)", h.Addr, got, fp)
			}
			return nil
		}, nil, nil
	}
	if h.KnownHostsFile == "" {
		return nil, nil, hostKeyErrorf("no known_hosts file or fingerprint configured for %s; refusing to connect without verifying the host key", h.Addr)
	}
	kh, err := knownhosts.New(h.KnownHostsFile)
	if err != nil {
		return nil, nil, hostKeyErrorf("read known_hosts %s: %v", h.KnownHostsFile, err)
	}
	cb := func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		err := kh(hostname, remote, key)
		if err == nil {
			return nil
		}
		fp := ssh.FingerprintSHA256(key)
		var ke *knownhosts.KeyError
		var re *knownhosts.RevokedError
		switch {
		case errors.As(err, &re):
			return hostKeyErrorf("host key %s %s for %s is revoked in %s", key.Type(), fp, h.Addr, h.KnownHostsFile)
		case errors.As(err, &ke) && len(ke.Want) == 0:
			return hostKeyErrorf("host %s is not in %s (it offered %s key %s); after verifying the fingerprint out of band, add it with: ssh-keyscan -p %s %s >> %s, or pin it with the fingerprint option",
				h.Addr, h.KnownHostsFile, key.Type(), fp, port(h.Addr), hostOnly(h.Addr), h.KnownHostsFile)
		case errors.As(err, &ke):
			var known []string
			for _, w := range ke.Want {
				known = append(known, fmt.Sprintf("%s %s (%s:%d)", w.Key.Type(), ssh.FingerprintSHA256(w.Key), w.Filename, w.Line))
			}
			return hostKeyErrorf("host key changed for %s: it offered %s %s, known_hosts has %s (possible man-in-the-middle attack, or the host was reinstalled; fix the known_hosts entry after verifying)",
				h.Addr, key.Type(), fp, strings.Join(known, ", "))
		default:
			return hostKeyErrorf("%s: %v", h.Addr, err)
		}
	}
	return cb, knownAlgorithms(kh, h.Addr), nil
}

// knownAlgorithms asks known_hosts which key types it holds for addr by
// probing with a throwaway key: the mismatch error lists the known keys.
func knownAlgorithms(kh ssh.HostKeyCallback, addr string) []string {
	pub, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		return nil
	}
	probe, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil
	}
	remote := &net.TCPAddr{IP: net.ParseIP(hostOnly(addr))}
	if remote.IP == nil {
		remote = &net.TCPAddr{IP: net.IPv4zero}
	}
	var ke *knownhosts.KeyError
	if err := kh(addr, remote, probe); !errors.As(err, &ke) || len(ke.Want) == 0 {
		return nil
	}
	seen := map[string]bool{}
	var algos []string
	add := func(a string) {
		if !seen[a] {
			seen[a] = true
			algos = append(algos, a)
		}
	}
	for _, w := range ke.Want {
		switch t := w.Key.Type(); t {
		case ssh.KeyAlgoRSA:
			add(ssh.KeyAlgoRSASHA512)
			add(ssh.KeyAlgoRSASHA256)
			add(ssh.KeyAlgoRSA)
		default:
			add(t)
		}
	}
	return algos
}

func hostOnly(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return h
}

func port(addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "22"
	}
	return p
}

package config

import (
	"errors"
	"fmt"
	"net"
	"strings"
)

// Connect configures what connect reports to the management node, which
// turns it into system tags (split on "::", so no value may contain it).
type Connect struct {
	// IPAddresses are the addresses KVM hosts and peer stores may reach
	// this store on (the backup and sync networks). Empty: every global
	// unicast IPv4 address of the host.
	IPAddresses []string `yaml:"ipAddresses"`
	// AllowIPv6 also lists IPv6 addresses (host ones when IPAddresses is
	// empty, and allows them in IPAddresses). An address whose text
	// contains "::" is never sent: the management node's tag check rejects it.
	AllowIPv6 bool `yaml:"allowIPv6"`
	// StorageInfo is how KVM hosts write backups into upload dirs:
	// "sshfs" (the default: reply {type:sshfs, url:<root>, options:defaults}),
	// "nfs" (needs StorageURL, the NFS export of the root, and
	// StorageOptions, the mount options) or "none" (no storageInfo: hosts
	// use sshfs).
	StorageInfo    string `yaml:"storageInfo"`
	StorageURL     string `yaml:"storageURL"`
	StorageOptions string `yaml:"storageOptions"`
}

// TagSafe reports whether v can be a system tag value: non-empty, no "::".
func TagSafe(v string) bool { return v != "" && !strings.Contains(v, "::") }

// validate checks the connect settings.
func (c Connect) validate() error {
	var errs []error
	for _, a := range c.IPAddresses {
		ip := net.ParseIP(strings.TrimSpace(a))
		switch {
		case ip == nil:
			errs = append(errs, fmt.Errorf("connect.ipAddresses: %q is not an IP address", a))
		case ip.To4() == nil && !c.AllowIPv6:
			errs = append(errs, fmt.Errorf("connect.ipAddresses: %q is IPv6; set connect.allowIPv6 to list it", a))
		case !TagSafe(strings.TrimSpace(a)):
			errs = append(errs, fmt.Errorf("connect.ipAddresses: %q contains \"::\", which the management node cannot store; write it in full", a))
		}
	}
	switch c.StorageInfo {
	case "", "sshfs", "none":
	case "nfs":
		if !TagSafe(c.StorageURL) || !TagSafe(c.StorageOptions) {
			errs = append(errs, errors.New(`connect.storageInfo nfs needs connect.storageURL and connect.storageOptions, non-empty and without "::"`))
		}
	default:
		errs = append(errs, fmt.Errorf("connect.storageInfo: %q, want sshfs, nfs or none", c.StorageInfo))
	}
	return errors.Join(errs...)
}

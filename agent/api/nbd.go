package api

import (
	"fmt"
	"net/url"
	"strings"
)

// ExportNBDImageRequest is the body of PathExportNBDImage: empty writable
// qcow2 targets, one per size, each served over NBD for a KVM host's
// backup job.
type ExportNBDImageRequest struct {
	Workspace  string `json:"workspace"` // a directory inside an upload dir; sets the default expiry
	Sizes      []Int  `json:"sizes"`     // bytes, one target each
	ExpireHour Int    `json:"expireHour"`
}

// Validate checks the request's fields.
func (q *ExportNBDImageRequest) Validate() error {
	if q.Workspace == "" {
		return missing("workspace")
	}
	if len(q.Sizes) == 0 {
		return missing("sizes")
	}
	for i, s := range q.Sizes {
		if s <= 0 {
			return fmt.Errorf("sizes[%d] = %d: must be positive", i, s)
		}
	}
	if q.ExpireHour < 0 {
		return fmt.Errorf("expireHour %d is negative", q.ExpireHour)
	}
	return nil
}

// ExportNBDImageReply answers PathExportNBDImage: the targets' paths and
// ports, in the order of the sizes asked for.
type ExportNBDImageReply struct {
	ImagePaths     []string `json:"imagePaths"`
	Ports          []int    `json:"ports"`
	NBDDescription string   `json:"nbdDescription"` // names the group for cancel and processToRelease
	TLS            bool     `json:"tls"`            // clients must connect with TLS (tls-creds)
	NBDKey
}

// NBDKey is the pre-shared key a client must present (nbd.clientAuth psk):
// QEMU's tls-creds-psk with username PSKIdentity and, in its keys.psk,
// "PSKIdentity:PSK". Empty when the servers take no key.
type NBDKey struct {
	PSKIdentity string `json:"pskIdentity,omitempty"`
	PSK         string `json:"psk,omitempty"`
}

// CancelNBDImageRequest is the body of PathExportNBDImageCancel: the
// target group to stop and remove.
type CancelNBDImageRequest struct {
	NBDDescription string `json:"nbdDescription"`
}

// Validate checks the request's fields.
func (q *CancelNBDImageRequest) Validate() error {
	if q.NBDDescription == "" {
		return missing("nbdDescription")
	}
	return nil
}

// CancelNBDImageReply answers PathExportNBDImageCancel.
type CancelNBDImageReply struct {
	Cancelled bool `json:"cancelled"` // false when the targets were already gone
}

// RemoteTargetRequest is the body of PathExportRemoteTarget: a stored
// chain to serve read-only over NBD.
type RemoteTargetRequest struct {
	InstallPath      string `json:"installPath"`
	RemoteTargetType string `json:"remoteTargetType"` // "NBD" or ""
	Hostname         string `json:"hostname"`         // host of targetUri; default the request's Host
}

// Validate checks the request's fields.
func (q *RemoteTargetRequest) Validate() error {
	if q.InstallPath == "" {
		return missing("installPath")
	}
	if q.RemoteTargetType != "" && !strings.EqualFold(q.RemoteTargetType, "NBD") {
		return fmt.Errorf("remoteTargetType %q not supported (NBD)", q.RemoteTargetType)
	}
	if strings.ContainsAny(q.Hostname, "/@?# ") {
		return fmt.Errorf("hostname %q is not a host name", q.Hostname)
	}
	return nil
}

// RemoteTargetReply answers PathExportRemoteTarget.
type RemoteTargetReply struct {
	TargetURI   string `json:"targetUri"` // nbd://host:port/<export>
	Port        int    `json:"port"`
	ExportName  string `json:"exportName"`
	InstallPath string `json:"installPath"`
	// TLS: connect with TLS. QEMU has no URI for that: clients use
	// targetUri's host, port and export with tls-creds (see the protocol doc).
	TLS bool `json:"tls"`
	NBDKey
}

// DeleteRemoteTargetRequest is the body of PathRemoteTargetDelete: the
// read-only servers to stop, by
// targetUri (port and export name; the host may be spelled differently),
// by installPath, or both.
type DeleteRemoteTargetRequest struct {
	TargetURI   string `json:"targetUri"`
	InstallPath string `json:"installPath"`
}

// Validate checks the request's fields.
func (q *DeleteRemoteTargetRequest) Validate() error {
	if q.TargetURI == "" && q.InstallPath == "" {
		return missing("targetUri")
	}
	if q.TargetURI != "" {
		u, err := url.Parse(q.TargetURI)
		if err != nil || u.Scheme != "nbd" || u.Port() == "" {
			return fmt.Errorf("targetUri %q is not an nbd://host:port/export URI", q.TargetURI)
		}
	}
	return nil
}

// DeleteRemoteTargetReply answers PathRemoteTargetDelete.
type DeleteRemoteTargetReply struct {
	Deleted int `json:"deleted"`
}

package api

import (
	"errors"
	"fmt"
	"strings"
)

// HostLogin holds the SSH fields shared by the host transfer paths
// (PathPullFromHost, PathWriteToHost). Password and PrivateKey are
// secrets: never logged, never echoed. The host key is checked against
// HostKeyFingerprint if given, else against the daemon's knownHostsFile;
// with neither the request is refused.
type HostLogin struct {
	Hostname           string `json:"hostname"`
	SSHPort            int    `json:"sshPort"` // 0: 22
	Username           string `json:"username"`
	Password           string `json:"password"`
	PrivateKey         string `json:"privateKey"`         // OpenSSH/PEM text
	HostKeyFingerprint string `json:"hostKeyFingerprint"` // "SHA256:…", as ssh-keygen -lf prints it
}

// Validate checks the required fields.
func (h *HostLogin) Validate() error {
	switch {
	case h.Hostname == "":
		return missing("hostname")
	case h.Username == "":
		return missing("username")
	case h.Password == "" && h.PrivateKey == "":
		return errors.New("missing field password or privateKey")
	case h.SSHPort < 0 || h.SSHPort > 65535:
		return fmt.Errorf("sshPort %d out of range", h.SSHPort)
	case h.HostKeyFingerprint != "" && !strings.HasPrefix(h.HostKeyFingerprint, "SHA256:"):
		return fmt.Errorf("hostKeyFingerprint %q: want the SHA256:... form ssh-keygen -lf prints", h.HostKeyFingerprint)
	}
	return nil
}

// PullFromHostRequest is the body of PathPullFromHost (async): store the
// qcow2 at Path on the host as a canonical layer on Parent.
type PullFromHostRequest struct {
	HostLogin
	Path string `json:"path"`
	// Parent is the install path (or name:id) of the image the layer is a
	// delta on; "" for a base, which must have no backing file.
	Parent      string `json:"parent"`
	Name        string `json:"name"`
	ID          string `json:"id"`
	InstallPath string `json:"installPath"`
	Desc        string `json:"desc"`
	// Bandwidths in bytes per second, 0 = unlimited: one budget shared by
	// every stream of the pull.
	VolumeReadBandwidth  int64 `json:"volumeReadBandwidth"`
	NetworkReadBandwidth int64 `json:"networkReadBandwidth"`
	// Parallelism is the streams of ranged reads; 0: the daemon's
	// parallelismDegree (at most 64).
	Parallelism int `json:"parallelism"`
}

// Validate checks the required fields.
func (q *PullFromHostRequest) Validate() error {
	if err := q.HostLogin.Validate(); err != nil {
		return err
	}
	switch {
	case q.Path == "":
		return missing("path")
	case q.Name == "" && q.Parent == "" && q.InstallPath == "":
		return missing("name")
	case q.VolumeReadBandwidth < 0 || q.NetworkReadBandwidth < 0:
		return errors.New("bandwidth fields must not be negative")
	case q.Parallelism < 0:
		return fmt.Errorf("parallelism %d is negative", q.Parallelism)
	}
	return nil
}

// PullFromHostReply answers PathPullFromHost: the import-backup reply of
// the recorded layer plus what the pull moved.
type PullFromHostReply struct {
	ImportReply
	HostBytesRead  int64 `json:"hostBytesRead"`  // bytes received from the host, retries included
	AllocatedBytes int64 `json:"allocatedBytes"` // guest bytes of the pulled layer's data clusters
}

// WriteToHostRequest is the body of PathWriteToHost (async): flatten the
// stored chain of InstallPath into one image at Path on the host.
type WriteToHostRequest struct {
	HostLogin
	InstallPath      string `json:"installPath"`
	Path             string `json:"path"`
	Format           string `json:"format"`           // "qcow2" (default) or "raw"
	RecoverBandwidth int64  `json:"recoverBandwidth"` // bytes per second, 0 = unlimited
}

// Validate checks the required fields.
func (q *WriteToHostRequest) Validate() error {
	if err := q.HostLogin.Validate(); err != nil {
		return err
	}
	switch {
	case q.InstallPath == "":
		return missing("installPath")
	case q.Path == "":
		return missing("path")
	case q.Format != "" && q.Format != "qcow2" && q.Format != "raw":
		return fmt.Errorf("format %q: want qcow2 or raw", q.Format)
	case q.RecoverBandwidth < 0:
		return errors.New("recoverBandwidth must not be negative")
	}
	return nil
}

// WriteToHostReply answers PathWriteToHost.
type WriteToHostReply struct {
	InstallPath string `json:"installPath"`
	Hostname    string `json:"hostname"`
	Path        string `json:"path"`
	Format      string `json:"format"`
	Size        int64  `json:"size"` // bytes of the written file
	VirtualSize int64  `json:"virtualsize"`
	SHA256      string `json:"sha256"` // of the file, as read back from the host
}

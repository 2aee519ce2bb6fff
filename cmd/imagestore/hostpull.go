package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	"imagestore/agent/api"
	"imagestore/blobstore"
)

// pullFromHostResult is the agent's reply as printed with -json: the
// layer and what the pull moved, without the store's capacity.
type pullFromHostResult struct {
	Name           string `json:"name"`
	ID             string `json:"id"`
	InstallPath    string `json:"installPath"`
	Blobsum        string `json:"blobsum"`
	Size           int64  `json:"size"`
	VirtualSize    int64  `json:"virtualsize"`
	Format         string `json:"format"`
	HostBytesRead  int64  `json:"hostBytesRead"`
	AllocatedBytes int64  `json:"allocatedBytes"`
}

// Secrets come from files or the environment, never from the command line
// (where ps would show them), and are never printed.
const (
	envSSHPassword = "IMAGESTORE_SSH_PASSWORD"
	envSSHKeyFile  = "IMAGESTORE_SSH_KEY_FILE"
)

func cmdPullFromHost(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("pullfromhost")
	var q api.PullFromHostRequest
	fs.StringVar(&q.Hostname, "host", "", "KVM host name or address")
	fs.IntVar(&q.SSHPort, "port", 22, "SSH port of the host")
	fs.StringVar(&q.Username, "user", "", "SSH user on the host")
	keyFile := fs.String("key-file", os.Getenv(envSSHKeyFile), "private key file (default $"+envSSHKeyFile+")")
	pwFile := fs.String("password-file", "", "file holding the SSH password (else $"+envSSHPassword+")")
	fs.StringVar(&q.HostKeyFingerprint, "fingerprint", "", "pin the host key (SHA256:... as ssh-keygen -lf prints); else the agent's knownHostsFile")
	fs.StringVar(&q.Path, "path", "", "qcow2 on the host: a backup delta or the top of a volume's chain")
	fs.StringVar(&q.Parent, "parent", "", "stored parent (name:id or zstore:// install path); empty for a base")
	fs.StringVar(&q.Name, "name", "", "image name (default the parent's)")
	fs.StringVar(&q.ID, "id", "", "image id (default random)")
	fs.StringVar(&q.Desc, "desc", "", "description")
	var volBW, netBW byteFlag
	fs.Var(&volBW, "volume-bwlimit", "host disk read limit in bytes/s (suffixes K, M, G; 0 = none)")
	fs.Var(&netBW, "network-bwlimit", "network read limit in bytes/s (0 = none); both limits apply to one budget")
	fs.IntVar(&q.Parallelism, "parallelism", 0, "SFTP read streams (0 = the agent's parallelismDegree; at most 64)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 || q.Hostname == "" || q.Username == "" || q.Path == "" {
		return usageErr("pullfromhost -host H -user U -path P [-port N] [-key-file F | -password-file F] [-parent name:id] ...")
	}
	if q.Name == "" && q.Parent == "" {
		return usageErr("pullfromhost: -name is required for a base (no -parent)")
	}
	if q.Parallelism < 0 || q.Parallelism > 64 {
		return usageErr("-parallelism must be 0..64")
	}
	if q.Parent != "" && !strings.HasPrefix(q.Parent, "zstore://") {
		ref, err := blobstore.ParseRef(q.Parent)
		if err != nil {
			return usageErr("-parent: %v", err)
		}
		q.Parent = ref.InstallPath()
	}
	q.VolumeReadBandwidth, q.NetworkReadBandwidth = volBW.v, netBW.v
	if err := loadSecrets(&q, *keyFile, *pwFile); err != nil {
		return err
	}
	a, err := g.agent()
	if err != nil {
		return err
	}
	defer a.hc.CloseIdleConnections()
	var rep api.PullFromHostReply
	if err := a.callSync(ctx, api.SyncPath(api.PathPullFromHost), q, &rep); err != nil {
		return fmt.Errorf("%s:%s: %w", q.Hostname, q.Path, err)
	}
	res := pullFromHostResult{
		Name: rep.Name, ID: rep.ID, InstallPath: rep.InstallPath, Blobsum: rep.Blobsum,
		Size: rep.Size, VirtualSize: rep.VirtualSize, Format: rep.Format,
		HostBytesRead: rep.HostBytesRead, AllocatedBytes: rep.AllocatedBytes,
	}
	return g.printResult(res, func(w io.Writer) {
		fmt.Fprintf(w, "%s:%s virtualsize=%d size=%d blobsum=%s hostBytesRead=%d installPath=%s\n",
			res.Name, res.ID, res.VirtualSize, res.Size, res.Blobsum, res.HostBytesRead, res.InstallPath)
	})
}

// loadSecrets reads the key or password; a key wins when both are given.
func loadSecrets(q *api.PullFromHostRequest, keyFile, pwFile string) error {
	if keyFile != "" {
		b, err := os.ReadFile(keyFile)
		if err != nil {
			return fmt.Errorf("-key-file: %w", err)
		}
		q.PrivateKey = string(b)
		return nil
	}
	if pwFile != "" {
		b, err := os.ReadFile(pwFile)
		if err != nil {
			return fmt.Errorf("-password-file: %w", err)
		}
		q.Password = strings.TrimRight(string(b), "\r\n")
	} else {
		q.Password = os.Getenv(envSSHPassword)
	}
	if q.Password == "" {
		return usageErr("pullfromhost needs -key-file (or $%s), -password-file or $%s", envSSHKeyFile, envSSHPassword)
	}
	return nil
}

// callSync POSTs req to an agent command's -sync twin and decodes the
// reply into v; the call lasts as long as the job (no client timeout,
// ctx cancels it, and the agent then cancels the job).
func (a *agentClient) callSync(ctx context.Context, path string, req, v any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, a.base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	hr.Header.Set("Content-Type", "application/json")
	if a.token != "" {
		hr.Header.Set("Authorization", "Bearer "+a.token)
	}
	hc := *a.hc
	hc.Timeout = 0
	resp, err := hc.Do(hr)
	if err != nil {
		return fmt.Errorf("agent %s: %w", a.base, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("agent %s: %w", a.base, err)
	}
	var st api.Reply
	jerr := json.Unmarshal(raw, &st)
	switch {
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return &errAgent{resp.StatusCode, "authentication failed: check -token or $IMAGESTORE_TOKEN"}
	case jerr != nil:
		return &errAgent{resp.StatusCode, strings.TrimSpace(string(raw))}
	case !st.Success:
		return &errAgent{resp.StatusCode, st.Error}
	}
	return json.Unmarshal(raw, v)
}

package agent

import (
	"context"
	"net/http"

	"imagestore/agent/api"
	"imagestore/agent/hostxfer"
	"imagestore/agent/jobs"
)

// Host transfers: the agent reads qcow2 layers from, and writes flattened
// chains to, KVM hosts over SSH/SFTP (docs/agent-protocol.md "Host
// transfers"); the work is agent/hostxfer's.

func hostLogin(l api.HostLogin) hostxfer.Login {
	return hostxfer.Login{
		Hostname: l.Hostname, Port: l.SSHPort, Username: l.Username,
		Password: l.Password, PrivateKey: l.PrivateKey, HostKeyFingerprint: l.HostKeyFingerprint,
	}
}

// pullFromHost stores one qcow2 layer read from a KVM host as a canonical
// layer on its parent.
func (a *Agent) pullFromHost(w http.ResponseWriter, r *http.Request) {
	var req api.PullFromHostRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "pullfromhost", Backup: true, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		res, err := a.hostxfer.Pull(ctx, hostxfer.PullRequest{
			Login: hostLogin(req.HostLogin), Path: req.Path, Parent: req.Parent,
			Name: req.Name, ID: req.ID, InstallPath: req.InstallPath, Desc: req.Desc,
			VolumeReadBandwidth: req.VolumeReadBandwidth, NetworkReadBandwidth: req.NetworkReadBandwidth,
			Parallelism: req.Parallelism,
		}, job)
		if err != nil {
			return nil, err
		}
		return api.PullFromHostReply{
			ImportReply:   importReplyFor(res.Image, a.capacity()),
			HostBytesRead: res.HostBytesRead, AllocatedBytes: res.Allocated,
		}, nil
	})
}

// writeToHost (revert) flattens a stored chain into one standalone image
// on a KVM host.
func (a *Agent) writeToHost(w http.ResponseWriter, r *http.Request) {
	var req api.WriteToHostRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "writetohost", Backup: true, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		res, err := a.hostxfer.Write(ctx, hostxfer.WriteRequest{
			Login: hostLogin(req.HostLogin), InstallPath: req.InstallPath, Path: req.Path,
			Format: req.Format, Bandwidth: req.RecoverBandwidth,
		}, job)
		if err != nil {
			return nil, err
		}
		return api.WriteToHostReply{
			InstallPath: res.Image.InstallPath(), Hostname: req.Hostname, Path: req.Path, Format: res.Format,
			Size: res.Size, VirtualSize: res.Image.VirtualSize, SHA256: res.SHA256,
		}, nil
	})
}

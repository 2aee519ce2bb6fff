package agent

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"imagestore/agent/api"
	"imagestore/agent/jobs"
	"imagestore/agent/nbd"
	"imagestore/agent/nbdtarget"
)

// newNBD builds the NBD service from the configuration. Without qemu-nbd
// the agent still runs; NBD commands then fail with the reason.
func (a *Agent) newNBD() *nbdtarget.Service {
	return nbdtarget.New(nbdtarget.Options{
		Dir: filepath.Join(a.root, "nbd"), Config: a.cfg.NBD, HasToken: a.cfg.Token != "",
		CertFile: a.cfg.AgentListenerTLS().Cert, KeyFile: a.cfg.AgentListenerTLS().Key,
		Layers: a.layers, Uploads: a.uploads, Logger: a.log,
	})
}

// releaseProcess handles import-backup's processToRelease (see
// nbdtarget.Service.ReleaseForImport).
func (a *Agent) releaseProcess(desc string) error {
	return a.nbd.ReleaseForImport(context.Background(), desc)
}

// nbdTargetPath reports whether path names a released NBD target of this
// agent (by its base name), whose private file import-backup reads
// instead of the workspace entry.
func (a *Agent) nbdTargetPath(path string) (string, bool) { return a.nbd.TargetPath(path) }

func nbdKeyOf(s nbd.Server) api.NBDKey {
	if s.PSK == "" {
		return api.NBDKey{}
	}
	return api.NBDKey{PSKIdentity: nbd.PSKIdentity, PSK: s.PSK}
}

// exportNBDImage creates empty qcow2 targets, serves each writable over
// NBD for a KVM host's backup job and puts each directly into the
// workspace (see nbdtarget.Service.CreateTargets). The targets expire
// with the workspace's upload dir (or after expireHour).
func (a *Agent) exportNBDImage(w http.ResponseWriter, r *http.Request) {
	var req api.ExportNBDImageRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "exportnbdimage", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		if err := a.nbd.Err(); err != nil {
			return nil, err
		}
		ttl, err := a.workspaceTTL(req.Workspace, int64(req.ExpireHour))
		if err != nil {
			return nil, err
		}
		sizes := make([]int64, len(req.Sizes))
		for i, s := range req.Sizes {
			sizes[i] = int64(s)
		}
		g, err := a.nbd.CreateTargets(ctx, req.Workspace, sizes, ttl)
		if err != nil {
			return nil, err
		}
		rep := api.ExportNBDImageReply{NBDDescription: g.Description, ImagePaths: g.Paths}
		for _, s := range g.Servers {
			rep.Ports = append(rep.Ports, s.Port)
			rep.TLS = s.TLS
			rep.NBDKey = nbdKeyOf(s) // one key for the group
		}
		return rep, nil
	})
}

// workspaceTTL is how long NBD targets for ws live: as long as the upload
// dir ws is in, or expireHour hours when positive.
func (a *Agent) workspaceTTL(ws string, expireHour int64) (time.Duration, error) {
	_, updir, err := a.uploads.ConfineWorkspace(ws)
	if err != nil {
		return 0, err
	}
	ttl := a.cfg.UploadDirExpiry
	if exp, err := a.uploads.Expiry(updir); err == nil {
		ttl = time.Until(exp)
	}
	if expireHour > 0 {
		ttl = time.Duration(expireHour) * time.Hour
	}
	if ttl <= 0 {
		return 0, fmt.Errorf("workspace %s: its upload dir has expired", ws)
	}
	return ttl, nil
}

// cancelNBDImage stops a target group's servers and removes the targets;
// an unknown group gives cancelled:false.
func (a *Agent) cancelNBDImage(w http.ResponseWriter, r *http.Request) {
	var req api.CancelNBDImageRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "exportnbdimage-cancel", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		cancelled, err := a.nbd.CancelTargets(ctx, req.NBDDescription)
		if err != nil {
			return nil, err
		}
		return api.CancelNBDImageReply{Cancelled: cancelled}, nil
	})
}

// exportRemoteTarget serves a stored chain over NBD for instant restore (see
// nbdtarget.Service.ServeChain).
func (a *Agent) exportRemoteTarget(w http.ResponseWriter, r *http.Request) {
	var req api.RemoteTargetRequest
	err := decode(r, &req)
	host := req.Hostname
	if host == "" {
		host = hostOnly(r.Host)
	}
	a.async(w, r, JobSpec{Kind: "remotetarget", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		// Unavailable NBD is the answer whatever the image.
		if err := a.nbd.Err(); err != nil {
			return nil, err
		}
		img, err := a.images.Lookup(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		rt, err := a.nbd.ServeChain(ctx, job, img, host)
		if err != nil {
			return nil, err
		}
		return api.RemoteTargetReply{TargetURI: rt.URI, Port: rt.Server.Port, ExportName: rt.Server.ExportName,
			InstallPath: rt.InstallPath, TLS: rt.Server.TLS, NBDKey: nbdKeyOf(rt.Server)}, nil
	})
}

// hostOnly strips the port from a Host header.
func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return strings.Trim(hostport, "[]")
}

// deleteRemoteTarget stops the exports matching targetUri or
// installPath and releases their chains; no match gives deleted:0.
func (a *Agent) deleteRemoteTarget(w http.ResponseWriter, r *http.Request) {
	var req api.DeleteRemoteTargetRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "remotetarget-delete", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		n, err := a.nbd.DeleteRemotes(ctx, req.TargetURI, req.InstallPath)
		if err != nil {
			return nil, err
		}
		return api.DeleteRemoteTargetReply{Deleted: n}, nil
	})
}

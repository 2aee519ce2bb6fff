package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"imagestore/agent/api"
	"imagestore/agent/config"
	"imagestore/agent/jobs"
)

func (a *Agent) echo(w http.ResponseWriter, r *http.Request) {
	reply(w, nil)
}

func (a *Agent) connect(w http.ResponseWriter, r *http.Request) {
	var req api.ConnectRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	a.stateMu.Lock()
	prev := a.state.UUID
	a.state.UUID = req.UUID
	a.state.ConnectedAt = time.Now().UTC()
	a.stateMu.Unlock()
	if err := a.saveState(); err != nil {
		replyErr(w, http.StatusOK, fmt.Errorf("saving connected uuid: %w", err))
		return
	}
	if prev != req.UUID {
		a.log.Info("connected", "uuid", req.UUID, "previous", prev)
	}
	rep := api.ConnectReply{
		Capacity:    a.capacity(),
		IPAddresses: a.advertisedIPs(r),
		StorageInfo: a.storageInfo(),
		UUID:        req.UUID,
	}
	reply(w, rep)
}

// advertisedIPs is connect's ipAddresses: the configured list, else the
// host's global unicast IPv4 addresses (IPv6 too with connect.allowIPv6).
// Never empty (the address the management node reached us on stands in)
// and never an address containing "::", which breaks the management
// node's extraips tag and so connect itself.
func (a *Agent) advertisedIPs(r *http.Request) []string {
	cc := a.cfg.Connect
	var out []string
	add := func(ip net.IP) {
		if ip == nil || (ip.To4() == nil && !cc.AllowIPv6) || !config.TagSafe(ip.String()) {
			return
		}
		if !slices.Contains(out, ip.String()) {
			out = append(out, ip.String())
		}
	}
	if len(cc.IPAddresses) > 0 {
		for _, s := range cc.IPAddresses {
			add(net.ParseIP(strings.TrimSpace(s)))
		}
	} else if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, ad := range addrs {
			if ipn, ok := ad.(*net.IPNet); ok && ipn.IP.IsGlobalUnicast() {
				add(ipn.IP)
			}
		}
	} else {
		// A sandbox without AF_NETLINK (rtnetlink lists the addresses).
		a.log.Error("connect: cannot list the host's addresses", "err", err)
	}
	if len(out) == 0 {
		if la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			if ta, ok := la.(*net.TCPAddr); ok {
				add(ta.IP)
			}
		}
	}
	if len(out) == 0 {
		out = append(out, "127.0.0.1")
	}
	return out
}

// storageInfo is connect's storageInfo: complete (type, url and options
// all tag-safe) or absent.
func (a *Agent) storageInfo() *api.StorageInfo {
	cc := a.cfg.Connect
	var si api.StorageInfo
	switch cc.StorageInfo {
	case "none":
		return nil
	case "nfs":
		si = api.StorageInfo{Type: "nfs", URL: cc.StorageURL, Options: cc.StorageOptions}
	default:
		si = api.StorageInfo{Type: "sshfs", URL: a.root, Options: "defaults"}
	}
	if !config.TagSafe(si.Type) || !config.TagSafe(si.URL) || !config.TagSafe(si.Options) {
		a.log.Warn("connect: storageInfo left out: a value is empty or contains \"::\"", "type", si.Type, "url", si.URL)
		return nil
	}
	return &si
}

func (a *Agent) ping(w http.ResponseWriter, r *http.Request) {
	var req api.PingRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "ping", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		a.stateMu.Lock()
		id := a.state.UUID
		a.stateMu.Unlock()
		return api.PingReply{Capacity: a.capacity(), UUID: id}, nil
	})
}

func (a *Agent) setQuota(w http.ResponseWriter, r *http.Request) {
	var req api.SetQuotaRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "setquota", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		if err := a.store.SetQuota(int64(*req.MaxCapacity)); err != nil {
			return nil, err
		}
		a.log.Info("quota set", "bytes", int64(*req.MaxCapacity))
		return a.capacity(), nil
	})
}

// progress reports the newest job whose taskuuid or imageUuid matches.
func (a *Agent) progress(w http.ResponseWriter, r *http.Request) {
	var req api.ProgressRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	var found *jobs.Info
	for _, in := range a.jobs.List() {
		if (req.TaskUUID != "" && in.ID == req.TaskUUID) || (req.ImageUUID != "" && (in.ImageUUID == req.ImageUUID || in.ID == req.ImageUUID)) {
			in := in
			found = &in
		}
	}
	if found == nil {
		replyErr(w, http.StatusOK, fmt.Errorf("no job for imageUuid %q", req.ImageUUID+req.TaskUUID))
		return
	}
	rep := progressReply(*found)
	if found.State == jobs.Failed || found.State == jobs.Cancelled {
		writeJSON(w, http.StatusOK, replyBody(rep, fmt.Errorf("job %s %s: %s", found.ID, found.State, found.Error)))
		return
	}
	reply(w, rep)
}

// progressReply is a job as progress reports it (PROTOCOL note B3):
// actualSize is the whole file's size as soon as it is known,
// downloadSize the bytes received so far (where an upload resumes),
// lastOpTime when bytes last arrived; once the job succeeded, size is the
// image's virtual size and actualSize its stored size.
func progressReply(in jobs.Info) api.ProgressReply {
	pct := 0
	if in.Total > 0 {
		pct = int(min(in.Done*100/in.Total, 100))
	}
	if in.State == jobs.Succeeded {
		pct = 100
	}
	last := in.Created
	if in.Started != nil {
		last = *in.Started
	}
	if in.LastOp.After(last) {
		last = in.LastOp
	}
	if in.Ended != nil {
		last = *in.Ended
	}
	rep := api.ProgressReply{
		Completed: in.State.Finished(), Progress: pct,
		ActualSize: in.Total, DownloadSize: in.Done,
		InstallPath: in.InstallPath, Format: in.Format,
		LastOpTime: last.UnixMilli(), State: api.JobState(in.State), TaskUUID: in.ID,
	}
	var done api.ImportReply
	if in.State == jobs.Succeeded && json.Unmarshal(in.Result, &done) == nil && done.InstallPath != "" {
		rep.Size, rep.ActualSize = done.VirtualSize, done.Size
		rep.InstallPath, rep.Format = done.InstallPath, done.Format
	}
	return rep
}

// jobInfo is a job as job/list, job/get and job/cancel report it.
func jobInfo(in jobs.Info) api.JobInfo {
	return api.JobInfo{
		ID: in.ID, Kind: in.Kind, Backup: in.Backup, State: api.JobState(in.State), Error: in.Error,
		Done: in.Done, Total: in.Total, Created: in.Created, Started: in.Started, Ended: in.Ended,
		API: in.API, ImageUUID: in.ImageUUID, InstallPath: in.InstallPath, Format: in.Format,
		CallbackURL: in.CallbackURL, Callback: api.CallbackStatus(in.Callback), Result: in.Result,
	}
}

func (a *Agent) jobList(w http.ResponseWriter, r *http.Request) {
	var req api.JobListRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	out := []api.JobInfo{}
	for _, in := range a.jobs.List() {
		if (req.Kind == "" || in.Kind == req.Kind) && (req.State == "" || api.JobState(in.State) == req.State) {
			in.Result = nil
			out = append(out, jobInfo(in))
		}
	}
	reply(w, api.JobListReply{Jobs: out})
}

func (a *Agent) jobGet(w http.ResponseWriter, r *http.Request) {
	var req api.JobRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	j, ok := a.jobs.Get(req.TaskUUID)
	if !ok {
		replyErr(w, http.StatusOK, fmt.Errorf("no job with taskuuid %q", req.TaskUUID))
		return
	}
	reply(w, api.JobReply{Job: jobInfo(j.Info())})
}

func (a *Agent) jobCancel(w http.ResponseWriter, r *http.Request) {
	var req api.JobRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	in, err := a.jobs.Cancel(req.TaskUUID)
	if err != nil {
		replyErr(w, http.StatusOK, err)
		return
	}
	reply(w, api.JobReply{Job: jobInfo(in)})
}

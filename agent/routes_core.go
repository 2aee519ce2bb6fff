package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"imagestore/agent/api"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/fsutil"
)

// flexInt is api.Int.
//
// Transitional alias: request types not yet moved to api name it so.
type flexInt = api.Int

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
	reply(w, api.ConnectReply{
		Capacity:    a.capacity(),
		IPAddresses: hostIPs(),
		StorageInfo: api.StorageInfo{Type: "localfs", URL: a.root},
		UUID:        req.UUID,
	})
}

// hostIPs lists the host's global unicast addresses.
func hostIPs() []string {
	out := []string{}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return out
	}
	for _, ad := range addrs {
		if ipn, ok := ad.(*net.IPNet); ok && ipn.IP.IsGlobalUnicast() {
			out = append(out, ipn.IP.String())
		}
	}
	return out
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

type allocUploadDirReq struct {
	ExpireHour flexInt `json:"expireHour"`
}

// maxExpireHour bounds expireHour (ten years) so the expiry cannot overflow.
const maxExpireHour = 10 * 366 * 24

func (q *allocUploadDirReq) validate() error {
	if q.ExpireHour < 0 {
		return fmt.Errorf("expireHour %d is negative", q.ExpireHour)
	}
	if q.ExpireHour > maxExpireHour {
		return fmt.Errorf("expireHour %d is too large (at most %d)", q.ExpireHour, maxExpireHour)
	}
	return nil
}

type allocUploadDirReply struct {
	UploadDir string    `json:"uploadDir"`
	Expires   time.Time `json:"expires"`
}

// Upload dirs are <root>/uploads/u-<hex>, with the expiry in a sibling
// file u-<hex>.expires the uploader cannot touch from inside the dir.
const uploadDirPrefix = "u-"

func (a *Agent) allocUploadDir(w http.ResponseWriter, r *http.Request) {
	var req allocUploadDirReq
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	ttl := a.cfg.UploadDirExpiry
	if req.ExpireHour > 0 {
		ttl = time.Duration(req.ExpireHour) * time.Hour
	}
	name := uploadDirPrefix + randomHex(16)
	dir := filepath.Join(a.uploadRoot, name)
	exp := time.Now().Add(ttl).UTC().Truncate(time.Second)
	if err := fsutil.WriteFile(dir+".expires", []byte(exp.Format(time.RFC3339)), 0o600); err != nil {
		replyErr(w, http.StatusOK, fmt.Errorf("allocating upload dir: %w", err))
		return
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		_ = os.Remove(dir + ".expires")
		replyErr(w, http.StatusOK, fmt.Errorf("allocating upload dir: %w", err))
		return
	}
	a.log.Info("upload dir allocated", "dir", dir, "expires", exp)
	reply(w, allocUploadDirReply{UploadDir: dir, Expires: exp})
}

// cleanUploadDirs removes upload dirs whose expiry has passed.
func (a *Agent) cleanUploadDirs(now time.Time) (int, error) {
	ents, err := os.ReadDir(a.uploadRoot)
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, e := range ents {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, uploadDirPrefix) {
			continue
		}
		dir := filepath.Join(a.uploadRoot, name)
		exp, err := readExpiry(dir + ".expires")
		if err != nil {
			// No readable expiry: fall back to the dir's age.
			fi, serr := e.Info()
			if serr != nil {
				continue
			}
			exp = fi.ModTime().Add(a.cfg.UploadDirExpiry)
		}
		if now.Before(exp) {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		_ = os.Remove(dir + ".expires")
		n++
	}
	return n, errors.Join(errs...)
}

func readExpiry(path string) (time.Time, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return time.Time{}, err
	}
	return time.Parse(time.RFC3339, strings.TrimSpace(string(b)))
}

type allocInstallPathReq struct {
	Parent string `json:"parent"`
	Name   string `json:"name"`
}

type allocInstallPathReply struct {
	InstallPath string `json:"installPath"`
}

// allocInstallPath returns zstore://<parent's name>/<new id> for a parent,
// or zstore://<name or new name>/<new id> without one. Ids are random, so
// an allocation needs no record; import-backup refuses an existing one.
func (a *Agent) allocInstallPath(w http.ResponseWriter, r *http.Request) {
	var req allocInstallPathReq
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	name := req.Name
	if req.Parent != "" {
		p, err := a.lookupImage(r.Context(), "parent", req.Parent)
		if err != nil {
			replyErr(w, http.StatusOK, err)
			return
		}
		name = p.Name
	}
	if name == "" {
		name = randomHex(16)
	}
	ref := blobstore.Ref{Name: name, ID: randomHex(16)}
	if err := ref.Validate(); err != nil {
		replyErr(w, http.StatusOK, fmt.Errorf("name: %w", err))
		return
	}
	reply(w, allocInstallPathReply{InstallPath: ref.InstallPath()})
}

// parseImagePath accepts zstore://name/id or name:id.
func parseImagePath(field, s string) (blobstore.Ref, error) {
	if s == "" {
		return blobstore.Ref{}, missing(field)
	}
	var ref blobstore.Ref
	var err error
	if strings.HasPrefix(s, blobstore.InstallPathScheme) {
		ref, err = blobstore.ParseInstallPath(s)
	} else {
		ref, err = blobstore.ParseRef(s)
	}
	if err != nil {
		return ref, fmt.Errorf("%s: %w", field, err)
	}
	return ref, nil
}

// lookupImage parses an install path and loads the image, with errors that
// name the field and whether the path was malformed or unknown.
func (a *Agent) lookupImage(ctx context.Context, field, s string) (blobstore.Image, error) {
	ref, err := parseImagePath(field, s)
	if err != nil {
		return blobstore.Image{}, err
	}
	img, err := a.store.GetImage(ctx, ref)
	if errors.Is(err, blobstore.ErrNotFound) {
		if field == "parent" {
			return img, fmt.Errorf("parent %s not found in the store", s)
		}
		return img, fmt.Errorf("unknown install path %s (field %s): no such image", s, field)
	}
	if err != nil {
		return img, fmt.Errorf("%s %s: %w", field, s, err)
	}
	return img, nil
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

// progressReply is a job as progress reports it.
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
	if in.Ended != nil {
		last = *in.Ended
	}
	return api.ProgressReply{
		Completed: in.State.Finished(), Progress: pct,
		Size: in.Total, ActualSize: in.Done, DownloadSize: in.Done,
		InstallPath: in.InstallPath, Format: in.Format,
		LastOpTime: last.UnixMilli(), State: api.JobState(in.State), TaskUUID: in.ID,
	}
}

// jobInfo is a job as job/list, job/get and job/cancel report it.
func jobInfo(in jobs.Info) api.JobInfo {
	return api.JobInfo{
		ID: in.ID, Kind: in.Kind, Backup: in.Backup, State: api.JobState(in.State), Error: in.Error,
		Done: in.Done, Total: in.Total, Created: in.Created, Started: in.Started, Ended: in.Ended,
		ImageUUID: in.ImageUUID, InstallPath: in.InstallPath, Format: in.Format,
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

package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/fsutil"
)

// flexInt accepts a JSON number (integer or float, as Java clients may
// send 1.0E10) or a numeric string.
type flexInt int64

func (f *flexInt) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if s == "" || s == "null" {
		*f = 0
		return nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		*f = flexInt(n)
		return nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v != v || v > 1<<62 || v < -(1<<62) {
		return fmt.Errorf("%s is not a number", b)
	}
	*f = flexInt(v)
	return nil
}

func (a *Agent) echo(w http.ResponseWriter, r *http.Request) {
	reply(w, nil)
}

type connectReq struct {
	UUID string `json:"uuid"`
}

func (q *connectReq) validate() error {
	if q.UUID == "" {
		return missing("uuid")
	}
	return nil
}

type storageInfo struct {
	Type    string `json:"type"`
	URL     string `json:"url"`
	Options string `json:"options"`
}

type connectReply struct {
	Capacity
	IPAddresses []string    `json:"ipAddresses"`
	StorageInfo storageInfo `json:"storageInfo"`
	IORate      int64       `json:"ioRate"`
	SupportFuse bool        `json:"supportFuse"`
	UUID        string      `json:"uuid"`
}

func (a *Agent) connect(w http.ResponseWriter, r *http.Request) {
	var req connectReq
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
	reply(w, connectReply{
		Capacity:    a.capacity(),
		IPAddresses: hostIPs(),
		StorageInfo: storageInfo{Type: "localfs", URL: a.root},
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

type pingReq struct {
	UUID string `json:"uuid"`
}

type pingReply struct {
	Capacity
	UUID string `json:"uuid"`
}

func (a *Agent) ping(w http.ResponseWriter, r *http.Request) {
	var req pingReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "ping", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		a.stateMu.Lock()
		id := a.state.UUID
		a.stateMu.Unlock()
		return pingReply{Capacity: a.capacity(), UUID: id}, nil
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

type setQuotaReq struct {
	MaxCapacity *flexInt `json:"maxCapacity"`
}

func (q *setQuotaReq) validate() error {
	if q.MaxCapacity == nil {
		return missing("maxCapacity")
	}
	if *q.MaxCapacity < 0 {
		return fmt.Errorf("maxCapacity %d is negative", *q.MaxCapacity)
	}
	return nil
}

func (a *Agent) setQuota(w http.ResponseWriter, r *http.Request) {
	var req setQuotaReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "setquota", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		if err := a.store.SetQuota(int64(*req.MaxCapacity)); err != nil {
			return nil, err
		}
		a.log.Info("quota set", "bytes", int64(*req.MaxCapacity))
		return a.capacity(), nil
	})
}

type progressReq struct {
	ImageUUID string `json:"imageUuid"`
	TaskUUID  string `json:"taskuuid"`
}

func (q *progressReq) validate() error {
	if q.ImageUUID == "" && q.TaskUUID == "" {
		return missing("imageUuid")
	}
	return nil
}

type progressReply struct {
	Completed    bool       `json:"completed"`
	Progress     int        `json:"progress"` // percent
	Size         int64      `json:"size"`
	ActualSize   int64      `json:"actualSize"`
	DownloadSize int64      `json:"downloadSize"`
	InstallPath  string     `json:"installPath"`
	Format       string     `json:"format"`
	LastOpTime   int64      `json:"lastOpTime"` // unix milliseconds
	State        jobs.State `json:"state"`
	TaskUUID     string     `json:"taskuuid"`
}

// progress reports the newest job whose taskuuid or imageUuid matches.
func (a *Agent) progress(w http.ResponseWriter, r *http.Request) {
	var req progressReq
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
	pct := 0
	if found.Total > 0 {
		pct = int(min(found.Done*100/found.Total, 100))
	}
	if found.State == jobs.Succeeded {
		pct = 100
	}
	last := found.Created
	if found.Started != nil {
		last = *found.Started
	}
	if found.Ended != nil {
		last = *found.Ended
	}
	rep := progressReply{
		Completed: found.State.Finished(), Progress: pct,
		Size: found.Total, ActualSize: found.Done, DownloadSize: found.Done,
		InstallPath: found.InstallPath, Format: found.Format,
		LastOpTime: last.UnixMilli(), State: found.State, TaskUUID: found.ID,
	}
	if found.State == jobs.Failed || found.State == jobs.Cancelled {
		writeJSON(w, http.StatusOK, replyBody(rep, fmt.Errorf("job %s %s: %s", found.ID, found.State, found.Error)))
		return
	}
	reply(w, rep)
}

type jobListReq struct {
	Kind  string `json:"kind"`
	State string `json:"state"`
}

type jobListReply struct {
	Jobs []jobs.Info `json:"jobs"`
}

func (a *Agent) jobList(w http.ResponseWriter, r *http.Request) {
	var req jobListReq
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	out := []jobs.Info{}
	for _, in := range a.jobs.List() {
		if (req.Kind == "" || in.Kind == req.Kind) && (req.State == "" || string(in.State) == req.State) {
			in.Result = nil
			out = append(out, in)
		}
	}
	reply(w, jobListReply{Jobs: out})
}

type jobReq struct {
	TaskUUID string `json:"taskuuid"`
}

func (q *jobReq) validate() error {
	if q.TaskUUID == "" {
		return missing("taskuuid")
	}
	return nil
}

type jobReply struct {
	Job jobs.Info `json:"job"`
}

func (a *Agent) jobGet(w http.ResponseWriter, r *http.Request) {
	var req jobReq
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	j, ok := a.jobs.Get(req.TaskUUID)
	if !ok {
		replyErr(w, http.StatusOK, fmt.Errorf("no job with taskuuid %q", req.TaskUUID))
		return
	}
	reply(w, jobReply{Job: j.Info()})
}

func (a *Agent) jobCancel(w http.ResponseWriter, r *http.Request) {
	var req jobReq
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	in, err := a.jobs.Cancel(req.TaskUUID)
	if err != nil {
		replyErr(w, http.StatusOK, err)
		return
	}
	reply(w, jobReply{Job: in})
}

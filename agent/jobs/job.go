package jobs

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"time"
)

// State is the lifecycle state of a job.
type State string

// Job states, as reported by job/list, job/get and progress.
const (
	Waiting   State = "waiting"
	Running   State = "running"
	Succeeded State = "succeeded"
	Failed    State = "failed"
	Cancelled State = "cancelled"
)

// Finished reports whether a job in state s has ended.
func (s State) Finished() bool {
	return s == Succeeded || s == Failed || s == Cancelled
}

// ReasonInterrupted is the error of a job that was waiting or running when the
// daemon stopped (SIGTERM, crash or kill -9); it is set at shutdown or, after
// a crash, when the next start finds the job record unfinished.
const ReasonInterrupted = "interrupted by agent restart"

// CallbackStatus records delivery of a job's result to the management node.
type CallbackStatus struct {
	Attempts  int    `json:"attempts"`
	Delivered bool   `json:"delivered"`
	GivenUp   bool   `json:"givenUp"`
	LastError string `json:"lastError,omitempty"`
}

// Info is the persisted and reported view of a job.
type Info struct {
	ID      string     `json:"id"` // the taskuuid
	Kind    string     `json:"kind"`
	Backup  bool       `json:"backup"` // counts against the parallelism
	State   State      `json:"state"`
	Error   string     `json:"error,omitempty"`
	Done    int64      `json:"done"`  // bytes processed
	Total   int64      `json:"total"` // bytes expected, 0 = unknown
	Created time.Time  `json:"created"`
	Started *time.Time `json:"started,omitempty"`
	Ended   *time.Time `json:"ended,omitempty"`
	// API is the management node's API message id (threadContext.api of
	// the request), which canceljob-sync and import/cancel match.
	API         string          `json:"api,omitempty"`
	LastOp      time.Time       `json:"lastOp,omitzero"` // when bytes were last processed (Add)
	ImageUUID   string          `json:"imageUuid,omitempty"`
	InstallPath string          `json:"installPath,omitempty"`
	Format      string          `json:"format,omitempty"`
	CallbackURL string          `json:"callbackUrl,omitempty"` // redacted: no userinfo, query or fragment
	Callback    CallbackStatus  `json:"callback"`
	Result      json.RawMessage `json:"result,omitempty"` // the reply body sent to the callback
}

// Job is one request being run. Its body reports through the Progress
// methods (SetTotal, Add, SetImage).
type Job struct {
	done      chan struct{}
	cancel    context.CancelCauseFunc
	bytesDone atomic.Int64
	bytesAll  atomic.Int64
	lastOp    atomic.Int64 // unix milliseconds of the last Add

	persistMu sync.Mutex // orders record writes
	mu        sync.Mutex
	info      Info
	// callback is the full callback URL, which may carry credentials
	// (userinfo, a token in the query). It is never reported or put in the
	// record; while undelivered it is kept in a 0600 side file so a
	// restarted agent can still deliver.
	callback string
}

var _ Progress = (*Job)(nil)

// ID returns the job's taskuuid.
func (j *Job) ID() string { return j.info.ID }

// SetTotal sets the number of bytes the job expects to process.
func (j *Job) SetTotal(n int64) { j.bytesAll.Store(n) }

// Add records n more bytes processed, now.
func (j *Job) Add(n int64) {
	j.bytesDone.Add(n)
	j.lastOp.Store(time.Now().UnixMilli())
}

// SetImage names the image the job works on, for progress lookups.
func (j *Job) SetImage(imageUUID, installPath, format string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if imageUUID != "" {
		j.info.ImageUUID = imageUUID
	}
	if installPath != "" {
		j.info.InstallPath = installPath
	}
	if format != "" {
		j.info.Format = format
	}
}

// Info returns a snapshot of the job.
func (j *Job) Info() Info {
	j.mu.Lock()
	defer j.mu.Unlock()
	in := j.info
	in.Done = j.bytesDone.Load()
	in.Total = j.bytesAll.Load()
	if ms := j.lastOp.Load(); ms != 0 {
		in.LastOp = time.UnixMilli(ms)
	}
	in.Result = append(json.RawMessage(nil), j.info.Result...)
	return in
}

// Done is closed when the job has finished (its callback may still be pending).
func (j *Job) Done() <-chan struct{} { return j.done }

func (j *Job) callbackURL() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.callback
}

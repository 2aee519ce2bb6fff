package api

import (
	"encoding/json"
	"time"
)

// JobState is the lifecycle state of an async job.
type JobState string

// Job states.
const (
	JobWaiting   JobState = "waiting"
	JobRunning   JobState = "running"
	JobSucceeded JobState = "succeeded"
	JobFailed    JobState = "failed"
	JobCancelled JobState = "cancelled"
)

// Finished reports whether a job in state s has ended.
func (s JobState) Finished() bool {
	return s == JobSucceeded || s == JobFailed || s == JobCancelled
}

// CallbackStatus is the delivery of a job's result to its callback URL.
type CallbackStatus struct {
	Attempts  int    `json:"attempts"`
	Delivered bool   `json:"delivered"`
	GivenUp   bool   `json:"givenUp"`
	LastError string `json:"lastError,omitempty"`
}

// JobInfo is one job as job/list, job/get and job/cancel report it.
type JobInfo struct {
	ID          string          `json:"id"` // the taskuuid
	Kind        string          `json:"kind"`
	Backup      bool            `json:"backup"` // counts against parallelismDegree
	State       JobState        `json:"state"`
	Error       string          `json:"error,omitempty"`
	Done        int64           `json:"done"`  // bytes processed
	Total       int64           `json:"total"` // bytes expected, 0 = unknown
	Created     time.Time       `json:"created"`
	Started     *time.Time      `json:"started,omitempty"`
	Ended       *time.Time      `json:"ended,omitempty"`
	API         string          `json:"api,omitempty"` // threadContext.api of the request
	ImageUUID   string          `json:"imageUuid,omitempty"`
	InstallPath string          `json:"installPath,omitempty"`
	Format      string          `json:"format,omitempty"`
	CallbackURL string          `json:"callbackUrl,omitempty"` // without userinfo, query or fragment
	Callback    CallbackStatus  `json:"callback"`
	Result      json.RawMessage `json:"result,omitempty"` // the reply body sent to the callback; not in job/list
}

// ProgressRequest is the body of PathProgress: the newest job whose
// taskuuid is TaskUUID, or whose image (or taskuuid) is ImageUUID.
type ProgressRequest struct {
	ImageUUID string `json:"imageUuid,omitempty"`
	TaskUUID  string `json:"taskuuid,omitempty"`
}

// Validate checks the required fields.
func (q *ProgressRequest) Validate() error {
	if q.ImageUUID == "" && q.TaskUUID == "" {
		return missing("imageUuid")
	}
	return nil
}

// ProgressReply answers PathProgress. A failed or cancelled job is
// reported with success false and the job's error, and these fields.
type ProgressReply struct {
	Completed    bool     `json:"completed"`
	Progress     int      `json:"progress"` // percent
	Size         int64    `json:"size"`
	ActualSize   int64    `json:"actualSize"`
	DownloadSize int64    `json:"downloadSize"`
	InstallPath  string   `json:"installPath"`
	Format       string   `json:"format"`
	LastOpTime   int64    `json:"lastOpTime"` // unix milliseconds
	State        JobState `json:"state"`
	TaskUUID     string   `json:"taskuuid"`
}

// JobListRequest is the body of PathJobList; empty fields match all.
type JobListRequest struct {
	Kind  string   `json:"kind"`
	State JobState `json:"state"`
}

// JobListReply answers PathJobList, oldest first.
type JobListReply struct {
	Jobs []JobInfo `json:"jobs"`
}

// JobRequest is the body of PathJobGet and PathJobCancel.
type JobRequest struct {
	TaskUUID string `json:"taskuuid"`
}

// Validate checks the required fields.
func (q *JobRequest) Validate() error {
	if q.TaskUUID == "" {
		return missing("taskuuid")
	}
	return nil
}

// JobReply answers PathJobGet and PathJobCancel (the job as it was when
// cancelled).
type JobReply struct {
	Job JobInfo `json:"job"`
}

// ImportCancelRequest is the body of import/cancel: the import of
// ImageUUID (or every job of the API CancellationAPIID) is cancelled.
type ImportCancelRequest struct {
	ImgURL            string `json:"imgurl"`
	Name              string `json:"name"`
	ImageUUID         string `json:"imageuuid"`
	CancellationAPIID string `json:"cancellationApiId"`
}

// Validate checks that the request names something to cancel.
func (q *ImportCancelRequest) Validate() error {
	if q.ImageUUID == "" && q.CancellationAPIID == "" && q.Name == "" {
		return missing("imageuuid")
	}
	return nil
}

// CancelJobRequest is the body of canceljob-sync.
type CancelJobRequest struct {
	CancellationAPIID string `json:"cancellationApiId"`
}

// Validate checks the required field.
func (q *CancelJobRequest) Validate() error {
	if q.CancellationAPIID == "" {
		return missing("cancellationApiId")
	}
	return nil
}

// CancelReply answers import/cancel and canceljob-sync: the taskuuids of
// the jobs cancelled (each reports its own failure). Nothing to cancel is
// a success.
type CancelReply struct {
	Cancelled []string `json:"cancelled"`
}

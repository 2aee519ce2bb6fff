package agent

import (
	"encoding/json"
	"testing"
	"time"

	"imagestore/agent/jobs"
)

// TestJobInfoWire: job/list, job/get and job/cancel answer a job exactly as
// its record holds it, every field included.
func TestJobInfoWire(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	later := now.Add(time.Minute)
	in := jobs.Info{
		ID: "t", Kind: "import", Backup: true, State: jobs.Failed, Error: "boom", Done: 1, Total: 2,
		Created: now, Started: &now, Ended: &later, ImageUUID: "img", InstallPath: "zstore://a/b", Format: "qcow2",
		CallbackURL: "http://cb/x", Callback: jobs.CallbackStatus{Attempts: 3, Delivered: true, GivenUp: true, LastError: "e"},
		Result: json.RawMessage(`{"success":false}`),
	}
	want, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	got, err := json.Marshal(jobInfo(in))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(want) {
		t.Fatalf("wire job\n%s\nrecord\n%s", got, want)
	}
	// A field added to jobs.Info but not to api.JobInfo shows here.
	var fields map[string]any
	if err := json.Unmarshal(want, &fields); err != nil || len(fields) != 16 {
		t.Fatalf("jobs.Info has %d fields (%v); update api.JobInfo and this test", len(fields), err)
	}
}

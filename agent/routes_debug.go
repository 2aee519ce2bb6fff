package agent

import (
	"context"
	"errors"
	"net/http"
	"time"

	"imagestore/agent/api"
	"imagestore/agent/jobs"
)

// debugSleep is a diagnostic job that only waits (cancellable), for
// exercising queueing, cancellation and restart handling. It answers only
// when the config enables debug.
func (a *Agent) debugSleep(w http.ResponseWriter, r *http.Request) {
	var req api.DebugSleepRequest
	err := decode(r, &req)
	if err == nil && !a.cfg.Debug {
		err = errors.New("debug commands are disabled (set debug: true in the config)")
	}
	a.async(w, r, JobSpec{Kind: "debug-sleep", Backup: req.Backup, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		d := time.Duration(req.Millis) * time.Millisecond
		job.SetTotal(int64(req.Millis))
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			job.Add(int64(req.Millis))
			return nil, nil
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	})
}

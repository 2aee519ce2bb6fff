package agent

import (
	"context"
	"errors"
	"net/http"
	"time"

	"imagestore/agent/api"
	"imagestore/agent/jobs"
)

// Handlers that cancel the management node's jobs. Every job records the
// request's threadContext.api (its cancellationApiId) and, for imports,
// the image uuid.

// cancelWait bounds how long a cancel waits for the cancelled jobs to
// end (they stop at their next context check and clean up).
const cancelWait = time.Minute

// cancelJobs cancels the jobs match picks (never the canceller itself)
// and waits until they have ended or ctx ends.
func (a *Agent) cancelJobs(ctx context.Context, self string, match func(jobs.Info) bool) api.CancelReply {
	infos := a.jobs.CancelWhere(func(in jobs.Info) bool { return in.ID != self && match(in) })
	rep := api.CancelReply{Cancelled: []string{}}
	ctx, stop := context.WithTimeout(ctx, cancelWait)
	defer stop()
	for _, in := range infos {
		rep.Cancelled = append(rep.Cancelled, in.ID)
		a.log.Info("job cancelled", "task", in.ID, "kind", in.Kind, "api", in.API, "imageUuid", in.ImageUUID)
		if j, ok := a.jobs.Get(in.ID); ok {
			select {
			case <-j.Done():
			case <-ctx.Done():
			}
		}
	}
	return rep
}

// importCancel cancels the running import of imageuuid (an import job, or
// the upload job of an upload:// import receiving its bytes), and every
// job of the API cancellationApiId. Nothing to cancel is a success.
func (a *Agent) importCancel(w http.ResponseWriter, r *http.Request) {
	var req api.ImportCancelRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "import-cancel", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		image := req.ImageUUID
		if image == "" {
			image = req.Name
		}
		return a.cancelJobs(ctx, job.ID(), func(in jobs.Info) bool {
			return (req.CancellationAPIID != "" && in.API == req.CancellationAPIID) ||
				(image != "" && (in.Kind == "import" || in.Kind == uploadSessionKind) && in.ImageUUID == image)
		}), nil
	})
}

// cancelJob (canceljob-sync) cancels every job whose threadContext.api is
// cancellationApiId and answers once they have ended.
func (a *Agent) cancelJob(w http.ResponseWriter, r *http.Request) {
	var req api.CancelJobRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	rep := a.cancelJobs(r.Context(), "", func(in jobs.Info) bool { return in.API == req.CancellationAPIID })
	if err := r.Context().Err(); err != nil {
		replyErr(w, http.StatusOK, errors.Join(errors.New("cancel interrupted"), err))
		return
	}
	reply(w, rep)
}

// firstNonEmpty returns the first non-empty string.
func firstNonEmpty(ss ...string) string {
	for _, s := range ss {
		if s != "" {
			return s
		}
	}
	return ""
}

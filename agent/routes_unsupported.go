package agent

import (
	"errors"
	"net/http"

	"imagestore/agent/api"
)

// notSupported answers a path imagestore does not implement the way the
// management node reads failures: success:false with "<path> is not
// supported by imagestore", through the callback for an async path and
// inline for a sync one, never a 404. The body is still read, so a
// malformed one is reported too.
func notSupported(path string) HandlerFunc {
	return func(a *Agent, w http.ResponseWriter, r *http.Request) {
		var body map[string]any
		err := decode(r, &body)
		if err == nil {
			err = errors.New(api.NotSupported(path))
		}
		br := a.routes[routeKey(path)]
		if br != nil && br.Mode == Sync {
			replyErr(w, http.StatusOK, err)
			return
		}
		a.async(w, r, JobSpec{Kind: "unsupported", Err: err}, nil)
	}
}

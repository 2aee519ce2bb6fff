package agent

import (
	"context"
	"fmt"
	"net/http"
)

// Paths of the protocol that later features implement. Each answers
// success:false naming the missing capability (never a fake success); a
// feature file registering the same path replaces the placeholder.
func init() {
	for _, p := range []struct{ path, capability string }{
		{"/imagestore/exportnbdimage/", "NBD backup targets (exportnbdimage)"},
		{"/imagestore/exportnbdimage/cancel/", "NBD backup targets (exportnbdimage/cancel)"},
		{"/imagestore/export/remotetarget/", "NBD remote targets (export/remotetarget)"},
		{"/imagestore/remotetarget/delete/", "NBD remote targets (remotetarget/delete)"},
		{"/imagestore/import/", "import from URLs (import)"},
	} {
		addRoutes(Route{Path: p.path, Mode: Async, Placeholder: true, Handler: notImplemented(p.capability)})
	}
}

// notImplemented fails the request (and its callback) with a clear error.
func notImplemented(capability string) HandlerFunc {
	return func(a *Agent, w http.ResponseWriter, r *http.Request) {
		err := fmt.Errorf("not implemented: this agent does not support %s yet", capability)
		a.async(w, r, JobSpec{Kind: "unsupported", Err: err}, func(context.Context, *Job) (any, error) { return nil, err })
	}
}

package agent

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"imagestore/agent/api"
	"imagestore/agent/config"
	"imagestore/agent/exports"
	"imagestore/agent/jobs"
	"imagestore/internal/redact"
)

// Mode says how a route answers.
type Mode int

const (
	// Sync routes answer inline.
	Sync Mode = iota
	// Async routes need the taskuuid header, answer at once and POST the
	// result to callbackurl. Each also gets a "-sync" twin answering inline.
	Async
)

// HandlerFunc serves one protocol path.
type HandlerFunc func(a *Agent, w http.ResponseWriter, r *http.Request)

// Route is one /imagestore/* path; routeTable (routes.go) lists them all.
type Route struct {
	Path    string // e.g. "/imagestore/import-backup/"; the trailing slash is optional on requests
	Mode    Mode
	Handler HandlerFunc
	// Methods allowed; default POST (and PUT, which some clients use).
	Methods []string
	// BodyLimit, when set, gives the largest request body this path takes
	// (default: the maxBodyBytes setting). gc's keep list needs more.
	BodyLimit func(config.Config) int64
}

type ctxKey string

const (
	ctxSyncMode = ctxKey("sync")
	ctxRoute    = ctxKey("route")
	ctxMeta     = ctxKey("meta")
)

// reqMeta is what decode learns about a request besides its type: the
// management node's API id (threadContext.api), recorded on the job so
// canceljob-sync and import/cancel can find it.
type reqMeta struct{ api string }

// threadContext is the part of every management-node command body the
// agent records.
type threadContext struct {
	ThreadContext struct {
		API string `json:"api"`
	} `json:"threadContext"`
}

// routeKey normalises a path for lookup: no trailing slash.
func routeKey(p string) string { return strings.TrimRight(p, "/") }

type boundRoute struct {
	Route
	pattern string // label for metrics
	sync    bool   // the -sync twin of an async route
}

func buildRoutes(table []Route) (map[string]*boundRoute, error) {
	out := map[string]*boundRoute{}
	add := func(key string, br *boundRoute) error {
		if _, ok := out[key]; ok {
			return fmt.Errorf("route %s registered twice", key)
		}
		out[key] = br
		return nil
	}
	for _, r := range table {
		if err := add(routeKey(r.Path), &boundRoute{Route: r, pattern: r.Path}); err != nil {
			return nil, err
		}
		if r.Mode == Async {
			twin := api.SyncPath(r.Path)
			if err := add(routeKey(twin), &boundRoute{Route: r, pattern: twin, sync: true}); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// replyBody merges success/error into v's JSON object.
func replyBody(v any, err error) []byte {
	fields := map[string]json.RawMessage{}
	if v != nil {
		b, merr := json.Marshal(v)
		if merr == nil {
			merr = json.Unmarshal(b, &fields)
		}
		if merr != nil && err == nil {
			err = fmt.Errorf("encoding reply: %w", merr)
		}
	}
	fields["success"] = json.RawMessage(strconv.FormatBool(err == nil))
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	e, _ := json.Marshal(msg)
	fields["error"] = e
	b, _ := json.Marshal(fields)
	return b
}

// reply writes v (a struct or nil) with success:true.
func reply(w http.ResponseWriter, v any) { writeJSON(w, http.StatusOK, replyBody(v, nil)) }

// replyErr writes {success:false,error} with status.
func replyErr(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, replyBody(nil, err))
}

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

// validator is implemented by api request types with required fields.
type validator interface{ Validate() error }

// ErrTooLarge is returned when a request body exceeds maxBodyBytes.
var ErrTooLarge = errors.New("request body too large")

// decode reads the JSON body into v (an empty body is {}) and validates it.
func decode(r *http.Request, v any) error {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return fmt.Errorf("%w: more than %d bytes", ErrTooLarge, mbe.Limit)
		}
		return fmt.Errorf("reading request body: %w", err)
	}
	if len(strings.TrimSpace(string(b))) > 0 {
		if err := json.Unmarshal(b, v); err != nil {
			return fmt.Errorf("bad JSON in request body: %w", api.FieldError(err))
		}
		if m, ok := r.Context().Value(ctxMeta).(*reqMeta); ok {
			var tc threadContext
			if json.Unmarshal(b, &tc) == nil {
				m.api = tc.ThreadContext.API
			}
		}
	}
	if vv, ok := v.(validator); ok {
		return vv.Validate()
	}
	return nil
}

// missing builds the error for an absent required field.
func missing(field string) error { return fmt.Errorf("missing field %s", field) }

// JobFunc is the body of an async request; its result is merged with
// success/error and sent to the callback.
type JobFunc func(ctx context.Context, job *jobs.Job) (any, error)

// JobSpec describes an async request.
type JobSpec struct {
	Kind string
	// Backup jobs share the parallelismDegree slots and queue FIFO beyond them.
	Backup bool
	// Err, when set, fails the request at once (e.g. bad JSON): through
	// the callback (or inline for a -sync twin), so the management node is
	// never left waiting.
	Err error
	// ImageUUID names the image the job is for, when the request says it
	// (import/cancel matches it).
	ImageUUID string
}

// async runs fn as a job: for an async route it answers 200 at once and
// POSTs the result to callbackurl; for a -sync route it answers inline.
func (a *Agent) async(w http.ResponseWriter, r *http.Request, spec JobSpec, fn JobFunc) {
	syncMode, _ := r.Context().Value(ctxSyncMode).(bool)
	id := r.Header.Get("taskuuid")
	cb := r.Header.Get("callbackurl")
	if id == "" {
		if !syncMode {
			replyErr(w, http.StatusBadRequest, errors.New("missing header taskuuid (required by async commands)"))
			return
		}
		id = "sync-" + randomHex(16)
	}
	if syncMode {
		cb = ""
	}
	if cb != "" {
		if u, err := url.Parse(cb); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			replyErr(w, http.StatusBadRequest, fmt.Errorf("header callbackurl %q is not an http(s) URL", redact.URL(cb)))
			return
		}
	}
	if spec.Err != nil {
		spec.Backup = false
		err := spec.Err
		fn = func(context.Context, *jobs.Job) (any, error) { return nil, err }
	}
	run := func(ctx context.Context, job *jobs.Job) ([]byte, error) {
		v, err := fn(ctx, job)
		if err != nil {
			return nil, err
		}
		return replyBody(v, nil), nil
	}
	var apiID string
	if m, ok := r.Context().Value(ctxMeta).(*reqMeta); ok {
		apiID = m.api
	}
	job, started, err := a.jobs.Submit(jobs.Spec{
		ID: id, Kind: spec.Kind, Backup: spec.Backup, CallbackURL: cb, API: apiID, ImageUUID: spec.ImageUUID,
	}, run)
	if err != nil {
		// Only at shutdown: no job, so no callback will come; the
		// management node treats a non-200 answer as the failure.
		replyErr(w, http.StatusServiceUnavailable, err)
		return
	}
	if !started {
		a.log.Info("duplicate taskuuid, not starting a second job", "task", id, "kind", spec.Kind)
	}
	if syncMode {
		select {
		case <-job.Done():
		case <-r.Context().Done():
			_, _ = a.jobs.Cancel(id)
			<-job.Done()
		}
		writeJSON(w, http.StatusOK, job.Info().Result)
		return
	}
	// The immediate answer is exactly 200 whatever the outcome: the
	// management node treats any other status as a failure of its own and
	// ignores the body; the result (a validation failure included) comes
	// through the callback.
	reply(w, nil)
}

// statusRecorder captures the status code for metrics.
type statusRecorder struct {
	http.ResponseWriter
	code int
	n    int64
}

func (s *statusRecorder) WriteHeader(c int) {
	if s.code == 0 {
		s.code = c
	}
	s.ResponseWriter.WriteHeader(c)
}

// Unwrap lets http.ResponseController reach the connection (read
// deadlines of upload chunks, flushes).
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	n, err := s.ResponseWriter.Write(b)
	s.n += int64(n)
	return n, err
}

// Handler returns the management-port handler: /imagestore/*, /export/,
// /health and /metrics.
func (a *Agent) Handler() http.Handler { return http.HandlerFunc(a.serveHTTP) }

func (a *Agent) serveHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &statusRecorder{ResponseWriter: w}
	pattern := a.dispatch(rec, r)
	code := rec.code
	if code == 0 {
		code = http.StatusOK
	}
	a.m.httpRequests.WithLabelValues(pattern, strconv.Itoa(code)).Inc()
	a.m.httpDuration.WithLabelValues(pattern).Observe(time.Since(start).Seconds())
}

// dispatch serves r and returns the route pattern for metrics (a bounded set).
func (a *Agent) dispatch(w http.ResponseWriter, r *http.Request) string {
	if r.URL.Path == api.PathHealth {
		a.health(w, r)
		return api.PathHealth
	}
	if strings.HasPrefix(r.URL.Path, exports.URLPrefix) {
		// An export URL is a capability: its 128-bit random token is the
		// credential, so the management node can hand it to whoever
		// downloads (qemu-img, a browser, curl), which cannot send our
		// bearer token. delexp or exportExpiry revokes it.
		a.serveExport(w, r)
		return exports.URLPrefix + "{file}"
	}
	if strings.HasPrefix(r.URL.Path, api.PathUpload) && len(r.URL.Path) > len(api.PathUpload) {
		// An upload URL is a capability too (see serveUploadSession).
		a.serveUploadSession(w, r)
		return api.PathUpload + "{imageUuid}/{session}"
	}
	if !a.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="imagestore"`)
		replyErr(w, http.StatusUnauthorized, errors.New("missing or wrong bearer token (send Authorization: Bearer <token>)"))
		return "unauthorized"
	}
	switch {
	case r.URL.Path == api.PathMetrics:
		promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}).ServeHTTP(w, r)
		return api.PathMetrics
	}
	br, ok := a.routes[routeKey(r.URL.Path)]
	if !ok {
		replyErr(w, http.StatusNotFound, fmt.Errorf("unknown path %s", r.URL.Path))
		return "unmatched"
	}
	methods := br.Methods
	if len(methods) == 0 {
		methods = []string{http.MethodPost, http.MethodPut}
	}
	allowed := false
	for _, m := range methods {
		allowed = allowed || r.Method == m
	}
	if !allowed {
		w.Header().Set("Allow", strings.Join(methods, ", "))
		replyErr(w, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed on %s (use %s)", r.Method, br.pattern, strings.Join(methods, " or ")))
		return br.pattern
	}
	limit := a.cfg.MaxBodyBytes
	if br.BodyLimit != nil {
		limit = br.BodyLimit(a.cfg)
	}
	if r.ContentLength > limit {
		// Not read at all; the handler's decode reports it like any bad
		// request (inline for sync paths, through the callback for async).
		r.Body = tooLargeBody{err: fmt.Errorf("%w: %d bytes, at most %d allowed", ErrTooLarge, r.ContentLength, limit)}
	} else {
		r.Body = http.MaxBytesReader(w, r.Body, limit)
	}
	ctx := context.WithValue(r.Context(), ctxSyncMode, br.sync)
	ctx = context.WithValue(ctx, ctxRoute, br.pattern)
	ctx = context.WithValue(ctx, ctxMeta, &reqMeta{})
	br.Handler(a, w, r.WithContext(ctx))
	return br.pattern
}

// replyDecodeErr answers a decode failure of a sync route: status 200
// with success:false, as every business error of a sync path (the
// management node retries any other status and then reports only the
// status code).
func replyDecodeErr(w http.ResponseWriter, err error) {
	replyErr(w, http.StatusOK, err)
}

// tooLargeBody stands for a body whose declared length is over the limit.
type tooLargeBody struct{ err error }

func (b tooLargeBody) Read([]byte) (int, error) { return 0, b.err }
func (b tooLargeBody) Close() error             { return nil }

func (a *Agent) authorized(r *http.Request) bool {
	if a.cfg.Token == "" {
		return true
	}
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(a.cfg.Token)) == 1
}

func (a *Agent) health(w http.ResponseWriter, _ *http.Request) {
	if _, err := a.store.Capacity(); err != nil {
		replyErr(w, http.StatusServiceUnavailable, fmt.Errorf("store: %w", err))
		return
	}
	if reasons := a.missingTools(); len(reasons) > 0 {
		reply(w, api.HealthReply{Status: "degraded", Reasons: reasons})
		return
	}
	reply(w, api.HealthReply{Status: "ok"})
}

// missingTools names the external programs the agent needs and cannot
// find (NBD targets, restores and remote targets run qemu-img and
// qemu-nbd), and an NBD service that failed to start for that reason.
func (a *Agent) missingTools() []string {
	var out []string
	for _, tool := range []string{"qemu-img", "qemu-nbd"} {
		if _, err := exec.LookPath(tool); err != nil {
			out = append(out, fmt.Sprintf("%s not found (%v): NBD backups, exports and restores fail; install qemu-utils", tool, err))
		}
	}
	if err := a.nbd.Err(); err != nil && errors.Is(err, exec.ErrNotFound) {
		out = append(out, fmt.Sprintf("NBD unavailable until the agent restarts: %v", err))
	}
	return out
}

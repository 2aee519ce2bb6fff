package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"imagestore/internal/testwait"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// testOptions are the agent's default job settings over dir.
func testOptions(dir string) Options {
	return Options{
		Dir: dir, Parallelism: 10, CallbackRetries: 6, CallbackMaxDelay: 30 * time.Second,
		CallbackTimeout: 30 * time.Second, Metrics: NewMetrics(), Logger: slog.New(slog.DiscardHandler),
	}
}

// okBody is the reply body of a job that succeeded with fields v.
func okBody(v map[string]any) []byte {
	out := map[string]any{"success": true, "error": ""}
	for k, x := range v {
		out[k] = x
	}
	b, _ := json.Marshal(out)
	return b
}

// newTestJobs builds a job manager over dir (a fresh one if ""), shut down
// at the end of the test.
func newTestJobs(t *testing.T, dir string, mod func(*Options)) (*Manager, *Metrics) {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	opts := testOptions(dir)
	opts.CallbackTimeout = 10 * time.Second
	if mod != nil {
		mod(&opts)
	}
	jm, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), testwait.Deadline)
		defer cancel()
		if err := jm.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return jm, opts.Metrics
}

// gate is a job body that reports its start and runs until released or cancelled.
type gate struct {
	started chan string
	mu      sync.Mutex
	release map[string]chan struct{}
}

func newGate() *gate {
	return &gate{started: make(chan string, 64), release: map[string]chan struct{}{}}
}

func (g *gate) ch(id string) chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	c, ok := g.release[id]
	if !ok {
		c = make(chan struct{})
		g.release[id] = c
	}
	return c
}

func (g *gate) open(id string) { close(g.ch(id)) }

func (g *gate) fn(ctx context.Context, j *Job) ([]byte, error) {
	g.started <- j.ID()
	select {
	case <-g.ch(j.ID()):
		return okBody(map[string]any{"id": j.ID()}), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (g *gate) next(t *testing.T) string {
	t.Helper()
	select {
	case id := <-g.started:
		return id
	case <-time.After(testwait.Deadline):
		t.Fatal("no job started")
		return ""
	}
}

func (g *gate) none(t *testing.T) {
	t.Helper()
	select {
	case id := <-g.started:
		t.Fatalf("job %s started while it should wait", id)
	default:
	}
}

func mustSubmit(t *testing.T, jm *Manager, id string, backup bool, cb string, fn RunFunc) *Job {
	t.Helper()
	j, started, err := jm.Submit(Spec{ID: id, Kind: "test", Backup: backup, CallbackURL: cb}, fn)
	if err != nil || !started {
		t.Fatalf("submit %s: started=%v err=%v", id, started, err)
	}
	return j
}

func waitDone(t *testing.T, j *Job) Info {
	t.Helper()
	select {
	case <-j.Done():
	case <-time.After(testwait.Deadline):
		t.Fatalf("job %s did not finish", j.ID())
	}
	return j.Info()
}

func TestJobsFIFOParallelism(t *testing.T) {
	jm, m := newTestJobs(t, "", func(o *Options) { o.Parallelism = 2 })
	g := newGate()
	ids := []string{"b0", "b1", "b2", "b3", "b4"}
	jobs := map[string]*Job{}
	for _, id := range ids {
		jobs[id] = mustSubmit(t, jm, id, true, "", g.fn)
	}
	first := map[string]bool{g.next(t): true, g.next(t): true}
	if !first["b0"] || !first["b1"] {
		t.Fatalf("first two to start: %v, want b0 and b1", first)
	}
	for _, id := range ids[2:] {
		if s := jobs[id].Info().State; s != Waiting {
			t.Fatalf("%s is %s, want waiting", id, s)
		}
	}
	for _, id := range ids[:2] {
		if s := jobs[id].Info().State; s != Running {
			t.Fatalf("%s is %s, want running", id, s)
		}
	}
	g.none(t)

	// A non-backup job does not queue behind backups.
	other := mustSubmit(t, jm, "other", false, "", g.fn)
	if id := g.next(t); id != "other" {
		t.Fatalf("started %s, want the non-backup job", id)
	}
	g.open("other")
	waitDone(t, other)
	if got := testutil.ToFloat64(m.Active.WithLabelValues("test", string(Waiting))); got != 3 {
		t.Fatalf("waiting gauge %v, want 3", got)
	}

	// Each freed slot goes to the oldest waiting job.
	for _, step := range []struct{ finish, want string }{{"b1", "b2"}, {"b0", "b3"}, {"b2", "b4"}} {
		g.open(step.finish)
		if in := waitDone(t, jobs[step.finish]); in.State != Succeeded {
			t.Fatalf("%s: %+v", step.finish, in)
		}
		if id := g.next(t); id != step.want {
			t.Fatalf("after %s finished, %s started; want %s", step.finish, id, step.want)
		}
		g.none(t)
	}
	g.open("b3")
	g.open("b4")
	for _, id := range ids {
		in := waitDone(t, jobs[id])
		if in.State != Succeeded || in.Started == nil || in.Ended == nil || in.Error != "" {
			t.Fatalf("%s: %+v", id, in)
		}
	}
	if got := testutil.ToFloat64(m.BackupPeak); got != 2 {
		t.Fatalf("backup peak %v, want 2", got)
	}
	for _, st := range []State{Waiting, Running} {
		if got := testutil.ToFloat64(m.Active.WithLabelValues("test", string(st))); got != 0 {
			t.Fatalf("%s gauge %v after all finished", st, got)
		}
	}
	if got := testutil.ToFloat64(m.Finished.WithLabelValues("test", string(Succeeded))); got != 6 {
		t.Fatalf("succeeded counter %v, want 6", got)
	}
}

// TestJobStates drives a job into each end state on one manager and checks
// its info, record and metrics. One function: a table whose counters
// accumulate over the cases in order.
func TestJobStates(t *testing.T) {
	boom := errors.New("disk on fire")
	for _, tc := range []struct {
		name    string
		backup  bool
		act     func(t *testing.T, jm *Manager, g *gate, id string)
		want    State
		wantErr string
		ran     bool
	}{
		{"succeeds", true, func(t *testing.T, jm *Manager, g *gate, id string) { g.next(t); g.open(id) }, Succeeded, "", true},
		{"cancel running", false, func(t *testing.T, jm *Manager, g *gate, id string) {
			g.next(t)
			if in, err := jm.Cancel(id); err != nil || in.State != Running {
				t.Fatalf("cancel: %+v %v", in, err)
			}
		}, Cancelled, "cancelled by request", true},
		{"cancel waiting", true, func(t *testing.T, jm *Manager, g *gate, id string) {
			if in, err := jm.Cancel(id); err != nil || in.State != Waiting {
				t.Fatalf("cancel: %+v %v", in, err)
			}
		}, Cancelled, "cancelled by request", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			jm, m := newTestJobs(t, "", func(o *Options) { o.Parallelism = 1 })
			g := newGate()
			var blocker *Job
			if tc.name == "cancel waiting" {
				blocker = mustSubmit(t, jm, "blocker", true, "", g.fn)
				if id := g.next(t); id != "blocker" {
					t.Fatal(id)
				}
			}
			j := mustSubmit(t, jm, "job", tc.backup, "", g.fn)
			tc.act(t, jm, g, "job")
			in := waitDone(t, j)
			if in.State != tc.want || !strings.Contains(in.Error, tc.wantErr) || (tc.wantErr == "" && in.Error != "") {
				t.Fatalf("state %s error %q, want %s %q", in.State, in.Error, tc.want, tc.wantErr)
			}
			if (in.Started != nil) != tc.ran {
				t.Fatalf("started=%v, want ran=%v", in.Started, tc.ran)
			}
			var res map[string]any
			if err := json.Unmarshal(in.Result, &res); err != nil {
				t.Fatalf("result %s: %v", in.Result, err)
			}
			if res["success"] != (tc.want == Succeeded) {
				t.Fatalf("result %s for state %s", in.Result, in.State)
			}
			if _, err := jm.Cancel("job"); err == nil || !strings.Contains(err.Error(), "already "+string(tc.want)) {
				t.Fatalf("cancelling a finished job: %v", err)
			}
			if blocker != nil {
				g.open("blocker")
				waitDone(t, blocker)
				g.none(t) // the cancelled job never ran
			}
			if got := testutil.ToFloat64(m.Finished.WithLabelValues("test", string(tc.want))); got != 1 {
				t.Fatalf("jobs_total{%s} = %v", tc.want, got)
			}
			for _, st := range []State{Waiting, Running} {
				if got := testutil.ToFloat64(m.Active.WithLabelValues("test", string(st))); got != 0 {
					t.Fatalf("%s gauge %v after the job finished", st, got)
				}
			}
			// The record on disk matches.
			b, err := os.ReadFile(jm.path("job"))
			if err != nil {
				t.Fatal(err)
			}
			var disk Info
			if err := json.Unmarshal(b, &disk); err != nil || disk.State != tc.want {
				t.Fatalf("persisted %s: %v", b, err)
			}
		})
	}

	t.Run("fails", func(t *testing.T) {
		jm, _ := newTestJobs(t, "", nil)
		j := mustSubmit(t, jm, "f", true, "", func(context.Context, *Job) ([]byte, error) { return nil, boom })
		in := waitDone(t, j)
		if in.State != Failed || in.Error != boom.Error() || !strings.Contains(string(in.Result), `"success":false`) {
			t.Fatalf("%+v %s", in, in.Result)
		}
	})
	t.Run("cancel unknown", func(t *testing.T) {
		jm, _ := newTestJobs(t, "", nil)
		if _, err := jm.Cancel("nope"); err == nil || !strings.Contains(err.Error(), `no job with taskuuid "nope"`) {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestJobsDuplicateTaskUUID(t *testing.T) {
	var mu sync.Mutex
	hits := map[string]int{}
	cb := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hits[r.Header.Get("taskuuid")]++
		mu.Unlock()
	}))
	defer cb.Close()
	jm, _ := newTestJobs(t, "", func(o *Options) { o.CallbackMaxDelay = time.Millisecond })
	g := newGate()
	j := mustSubmit(t, jm, "dup", true, cb.URL, g.fn)
	g.next(t)
	var second int
	mu2 := sync.Mutex{}
	other := func(context.Context, *Job) ([]byte, error) {
		mu2.Lock()
		second++
		mu2.Unlock()
		return nil, nil
	}
	j2, started, err := jm.Submit(Spec{ID: "dup", Kind: "test", Backup: true, CallbackURL: cb.URL}, other)
	if err != nil || started || j2 != j {
		t.Fatalf("duplicate while running: started=%v same=%v err=%v", started, j2 == j, err)
	}
	g.open("dup")
	waitDone(t, j)
	testwait.For(t, "first callback", func() bool { return j.Info().Callback.Delivered })
	// A retried request for a finished job re-sends its result, runs nothing.
	j3, started, err := jm.Submit(Spec{ID: "dup", Kind: "test", Backup: true, CallbackURL: cb.URL}, other)
	if err != nil || started || j3 != j {
		t.Fatalf("duplicate after finish: started=%v same=%v err=%v", started, j3 == j, err)
	}
	testwait.For(t, "second callback", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return hits["dup"] == 2
	})
	mu2.Lock()
	defer mu2.Unlock()
	if second != 0 {
		t.Fatalf("duplicate taskuuid ran a second job body %d times", second)
	}
	g.none(t)
}

func TestJobsLoadInterrupted(t *testing.T) {
	var mu sync.Mutex
	got := map[string][]byte{}
	cb := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		got[r.Header.Get("taskuuid")] = b
		mu.Unlock()
	}))
	defer cb.Close()

	dir := t.TempDir()
	paths := &Manager{dir: dir}
	now := time.Now().Add(-time.Minute)
	write := func(in Info) {
		b, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(paths.path(in.ID), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(Info{ID: "was-running", Kind: "importbackup", State: Running, Created: now, Started: &now, CallbackURL: cb.URL})
	write(Info{ID: "was-waiting", Kind: "importbackup", State: Waiting, Created: now})
	done := Info{ID: "was-done", Kind: "ping", State: Succeeded, Created: now, Ended: &now,
		Result: json.RawMessage(`{"success":true,"error":""}`), Callback: CallbackStatus{Attempts: 1, Delivered: true}}
	write(done)
	if err := os.WriteFile(filepath.Join(dir, "garbage.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}

	jm, _ := newTestJobs(t, dir, func(o *Options) { o.CallbackMaxDelay = time.Millisecond })
	for _, tc := range []struct {
		id    string
		state State
		err   string
	}{
		{"was-running", Failed, ReasonInterrupted},
		{"was-waiting", Failed, ReasonInterrupted},
		{"was-done", Succeeded, ""},
	} {
		j, ok := jm.Get(tc.id)
		if !ok {
			t.Fatalf("%s not loaded", tc.id)
		}
		in := j.Info()
		if in.State != tc.state || in.Error != tc.err {
			t.Fatalf("%s: state %s error %q, want %s %q", tc.id, in.State, in.Error, tc.state, tc.err)
		}
		select {
		case <-j.Done():
		default:
			t.Fatalf("%s: loaded job not done", tc.id)
		}
		b, err := os.ReadFile(jm.path(tc.id))
		if err != nil {
			t.Fatal(err)
		}
		var disk Info
		if err := json.Unmarshal(b, &disk); err != nil || disk.State != tc.state || disk.Error != tc.err {
			t.Fatalf("%s on disk: %s", tc.id, b)
		}
	}
	if n := len(jm.List()); n != 3 {
		t.Fatalf("%d jobs loaded, want 3 (garbage ignored)", n)
	}
	// The undelivered result of the interrupted job goes to its callback.
	jm.ResumeCallbacks()
	testwait.For(t, "callback of the interrupted job", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return got["was-running"] != nil
	})
	mu.Lock()
	var res map[string]any
	err := json.Unmarshal(got["was-running"], &res)
	mu.Unlock()
	if err != nil || res["success"] != false || res["error"] != ReasonInterrupted {
		t.Fatalf("callback body %v %v", res, err)
	}
}

func TestJobsShutdownThenRestart(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	hits := 0
	cb := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hits++
		mu.Unlock()
	}))
	defer cb.Close()
	cfg := func(o *Options) { o.CallbackMaxDelay = time.Millisecond }
	opts := testOptions(dir)
	cfg(&opts)
	jm, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	g := newGate()
	j := mustSubmit(t, jm, "long", true, cb.URL, g.fn)
	g.next(t)
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Deadline)
	defer cancel()
	if err := jm.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if in := j.Info(); in.State != Failed || in.Error != ReasonInterrupted {
		t.Fatalf("after shutdown: %+v", in)
	}
	mu.Lock()
	if hits != 0 {
		t.Fatalf("callback sent during shutdown (%d)", hits)
	}
	mu.Unlock()
	if _, _, err := jm.Submit(Spec{ID: "late", Kind: "test", Backup: false, CallbackURL: ""}, g.fn); err == nil {
		t.Fatal("submit after shutdown accepted")
	}

	jm2, _ := newTestJobs(t, dir, cfg)
	jm2.ResumeCallbacks()
	testwait.For(t, "callback after restart", func() bool {
		j, ok := jm2.Get("long")
		return ok && j.Info().Callback.Delivered
	})
	mu.Lock()
	defer mu.Unlock()
	if hits != 1 {
		t.Fatalf("callback hits %d, want 1", hits)
	}
}

func TestJobsPrune(t *testing.T) {
	failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	defer failing.Close()
	// Callbacks keep retrying (long delay) so one stays undelivered.
	jm, _ := newTestJobs(t, "", func(o *Options) { o.CallbackRetries = 100; o.CallbackMaxDelay = time.Hour })
	g := newGate()
	quick := func(context.Context, *Job) ([]byte, error) { return nil, nil }
	done := mustSubmit(t, jm, "done", false, "", quick)
	pending := mustSubmit(t, jm, "pending-callback", false, failing.URL, quick)
	running := mustSubmit(t, jm, "running", false, "", g.fn)
	g.next(t)
	waitDone(t, done)
	waitDone(t, pending)
	testwait.For(t, "first callback attempt", func() bool { return pending.Info().Callback.Attempts >= 1 })

	if n := jm.Prune(time.Now().Add(-time.Hour)); n != 0 {
		t.Fatalf("pruned %d jobs younger than the retention", n)
	}
	if n := jm.Prune(time.Now().Add(time.Hour)); n != 1 {
		t.Fatalf("pruned %d, want 1 (only the settled finished job)", n)
	}
	if _, ok := jm.Get("done"); ok {
		t.Fatal("pruned job still listed")
	}
	if _, err := os.Stat(jm.path("done")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pruned job record still on disk: %v", err)
	}
	for _, id := range []string{"pending-callback", "running"} {
		if _, ok := jm.Get(id); !ok {
			t.Fatalf("%s pruned", id)
		}
		if _, err := os.Stat(jm.path(id)); err != nil {
			t.Fatalf("%s record: %v", id, err)
		}
	}
	g.open("running")
	waitDone(t, running)
}

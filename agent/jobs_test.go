package agent

import (
	"context"
	"encoding/json"
	"errors"
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

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const jtWait = 30 * time.Second

// jtWaitFor polls cond until it holds or a generous deadline passes.
func jtWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(jtWait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// newTestJobs builds a job manager over dir (a fresh one if ""), shut down
// at the end of the test.
func newTestJobs(t *testing.T, dir string, mod func(*Config)) (*jobManager, *metrics) {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	cfg := DefaultConfig()
	cfg.CallbackTimeout = 10 * time.Second
	if mod != nil {
		mod(&cfg)
	}
	m := newMetrics(prometheus.NewRegistry(), func() (storeStats, bool) { return storeStats{}, false })
	jm, err := newJobManager(dir, cfg, slog.New(slog.DiscardHandler), m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), jtWait)
		defer cancel()
		if err := jm.shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return jm, m
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
		return replyBody(map[string]string{"id": j.ID()}, nil), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (g *gate) next(t *testing.T) string {
	t.Helper()
	select {
	case id := <-g.started:
		return id
	case <-time.After(jtWait):
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

func mustSubmit(t *testing.T, jm *jobManager, id string, backup bool, cb string, fn jobRunFunc) *Job {
	t.Helper()
	j, started, err := jm.submit(id, "test", backup, cb, fn)
	if err != nil || !started {
		t.Fatalf("submit %s: started=%v err=%v", id, started, err)
	}
	return j
}

func waitDone(t *testing.T, j *Job) JobInfo {
	t.Helper()
	select {
	case <-j.Done():
	case <-time.After(jtWait):
		t.Fatalf("job %s did not finish", j.ID())
	}
	return j.Info()
}

func TestJobsFIFOParallelism(t *testing.T) {
	jm, m := newTestJobs(t, "", func(c *Config) { c.ParallelismDegree = 2 })
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
		if s := jobs[id].Info().State; s != JobWaiting {
			t.Fatalf("%s is %s, want waiting", id, s)
		}
	}
	for _, id := range ids[:2] {
		if s := jobs[id].Info().State; s != JobRunning {
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
	if got := testutil.ToFloat64(m.jobsActive.WithLabelValues("test", string(JobWaiting))); got != 3 {
		t.Fatalf("waiting gauge %v, want 3", got)
	}

	// Each freed slot goes to the oldest waiting job.
	for _, step := range []struct{ finish, want string }{{"b1", "b2"}, {"b0", "b3"}, {"b2", "b4"}} {
		g.open(step.finish)
		if in := waitDone(t, jobs[step.finish]); in.State != JobSucceeded {
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
		if in.State != JobSucceeded || in.Started == nil || in.Ended == nil || in.Error != "" {
			t.Fatalf("%s: %+v", id, in)
		}
	}
	if got := testutil.ToFloat64(m.backupPeak); got != 2 {
		t.Fatalf("backup peak %v, want 2", got)
	}
	for _, st := range []JobState{JobWaiting, JobRunning} {
		if got := testutil.ToFloat64(m.jobsActive.WithLabelValues("test", string(st))); got != 0 {
			t.Fatalf("%s gauge %v after all finished", st, got)
		}
	}
	if got := testutil.ToFloat64(m.jobs.WithLabelValues("test", string(JobSucceeded))); got != 6 {
		t.Fatalf("succeeded counter %v, want 6", got)
	}
}

func TestJobStates(t *testing.T) {
	boom := errors.New("disk on fire")
	for _, tc := range []struct {
		name    string
		backup  bool
		act     func(t *testing.T, jm *jobManager, g *gate, id string)
		want    JobState
		wantErr string
		ran     bool
	}{
		{"succeeds", true, func(t *testing.T, jm *jobManager, g *gate, id string) { g.next(t); g.open(id) }, JobSucceeded, "", true},
		{"cancel running", false, func(t *testing.T, jm *jobManager, g *gate, id string) {
			g.next(t)
			if in, err := jm.cancelJob(id); err != nil || in.State != JobRunning {
				t.Fatalf("cancel: %+v %v", in, err)
			}
		}, JobCancelled, "cancelled by request", true},
		{"cancel waiting", true, func(t *testing.T, jm *jobManager, g *gate, id string) {
			if in, err := jm.cancelJob(id); err != nil || in.State != JobWaiting {
				t.Fatalf("cancel: %+v %v", in, err)
			}
		}, JobCancelled, "cancelled by request", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			jm, m := newTestJobs(t, "", func(c *Config) { c.ParallelismDegree = 1 })
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
			if res["success"] != (tc.want == JobSucceeded) {
				t.Fatalf("result %s for state %s", in.Result, in.State)
			}
			if _, err := jm.cancelJob("job"); err == nil || !strings.Contains(err.Error(), "already "+string(tc.want)) {
				t.Fatalf("cancelling a finished job: %v", err)
			}
			if blocker != nil {
				g.open("blocker")
				waitDone(t, blocker)
				g.none(t) // the cancelled job never ran
			}
			if got := testutil.ToFloat64(m.jobs.WithLabelValues("test", string(tc.want))); got != 1 {
				t.Fatalf("jobs_total{%s} = %v", tc.want, got)
			}
			for _, st := range []JobState{JobWaiting, JobRunning} {
				if got := testutil.ToFloat64(m.jobsActive.WithLabelValues("test", string(st))); got != 0 {
					t.Fatalf("%s gauge %v after the job finished", st, got)
				}
			}
			// The record on disk matches.
			b, err := os.ReadFile(jm.path("job"))
			if err != nil {
				t.Fatal(err)
			}
			var disk JobInfo
			if err := json.Unmarshal(b, &disk); err != nil || disk.State != tc.want {
				t.Fatalf("persisted %s: %v", b, err)
			}
		})
	}

	t.Run("fails", func(t *testing.T) {
		jm, _ := newTestJobs(t, "", nil)
		j := mustSubmit(t, jm, "f", true, "", func(context.Context, *Job) ([]byte, error) { return nil, boom })
		in := waitDone(t, j)
		if in.State != JobFailed || in.Error != boom.Error() || !strings.Contains(string(in.Result), `"success":false`) {
			t.Fatalf("%+v %s", in, in.Result)
		}
	})
	t.Run("cancel unknown", func(t *testing.T) {
		jm, _ := newTestJobs(t, "", nil)
		if _, err := jm.cancelJob("nope"); err == nil || !strings.Contains(err.Error(), `no job with taskuuid "nope"`) {
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
	jm, _ := newTestJobs(t, "", func(c *Config) { c.CallbackMaxDelay = time.Millisecond })
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
	j2, started, err := jm.submit("dup", "test", true, cb.URL, other)
	if err != nil || started || j2 != j {
		t.Fatalf("duplicate while running: started=%v same=%v err=%v", started, j2 == j, err)
	}
	g.open("dup")
	waitDone(t, j)
	jtWaitFor(t, "first callback", func() bool { return j.Info().Callback.Delivered })
	// A retried request for a finished job re-sends its result, runs nothing.
	j3, started, err := jm.submit("dup", "test", true, cb.URL, other)
	if err != nil || started || j3 != j {
		t.Fatalf("duplicate after finish: started=%v same=%v err=%v", started, j3 == j, err)
	}
	jtWaitFor(t, "second callback", func() bool {
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
	paths := &jobManager{dir: dir}
	now := time.Now().Add(-time.Minute)
	write := func(in JobInfo) {
		b, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(paths.path(in.ID), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(JobInfo{ID: "was-running", Kind: "importbackup", State: JobRunning, Created: now, Started: &now, CallbackURL: cb.URL})
	write(JobInfo{ID: "was-waiting", Kind: "importbackup", State: JobWaiting, Created: now})
	done := JobInfo{ID: "was-done", Kind: "ping", State: JobSucceeded, Created: now, Ended: &now,
		Result: json.RawMessage(`{"success":true,"error":""}`), Callback: CallbackStatus{Attempts: 1, Delivered: true}}
	write(done)
	if err := os.WriteFile(filepath.Join(dir, "garbage.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}

	jm, _ := newTestJobs(t, dir, func(c *Config) { c.CallbackMaxDelay = time.Millisecond })
	for _, tc := range []struct {
		id    string
		state JobState
		err   string
	}{
		{"was-running", JobFailed, ReasonInterrupted},
		{"was-waiting", JobFailed, ReasonInterrupted},
		{"was-done", JobSucceeded, ""},
	} {
		j, ok := jm.get(tc.id)
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
		var disk JobInfo
		if err := json.Unmarshal(b, &disk); err != nil || disk.State != tc.state || disk.Error != tc.err {
			t.Fatalf("%s on disk: %s", tc.id, b)
		}
	}
	if n := len(jm.list()); n != 3 {
		t.Fatalf("%d jobs loaded, want 3 (garbage ignored)", n)
	}
	// The undelivered result of the interrupted job goes to its callback.
	jm.resumeCallbacks()
	jtWaitFor(t, "callback of the interrupted job", func() bool {
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
	cfg := func(c *Config) { c.CallbackMaxDelay = time.Millisecond }
	m := newMetrics(prometheus.NewRegistry(), func() (storeStats, bool) { return storeStats{}, false })
	c := DefaultConfig()
	cfg(&c)
	jm, err := newJobManager(dir, c, slog.New(slog.DiscardHandler), m)
	if err != nil {
		t.Fatal(err)
	}
	g := newGate()
	j := mustSubmit(t, jm, "long", true, cb.URL, g.fn)
	g.next(t)
	ctx, cancel := context.WithTimeout(context.Background(), jtWait)
	defer cancel()
	if err := jm.shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if in := j.Info(); in.State != JobFailed || in.Error != ReasonInterrupted {
		t.Fatalf("after shutdown: %+v", in)
	}
	mu.Lock()
	if hits != 0 {
		t.Fatalf("callback sent during shutdown (%d)", hits)
	}
	mu.Unlock()
	if _, _, err := jm.submit("late", "test", false, "", g.fn); err == nil {
		t.Fatal("submit after shutdown accepted")
	}

	jm2, _ := newTestJobs(t, dir, cfg)
	jm2.resumeCallbacks()
	jtWaitFor(t, "callback after restart", func() bool {
		j, ok := jm2.get("long")
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
	jm, _ := newTestJobs(t, "", func(c *Config) { c.CallbackRetries = 100; c.CallbackMaxDelay = time.Hour })
	g := newGate()
	quick := func(context.Context, *Job) ([]byte, error) { return nil, nil }
	done := mustSubmit(t, jm, "done", false, "", quick)
	pending := mustSubmit(t, jm, "pending-callback", false, failing.URL, quick)
	running := mustSubmit(t, jm, "running", false, "", g.fn)
	g.next(t)
	waitDone(t, done)
	waitDone(t, pending)
	jtWaitFor(t, "first callback attempt", func() bool { return pending.Info().Callback.Attempts >= 1 })

	if n := jm.prune(time.Now().Add(-time.Hour)); n != 0 {
		t.Fatalf("pruned %d jobs younger than the retention", n)
	}
	if n := jm.prune(time.Now().Add(time.Hour)); n != 1 {
		t.Fatalf("pruned %d, want 1 (only the settled finished job)", n)
	}
	if _, ok := jm.get("done"); ok {
		t.Fatal("pruned job still listed")
	}
	if _, err := os.Stat(jm.path("done")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pruned job record still on disk: %v", err)
	}
	for _, id := range []string{"pending-callback", "running"} {
		if _, ok := jm.get(id); !ok {
			t.Fatalf("%s pruned", id)
		}
		if _, err := os.Stat(jm.path(id)); err != nil {
			t.Fatalf("%s record: %v", id, err)
		}
	}
	g.open("running")
	waitDone(t, running)
}

// cbServer fails the first n callback attempts, then accepts.
type cbServer struct {
	*httptest.Server
	mu    sync.Mutex
	fail  int
	calls []cbCall
}

type cbCall struct {
	at          time.Time
	task, ctype string
	body        []byte
}

func newCBServer(t *testing.T, fail int) *cbServer {
	s := &cbServer{fail: fail}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		s.mu.Lock()
		s.calls = append(s.calls, cbCall{time.Now(), r.Header.Get("taskuuid"), r.Header.Get("Content-Type"), b})
		n := len(s.calls)
		s.mu.Unlock()
		if n <= s.fail {
			http.Error(w, "not yet", http.StatusInternalServerError)
		}
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *cbServer) snapshot() []cbCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]cbCall(nil), s.calls...)
}

func TestCallbackRetries(t *testing.T) {
	for _, tc := range []struct {
		name      string
		fail      int
		retries   int
		maxDelay  time.Duration
		attempts  int
		delivered bool
		minGaps   []time.Duration // lower bounds only: timers never fire early
	}{
		{"first try", 0, 3, time.Second, 1, true, nil},
		{"backoff doubles", 2, 3, time.Second, 3, true, []time.Duration{250 * time.Millisecond, 500 * time.Millisecond}},
		{"capped delay", 3, 5, 20 * time.Millisecond, 4, true, []time.Duration{20 * time.Millisecond, 20 * time.Millisecond, 20 * time.Millisecond}},
		{"given up", 1000, 2, 5 * time.Millisecond, 3, false, nil},
		{"no retries", 1000, 0, 5 * time.Millisecond, 1, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := newCBServer(t, tc.fail)
			jm, m := newTestJobs(t, "", func(c *Config) {
				c.CallbackRetries = tc.retries
				c.CallbackMaxDelay = tc.maxDelay
			})
			id := "cb-" + strings.ReplaceAll(tc.name, " ", "-")
			j := mustSubmit(t, jm, id, false, srv.URL, func(context.Context, *Job) ([]byte, error) {
				return replyBody(map[string]int{"answer": 42}, nil), nil
			})
			waitDone(t, j)
			jtWaitFor(t, "callback settled", func() bool {
				cs := j.Info().Callback
				return cs.Delivered || (cs.GivenUp && testutil.ToFloat64(m.callbackFailed) == 1)
			})
			in := j.Info()
			cs := in.Callback
			if cs.Attempts != tc.attempts || cs.Delivered != tc.delivered || cs.GivenUp == tc.delivered {
				t.Fatalf("callback status %+v, want %d attempts delivered=%v", cs, tc.attempts, tc.delivered)
			}
			if tc.delivered != (cs.LastError == "") {
				t.Fatalf("lastError %q", cs.LastError)
			}
			if !tc.delivered && !strings.Contains(cs.LastError, "500") {
				t.Fatalf("lastError %q does not give the status", cs.LastError)
			}
			calls := srv.snapshot()
			if len(calls) != tc.attempts {
				t.Fatalf("server saw %d attempts, want %d", len(calls), tc.attempts)
			}
			for i, c := range calls {
				if c.task != id || c.ctype != "application/json" || string(c.body) != string(in.Result) {
					t.Fatalf("attempt %d: taskuuid %q type %q body %s", i+1, c.task, c.ctype, c.body)
				}
			}
			for i, min := range tc.minGaps {
				if gap := calls[i+1].at.Sub(calls[i].at); gap < min {
					t.Fatalf("gap before attempt %d: %v, want at least %v", i+2, gap, min)
				}
			}
			wantFailed := 0.0
			if !tc.delivered {
				wantFailed = 1
			}
			if got := testutil.ToFloat64(m.callbackFailed); got != wantFailed {
				t.Fatalf("callbacks_given_up_total = %v, want %v", got, wantFailed)
			}
			// The settled status is persisted, so a restart does not resend.
			jtWaitFor(t, "persisted callback status", func() bool {
				b, err := os.ReadFile(jm.path(id))
				var disk JobInfo
				return err == nil && json.Unmarshal(b, &disk) == nil && disk.Callback.Delivered == tc.delivered && disk.Callback.GivenUp != tc.delivered
			})
		})
	}
}

func TestFIFOSem(t *testing.T) {
	s := newFIFOSem(1)
	ctx := context.Background()
	if err := s.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	a, b := s.enqueue(), s.enqueue()
	// Giving up a place in line passes nothing on and keeps the order.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := s.wait(cctx, a); !errors.Is(err, context.Canceled) {
		t.Fatalf("wait on cancelled ctx: %v", err)
	}
	s.Release()
	select {
	case <-b:
	case <-time.After(jtWait):
		t.Fatal("release did not grant the next waiter")
	}
	if err := s.wait(ctx, b); err != nil {
		t.Fatal(err)
	}
	s.Release()
	// The slot is free again: taken at once.
	c := s.enqueue()
	select {
	case <-c:
	default:
		t.Fatal("free slot not granted at once")
	}
	// Cancelled after being granted: the slot is passed on, not lost.
	d := s.enqueue()
	s.Release() // grants d
	if err := s.wait(cctx, d); err == nil {
		// select picked the grant; release it ourselves
		s.Release()
	}
	e := s.enqueue()
	select {
	case <-e:
	case <-time.After(jtWait):
		t.Fatal("slot lost after a cancelled grant")
	}
}

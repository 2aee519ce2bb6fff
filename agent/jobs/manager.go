package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sort"
	"sync"
	"time"

	"imagestore/internal/redact"
)

// Options configure a Manager.
type Options struct {
	// Dir holds the job records (<root>/jobs); created if missing.
	Dir string
	// Parallelism is how many backup jobs run at once; more queue FIFO
	// (default 1).
	Parallelism int
	// CallbackRetries is how many times a failed callback is retried;
	// the waits start at 250 ms and double up to CallbackMaxDelay
	// (default 30s).
	CallbackRetries  int
	CallbackMaxDelay time.Duration
	// CallbackTimeout bounds one callback POST (default 30s).
	CallbackTimeout time.Duration
	// Metrics receive job counts and timings; nil = a fresh unregistered set.
	Metrics *Metrics
	Logger  *slog.Logger
}

// RunFunc produces the reply body of a job; err marks the job failed.
type RunFunc func(ctx context.Context, job *Job) (body []byte, err error)

// Spec describes a job to Submit.
type Spec struct {
	ID   string // the taskuuid
	Kind string
	// Backup jobs share the Parallelism slots and queue FIFO beyond them.
	Backup bool
	// CallbackURL receives the result; "" = none. It may carry
	// credentials: it is redacted in records, replies and logs.
	CallbackURL string
	// API is the management node's API id (threadContext.api); CancelAPI
	// cancels by it. ImageUUID names the image the job works on, known
	// before it starts (import/cancel matches it while the job waits).
	API, ImageUUID string
}

// Manager runs jobs, one per taskuuid: it persists them in Dir, cancels,
// lists and prunes them, and delivers each result to its callback URL.
type Manager struct {
	dir     string
	opts    Options
	log     *slog.Logger
	metrics *Metrics
	sem     *fifoSem
	client  *http.Client

	ctx    context.Context // cancelled at shutdown
	stop   context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	jobs   map[string]*Job
	closed bool

	running int // backup jobs running now
	peak    int
}

var (
	// ErrInterrupted is the cause of a job stopped by Shutdown.
	ErrInterrupted = errors.New(ReasonInterrupted)
	// ErrCancelled is the cause of a job stopped by Cancel.
	ErrCancelled = errors.New("cancelled by request")
	// ErrShuttingDown is Submit's error once Shutdown has begun.
	ErrShuttingDown = errors.New("agent is shutting down")
)

// New opens the job records in opts.Dir: jobs a previous run left
// unfinished are failed with ReasonInterrupted. Call ResumeCallbacks to
// deliver the results still owed.
func New(opts Options) (*Manager, error) {
	if opts.Parallelism < 1 {
		opts.Parallelism = 1
	}
	if opts.CallbackMaxDelay <= 0 {
		opts.CallbackMaxDelay = 30 * time.Second
	}
	if opts.CallbackTimeout <= 0 {
		opts.CallbackTimeout = 30 * time.Second
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Dir, 0o750); err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(context.Background())
	m := &Manager{
		dir: opts.Dir, opts: opts, log: opts.Logger, metrics: opts.Metrics,
		sem:    newFIFOSem(opts.Parallelism),
		client: &http.Client{Timeout: opts.CallbackTimeout},
		ctx:    ctx, stop: stop,
		jobs: map[string]*Job{},
	}
	if err := m.load(); err != nil {
		stop()
		return nil, err
	}
	return m, nil
}

// Submit registers and starts a job. A job with the same id that is still
// waiting or running is returned with started=false; a finished one has its
// result delivered again (a retried request) without running a second time.
func (m *Manager) Submit(spec Spec, fn RunFunc) (job *Job, started bool, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, false, ErrShuttingDown
	}
	id, callbackURL := spec.ID, spec.CallbackURL
	if old, ok := m.jobs[id]; ok {
		in := old.Info()
		if in.State.Finished() && callbackURL != "" {
			old.mu.Lock()
			old.info.CallbackURL = redact.URL(callbackURL)
			old.callback = callbackURL
			old.info.Callback = CallbackStatus{}
			old.mu.Unlock()
			if err := m.persist(old); err != nil {
				m.log.Error("recording job", "task", id, "err", err)
			}
			m.wg.Add(1)
			go m.deliver(old)
		}
		return old, false, nil
	}
	ctx, cancel := context.WithCancelCause(m.ctx)
	j := &Job{done: make(chan struct{}), cancel: cancel, info: Info{
		ID: id, Kind: spec.Kind, Backup: spec.Backup, State: Waiting, Created: time.Now(), CallbackURL: redact.URL(callbackURL),
		API: spec.API, ImageUUID: spec.ImageUUID,
	}, callback: callbackURL}
	if err := m.persist(j); err != nil {
		cancel(nil)
		return nil, false, fmt.Errorf("recording job: %w", err)
	}
	m.jobs[id] = j
	m.metrics.Active.WithLabelValues(spec.Kind, string(Waiting)).Inc()
	// The place in line is taken here, not in the goroutine, so backup
	// jobs start in submission order however the goroutines are scheduled.
	var slot chan struct{}
	if spec.Backup {
		slot = m.sem.enqueue()
	}
	m.wg.Add(1)
	go m.run(ctx, j, fn, slot)
	return j, true, nil
}

// run runs a job; slot is its place in the backup queue (nil for others).
func (m *Manager) run(ctx context.Context, j *Job, fn RunFunc, slot chan struct{}) {
	defer m.wg.Done()
	kind := j.info.Kind
	var body []byte
	// The backup slot is given back only after the job's final state is
	// recorded, so the job list never shows more running backup jobs than
	// the parallelism.
	releaseSlot := func() {}
	err := func() error {
		if j.info.Backup {
			if err := m.sem.wait(ctx, slot); err != nil {
				return err
			}
			m.mu.Lock()
			m.running++
			if m.running > m.peak {
				m.peak = m.running
				m.metrics.BackupPeak.Set(float64(m.peak))
			}
			m.mu.Unlock()
			releaseSlot = func() {
				m.mu.Lock()
				m.running--
				m.mu.Unlock()
				m.sem.Release()
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		now := time.Now()
		j.mu.Lock()
		j.info.State = Running
		j.info.Started = &now
		j.mu.Unlock()
		m.metrics.Active.WithLabelValues(kind, string(Waiting)).Dec()
		m.metrics.Active.WithLabelValues(kind, string(Running)).Inc()
		defer m.metrics.Active.WithLabelValues(kind, string(Running)).Dec()
		if err := m.persist(j); err != nil {
			return fmt.Errorf("recording job: %w", err)
		}
		var err error
		body, err = fn(ctx, j)
		return err
	}()
	err = m.finish(ctx, j, body, err)
	releaseSlot()
	m.report(j, err)
}

// finish records the outcome of a job's run and returns its final error.
func (m *Manager) finish(ctx context.Context, j *Job, body []byte, err error) error {
	now := time.Now()
	j.mu.Lock()
	defer j.mu.Unlock()
	state := Succeeded
	switch {
	case err == nil:
	case errors.Is(context.Cause(ctx), ErrCancelled):
		state, err = Cancelled, ErrCancelled
	case errors.Is(context.Cause(ctx), ErrInterrupted):
		state, err = Failed, ErrInterrupted
	default:
		state = Failed
	}
	if j.info.Started == nil {
		m.metrics.Active.WithLabelValues(j.info.Kind, string(Waiting)).Dec()
	}
	j.info.State = state
	j.info.Ended = &now
	if err != nil {
		j.info.Error = err.Error()
		body = failureBody(err.Error())
	}
	j.info.Result = body
	return err
}

// report counts, logs and persists a finished job, then starts its
// callback; err is its final error.
func (m *Manager) report(j *Job, err error) {
	in := j.Info()
	m.metrics.Finished.WithLabelValues(in.Kind, string(in.State)).Inc()
	if in.Started != nil {
		m.metrics.Duration.WithLabelValues(in.Kind).Observe(in.Ended.Sub(*in.Started).Seconds())
	}
	if err != nil {
		m.log.Warn("job failed", "task", in.ID, "kind", in.Kind, "state", in.State, "err", err)
	} else {
		m.log.Info("job succeeded", "task", in.ID, "kind", in.Kind)
	}
	if perr := m.persist(j); perr != nil {
		m.log.Error("recording job result", "task", in.ID, "err", perr)
	}
	j.cancel(nil)
	close(j.done)
	// At shutdown the callback is left for the next start, which sends it.
	if j.callbackURL() != "" && !errors.Is(err, ErrInterrupted) {
		m.wg.Add(1)
		go m.deliver(j)
	}
}

// failureBody is the reply of a failed job.
func failureBody(msg string) []byte {
	b, _ := json.Marshal(map[string]any{"success": false, "error": msg})
	return b
}

// Get returns the job with taskuuid id.
func (m *Manager) Get(id string) (*Job, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, ok := m.jobs[id]
	return j, ok
}

// List returns snapshots sorted by creation time.
func (m *Manager) List() []Info {
	m.mu.Lock()
	js := make([]*Job, 0, len(m.jobs))
	for _, j := range m.jobs {
		js = append(js, j)
	}
	m.mu.Unlock()
	out := make([]Info, 0, len(js))
	for _, j := range js {
		out = append(out, j.Info())
	}
	sort.Slice(out, func(a, b int) bool {
		if !out[a].Created.Equal(out[b].Created) {
			return out[a].Created.Before(out[b].Created)
		}
		return out[a].ID < out[b].ID
	})
	return out
}

// Cancel cancels a waiting or running job and returns its state before.
func (m *Manager) Cancel(id string) (Info, error) {
	j, ok := m.Get(id)
	if !ok {
		return Info{}, fmt.Errorf("no job with taskuuid %q", id)
	}
	in := j.Info()
	if in.State.Finished() {
		return in, fmt.Errorf("job %q already %s", id, in.State)
	}
	j.cancel(ErrCancelled)
	return in, nil
}

// CancelWhere cancels every waiting or running job for which match is
// true and returns them as they were before. Each cancelled job fails with
// ErrCancelled through its own reply.
func (m *Manager) CancelWhere(match func(Info) bool) []Info {
	m.mu.Lock()
	js := make([]*Job, 0, len(m.jobs))
	for _, j := range m.jobs {
		js = append(js, j)
	}
	m.mu.Unlock()
	var out []Info
	for _, j := range js {
		in := j.Info()
		if j.cancel == nil || in.State.Finished() || !match(in) {
			continue
		}
		j.cancel(ErrCancelled)
		out = append(out, in)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	return out
}

// Prune forgets finished jobs that ended before cutoff and whose callback
// is settled, and returns how many.
func (m *Manager) Prune(cutoff time.Time) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for id, j := range m.jobs {
		in := j.Info()
		if !in.State.Finished() || in.Ended == nil || !in.Ended.Before(cutoff) {
			continue
		}
		if in.CallbackURL != "" && !in.Callback.Delivered && !in.Callback.GivenUp {
			continue
		}
		if err := os.Remove(m.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("pruning job record", "task", id, "err", err)
			continue
		}
		removeFile(m.callbackPath(id))
		delete(m.jobs, id)
		n++
	}
	return n
}

// Shutdown cancels every job (marking running ones failed with
// ReasonInterrupted), waits for them and for callback goroutines.
func (m *Manager) Shutdown(ctx context.Context) error {
	m.mu.Lock()
	m.closed = true
	for _, j := range m.jobs {
		if j.cancel != nil {
			j.cancel(ErrInterrupted)
		}
	}
	m.mu.Unlock()
	m.stop()
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("jobs still running at shutdown deadline: %w", ctx.Err())
	}
}

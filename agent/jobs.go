package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// JobState is the lifecycle state of an async job.
type JobState string

// Job states, as reported by job/list, job/get and progress.
const (
	JobWaiting   JobState = "waiting"
	JobRunning   JobState = "running"
	JobSucceeded JobState = "succeeded"
	JobFailed    JobState = "failed"
	JobCancelled JobState = "cancelled"
)

// ReasonInterrupted is the error of a job that was waiting or running when the
// daemon stopped (SIGTERM, crash or kill -9); it is set at shutdown or, after
// a crash, when the next start finds the job record unfinished.
const ReasonInterrupted = "interrupted by agent restart"

func (s JobState) finished() bool {
	return s == JobSucceeded || s == JobFailed || s == JobCancelled
}

// CallbackStatus records delivery of a job's result to the management node.
type CallbackStatus struct {
	Attempts  int    `json:"attempts"`
	Delivered bool   `json:"delivered"`
	GivenUp   bool   `json:"givenUp"`
	LastError string `json:"lastError,omitempty"`
}

// JobInfo is the persisted and reported view of a job.
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
	ImageUUID   string          `json:"imageUuid,omitempty"`
	InstallPath string          `json:"installPath,omitempty"`
	Format      string          `json:"format,omitempty"`
	CallbackURL string          `json:"callbackUrl,omitempty"` // redacted: no userinfo, query or fragment
	Callback    CallbackStatus  `json:"callback"`
	Result      json.RawMessage `json:"result,omitempty"` // the reply body sent to the callback
}

// Job is one async request being run. Handlers use its progress methods.
type Job struct {
	m         *jobManager
	done      chan struct{}
	cancel    context.CancelCauseFunc
	bytesDone atomic.Int64
	bytesAll  atomic.Int64

	persistMu sync.Mutex // orders record writes
	mu        sync.Mutex
	info      JobInfo
	// callback is the full callback URL, which may carry credentials
	// (userinfo, a token in the query). It is never reported or put in the
	// record; while undelivered it is kept in a 0600 side file so a
	// restarted agent can still deliver.
	callback string
}

// ID returns the job's taskuuid.
func (j *Job) ID() string { return j.info.ID }

// SetTotal sets the number of bytes the job expects to process.
func (j *Job) SetTotal(n int64) { j.bytesAll.Store(n) }

// Add records n more bytes processed.
func (j *Job) Add(n int64) { j.bytesDone.Add(n) }

// SetImage names the image the job works on, for progress lookups.
func (j *Job) SetImage(imageUUID, installPath, format string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if imageUUID != "" {
		j.info.ImageUUID = imageUUID
	}
	if installPath != "" {
		j.info.InstallPath = installPath
	}
	if format != "" {
		j.info.Format = format
	}
}

// Reader counts bytes read from r as progress.
func (j *Job) Reader(r io.Reader) io.Reader { return &progressReader{r: r, j: j} }

// ReaderAt counts bytes read from r as progress.
func (j *Job) ReaderAt(r io.ReaderAt) io.ReaderAt { return &progressReaderAt{r: r, j: j} }

type progressReader struct {
	r io.Reader
	j *Job
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.j.Add(int64(n))
	return n, err
}

type progressReaderAt struct {
	r io.ReaderAt
	j *Job
}

func (p *progressReaderAt) ReadAt(b []byte, off int64) (int, error) {
	n, err := p.r.ReadAt(b, off)
	p.j.Add(int64(n))
	return n, err
}

// Info returns a snapshot of the job.
func (j *Job) Info() JobInfo {
	j.mu.Lock()
	defer j.mu.Unlock()
	in := j.info
	in.Done = j.bytesDone.Load()
	in.Total = j.bytesAll.Load()
	in.Result = append(json.RawMessage(nil), j.info.Result...)
	return in
}

// Done is closed when the job has finished (its callback may still be pending).
func (j *Job) Done() <-chan struct{} { return j.done }

// jobRunFunc produces the reply body of a job; err marks the job failed.
type jobRunFunc func(ctx context.Context, job *Job) (body []byte, err error)

type jobManager struct {
	dir    string
	cfg    Config
	log    *slog.Logger
	m      *metrics
	sem    *fifoSem
	client *http.Client

	ctx    context.Context // cancelled at shutdown
	stop   context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	jobs   map[string]*Job
	closed bool

	running int // backup jobs running now
	peak    int
}

var errShutdown = errors.New(ReasonInterrupted)

// errCancelled is the cause of a job cancelled through job/cancel.
var errCancelled = errors.New("cancelled by request")

func newJobManager(dir string, cfg Config, log *slog.Logger, m *metrics) (*jobManager, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(context.Background())
	jm := &jobManager{
		dir: dir, cfg: cfg, log: log, m: m,
		sem:    newFIFOSem(cfg.ParallelismDegree),
		client: &http.Client{Timeout: cfg.CallbackTimeout},
		ctx:    ctx, stop: stop,
		jobs: map[string]*Job{},
	}
	if err := jm.load(); err != nil {
		stop()
		return nil, err
	}
	return jm, nil
}

// load reads persisted jobs: unfinished ones are failed with ReasonInterrupted;
// results not yet delivered are delivered again.
func (jm *jobManager) load() error {
	ents, err := os.ReadDir(jm.dir)
	if err != nil {
		return err
	}
	now := time.Now()
	records := map[string]bool{}
	for _, e := range ents {
		records[e.Name()] = true
	}
	for _, e := range ents {
		// Leftovers of a crash: temp files of writeFileAtomic, and side
		// files whose record is gone.
		if strings.HasPrefix(e.Name(), ".tmp-") ||
			(strings.HasSuffix(e.Name(), ".callback") && !records[strings.TrimSuffix(e.Name(), ".callback")+".json"]) {
			removeJobFile(filepath.Join(jm.dir, e.Name()))
			continue
		}
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(jm.dir, e.Name()))
		if err != nil {
			return err
		}
		var in JobInfo
		if err := json.Unmarshal(b, &in); err != nil || in.ID == "" {
			jm.log.Warn("ignoring unreadable job record", "file", e.Name(), "err", err)
			continue
		}
		j := &Job{m: jm, done: make(chan struct{}), info: in}
		// The full URL is in the side file; a record written before
		// redaction existed holds it in CallbackURL: redact it now.
		j.callback = in.CallbackURL
		if b, err := os.ReadFile(jm.callbackPath(in.ID)); err == nil {
			j.callback = string(b)
		}
		j.info.CallbackURL = redactURL(in.CallbackURL)
		rewrite := j.info.CallbackURL != in.CallbackURL
		j.bytesDone.Store(in.Done)
		j.bytesAll.Store(in.Total)
		close(j.done)
		jm.jobs[in.ID] = j
		if !in.State.finished() {
			j.info.State = JobFailed
			j.info.Error = ReasonInterrupted
			j.info.Ended = &now
			j.info.Result = failureBody(ReasonInterrupted)
			jm.log.Warn("job interrupted by restart", "task", in.ID, "kind", in.Kind)
			rewrite = true
		}
		if rewrite {
			if err := jm.persist(j); err != nil {
				return err
			}
		}
	}
	return nil
}

// start begins delivering undelivered callbacks of loaded jobs.
func (jm *jobManager) resumeCallbacks() {
	jm.mu.Lock()
	defer jm.mu.Unlock()
	for _, j := range jm.jobs {
		in := j.Info()
		if in.State.finished() && j.callbackURL() != "" && !in.Callback.Delivered && !in.Callback.GivenUp {
			jm.wg.Add(1)
			go jm.deliver(j)
		}
	}
}

// submit registers and starts a job. A job with the same id that is still
// waiting or running is returned with started=false; a finished one has its
// result delivered again (a retried request) without running a second time.
func (jm *jobManager) submit(id, kind string, backup bool, callbackURL string, fn jobRunFunc) (*Job, bool, error) {
	jm.mu.Lock()
	defer jm.mu.Unlock()
	if jm.closed {
		return nil, false, errors.New("agent is shutting down")
	}
	if old, ok := jm.jobs[id]; ok {
		in := old.Info()
		if in.State.finished() && callbackURL != "" {
			old.mu.Lock()
			old.info.CallbackURL = redactURL(callbackURL)
			old.callback = callbackURL
			old.info.Callback = CallbackStatus{}
			old.mu.Unlock()
			if err := jm.persist(old); err != nil {
				jm.log.Error("recording job", "task", id, "err", err)
			}
			jm.wg.Add(1)
			go jm.deliver(old)
		}
		return old, false, nil
	}
	ctx, cancel := context.WithCancelCause(jm.ctx)
	j := &Job{m: jm, done: make(chan struct{}), cancel: cancel, info: JobInfo{
		ID: id, Kind: kind, Backup: backup, State: JobWaiting, Created: time.Now(), CallbackURL: redactURL(callbackURL),
	}, callback: callbackURL}
	if err := jm.persist(j); err != nil {
		cancel(nil)
		return nil, false, fmt.Errorf("recording job: %w", err)
	}
	jm.jobs[id] = j
	jm.m.jobsActive.WithLabelValues(kind, string(JobWaiting)).Inc()
	// The place in line is taken here, not in the goroutine, so backup
	// jobs start in submission order however the goroutines are scheduled.
	var slot chan struct{}
	if backup {
		slot = jm.sem.enqueue()
	}
	jm.wg.Add(1)
	go jm.run(ctx, j, fn, slot)
	return j, true, nil
}

// run runs a job; slot is its place in the backup queue (nil for others).
func (jm *jobManager) run(ctx context.Context, j *Job, fn jobRunFunc, slot chan struct{}) {
	defer jm.wg.Done()
	kind := j.info.Kind
	var body []byte
	// The backup slot is given back only after the job's final state is
	// recorded, so the job list never shows more running backup jobs than
	// parallelismDegree.
	releaseSlot := func() {}
	err := func() error {
		if j.info.Backup {
			if err := jm.sem.wait(ctx, slot); err != nil {
				return err
			}
			jm.mu.Lock()
			jm.running++
			if jm.running > jm.peak {
				jm.peak = jm.running
				jm.m.backupPeak.Set(float64(jm.peak))
			}
			jm.mu.Unlock()
			releaseSlot = func() {
				jm.mu.Lock()
				jm.running--
				jm.mu.Unlock()
				jm.sem.Release()
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		now := time.Now()
		j.mu.Lock()
		j.info.State = JobRunning
		j.info.Started = &now
		j.mu.Unlock()
		jm.m.jobsActive.WithLabelValues(kind, string(JobWaiting)).Dec()
		jm.m.jobsActive.WithLabelValues(kind, string(JobRunning)).Inc()
		defer jm.m.jobsActive.WithLabelValues(kind, string(JobRunning)).Dec()
		if err := jm.persist(j); err != nil {
			return fmt.Errorf("recording job: %w", err)
		}
		var err error
		body, err = fn(ctx, j)
		return err
	}()

	now := time.Now()
	j.mu.Lock()
	started := j.info.Started
	state := JobSucceeded
	switch {
	case err == nil:
	case errors.Is(context.Cause(ctx), errCancelled):
		state, err = JobCancelled, errCancelled
	case errors.Is(context.Cause(ctx), errShutdown):
		state, err = JobFailed, errShutdown
	default:
		state = JobFailed
	}
	if started == nil {
		jm.m.jobsActive.WithLabelValues(kind, string(JobWaiting)).Dec()
	}
	j.info.State = state
	j.info.Ended = &now
	if err != nil {
		j.info.Error = err.Error()
		body = failureBody(err.Error())
	}
	j.info.Result = body
	callbackURL := j.callback
	j.mu.Unlock()
	releaseSlot()

	jm.m.jobs.WithLabelValues(kind, string(state)).Inc()
	if started != nil {
		jm.m.jobDuration.WithLabelValues(kind).Observe(now.Sub(*started).Seconds())
	}
	if err != nil {
		jm.log.Warn("job failed", "task", j.info.ID, "kind", kind, "state", state, "err", err)
	} else {
		jm.log.Info("job succeeded", "task", j.info.ID, "kind", kind)
	}
	if perr := jm.persist(j); perr != nil {
		jm.log.Error("recording job result", "task", j.info.ID, "err", perr)
	}
	j.cancel(nil)
	close(j.done)
	// At shutdown the callback is left for the next start, which sends it.
	if callbackURL != "" && !errors.Is(err, errShutdown) {
		jm.wg.Add(1)
		go jm.deliver(j)
	}
}

// failureBody is the reply of a failed job.
func failureBody(msg string) []byte {
	b, _ := json.Marshal(map[string]any{"success": false, "error": msg})
	return b
}

// deliver POSTs the job's result to its callback URL, retrying with
// exponential backoff, then gives up with a log line.
func (jm *jobManager) deliver(j *Job) {
	defer jm.wg.Done()
	in := j.Info()
	delay := 250 * time.Millisecond
	maxDelay := jm.cfg.CallbackMaxDelay
	if maxDelay <= 0 {
		maxDelay = 30 * time.Second
	}
	for attempt := 0; attempt <= jm.cfg.CallbackRetries; attempt++ {
		if attempt > 0 {
			t := time.NewTimer(min(delay, maxDelay))
			select {
			case <-t.C:
			case <-jm.ctx.Done():
				t.Stop()
				return // delivered by the next start
			}
			delay *= 2
		}
		err := jm.post(j.callbackURL(), in.ID, in.Result)
		j.mu.Lock()
		j.info.Callback.Attempts++
		if err == nil {
			j.info.Callback.Delivered = true
			j.info.Callback.LastError = ""
		} else {
			j.info.Callback.LastError = err.Error()
		}
		j.mu.Unlock()
		if err == nil {
			jm.log.Debug("callback delivered", "task", in.ID, "attempt", attempt+1)
			_ = jm.persist(j)
			return
		}
		jm.log.Warn("callback failed", "task", in.ID, "attempt", attempt+1, "err", err)
	}
	j.mu.Lock()
	j.info.Callback.GivenUp = true
	j.mu.Unlock()
	jm.m.callbackFailed.Inc()
	jm.log.Error("callback given up", "task", in.ID, "kind", in.Kind, "attempts", jm.cfg.CallbackRetries+1)
	_ = jm.persist(j)
}

func (jm *jobManager) post(target, id string, body []byte) error {
	ctx, cancel := context.WithTimeout(jm.ctx, jm.client.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		// Not err: it quotes the URL.
		return fmt.Errorf("callback URL %s is not usable", redactURL(target))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("taskuuid", id)
	resp, err := jm.client.Do(req)
	if err != nil {
		// *url.Error quotes the URL, credentials included; the error is
		// logged and reported in job/list.
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = redactURL(ue.URL)
		}
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("callback answered %s", resp.Status)
	}
	return nil
}

func (jm *jobManager) get(id string) (*Job, bool) {
	jm.mu.Lock()
	defer jm.mu.Unlock()
	j, ok := jm.jobs[id]
	return j, ok
}

// list returns snapshots sorted by creation time.
func (jm *jobManager) list() []JobInfo {
	jm.mu.Lock()
	js := make([]*Job, 0, len(jm.jobs))
	for _, j := range jm.jobs {
		js = append(js, j)
	}
	jm.mu.Unlock()
	out := make([]JobInfo, 0, len(js))
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

// cancelJob cancels a waiting or running job.
func (jm *jobManager) cancelJob(id string) (JobInfo, error) {
	j, ok := jm.get(id)
	if !ok {
		return JobInfo{}, fmt.Errorf("no job with taskuuid %q", id)
	}
	in := j.Info()
	if in.State.finished() {
		return in, fmt.Errorf("job %q already %s", id, in.State)
	}
	j.cancel(errCancelled)
	return in, nil
}

// prune forgets finished jobs that ended before cutoff and whose callback is settled.
func (jm *jobManager) prune(cutoff time.Time) int {
	jm.mu.Lock()
	defer jm.mu.Unlock()
	n := 0
	for id, j := range jm.jobs {
		in := j.Info()
		if !in.State.finished() || in.Ended == nil || !in.Ended.Before(cutoff) {
			continue
		}
		if in.CallbackURL != "" && !in.Callback.Delivered && !in.Callback.GivenUp {
			continue
		}
		if err := os.Remove(jm.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
			jm.log.Warn("pruning job record", "task", id, "err", err)
			continue
		}
		removeJobFile(jm.callbackPath(id))
		delete(jm.jobs, id)
		n++
	}
	return n
}

// shutdown cancels every job (marking running ones failed with
// ReasonInterrupted), waits for them and for callback goroutines.
func (jm *jobManager) shutdown(ctx context.Context) error {
	jm.mu.Lock()
	jm.closed = true
	for _, j := range jm.jobs {
		if j.cancel != nil {
			j.cancel(errShutdown)
		}
	}
	jm.mu.Unlock()
	jm.stop()
	done := make(chan struct{})
	go func() { jm.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("jobs still running at shutdown deadline: %w", ctx.Err())
	}
}

func (jm *jobManager) path(id string) string {
	// The id comes from a request header; hashing it makes any value a safe file name.
	h := sha256.Sum256([]byte(id))
	return filepath.Join(jm.dir, hex.EncodeToString(h[:16])+".json")
}

// callbackPath is the side file holding a job's full callback URL.
func (jm *jobManager) callbackPath(id string) string {
	return strings.TrimSuffix(jm.path(id), ".json") + ".callback"
}

func (j *Job) callbackURL() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.callback
}

func (jm *jobManager) persist(j *Job) error {
	j.persistMu.Lock()
	defer j.persistMu.Unlock()
	in := j.Info()
	full := j.callbackURL()
	b, err := json.MarshalIndent(in, "", "  ")
	if err != nil {
		return err
	}
	// The side file first, so a record that needs it never lacks it.
	cbPath := jm.callbackPath(in.ID)
	if full != in.CallbackURL && !in.Callback.Delivered && !in.Callback.GivenUp {
		if err := writeFileAtomic(cbPath, []byte(full)); err != nil { // 0600 (CreateTemp)
			return err
		}
	}
	if err := writeFileAtomic(jm.path(in.ID), b); err != nil {
		return err
	}
	if full == in.CallbackURL || in.Callback.Delivered || in.Callback.GivenUp {
		removeJobFile(cbPath)
	}
	return nil
}

// removeJobFile removes a file that may not exist.
func removeJobFile(path string) {
	_ = os.Remove(path)
}

// redactURL strips what may be secret from a URL (userinfo, query,
// fragment) for records, replies and logs.
func redactURL(raw string) string {
	if raw == "" {
		return ""
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparseable URL)"
	}
	u.User = nil
	u.RawQuery, u.ForceQuery = "", false
	u.Fragment, u.RawFragment = "", ""
	return u.String()
}

// writeFileAtomic writes path via a synced temp file, rename and directory sync,
// so a crash leaves the old or the new content, never a torn file.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// fifoSem is a counting semaphore granting slots in arrival order.
type fifoSem struct {
	mu      sync.Mutex
	free    int
	waiters []chan struct{}
}

func newFIFOSem(n int) *fifoSem { return &fifoSem{free: n} }

// Acquire waits for a slot.
func (s *fifoSem) Acquire(ctx context.Context) error { return s.wait(ctx, s.enqueue()) }

// enqueue takes a place in line; the channel is closed once the slot is granted.
func (s *fifoSem) enqueue() chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := make(chan struct{})
	if s.free > 0 && len(s.waiters) == 0 {
		s.free--
		close(ch)
		return ch
	}
	s.waiters = append(s.waiters, ch)
	return ch
}

// wait waits until ch (from enqueue) is granted or ctx ends; on ctx's end
// the place is given up, or the slot passed on if granted meanwhile.
func (s *fifoSem) wait(ctx context.Context, ch chan struct{}) error {
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for i, w := range s.waiters {
			if w == ch {
				s.waiters = append(s.waiters[:i], s.waiters[i+1:]...)
				s.mu.Unlock()
				return ctx.Err()
			}
		}
		s.mu.Unlock()
		// Granted concurrently with cancellation: pass the slot on.
		s.Release()
		return ctx.Err()
	}
}

func (s *fifoSem) Release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.waiters) > 0 {
		ch := s.waiters[0]
		s.waiters = s.waiters[1:]
		close(ch)
		return
	}
	s.free++
}

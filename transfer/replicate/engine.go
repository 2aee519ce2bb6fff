// Package replicate copies image chains between stores over the OCI
// distribution API (transfer/oci): check first, send only missing blobs,
// verify every digest, record the chain parents first and the image last.
// Tasks are persisted so GET /v1/tasks/<id> survives a restart.
// See docs/replication.md.
package replicate

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"imagestore/blobstore"
	"imagestore/internal/retry"
	"imagestore/transfer/oci"
	"imagestore/transfer/ratelimit"
)

// Options configure an Engine.
type Options struct {
	Store *blobstore.Store
	// Dir holds the task records (<root>/registry/tasks).
	Dir string
	// MaxTasks bounds tasks running at once; more wait (default 4).
	MaxTasks int
	// Parallelism is the number of blob streams per task (default 4).
	Parallelism int
	// ReadBandwidth (pull) and WriteBandwidth (push) are the store-wide
	// default budgets in bytes/s of one task (0 = unlimited).
	ReadBandwidth, WriteBandwidth int64
	// Retries is how often a failed task attempt is retried (default 1).
	Retries int
	// RetryDelay is the pause before a retry, ±20 % (default 2s).
	RetryDelay time.Duration
	// Retention: finished tasks are forgotten after this (default 24h).
	Retention time.Duration
	// PeerServerName is the name verified in a peer's certificate when a
	// request carries a ca ("" = the host of addr); store.zstack.org in
	// the zstack profile.
	PeerServerName string
	// ReportEvery is how often a running task reports its state to the
	// peer it copies to or from, so the peer answers GET /v1/tasks/<id>
	// too (default 5s; also at every state change).
	ReportEvery time.Duration
	// PeerStale: a peer-reported task not heard of for this long reads as
	// failed (the store running it died; default 1m).
	PeerStale time.Duration
	// MaxPeerTasks bounds the records of tasks peers report here (default
	// 4096); a new one beyond it drops the one heard of longest ago. The
	// report endpoint has no more authentication than the port it is on.
	MaxPeerTasks int
	// NoCompress disables zstd on the wire.
	NoCompress bool
	Metrics    *Metrics
	Logger     *slog.Logger
}

// Request is the body of /v1/push and /v1/pull.
type Request struct {
	Name  string `json:"name"`
	ID    string `json:"id"`
	Addr  string `json:"addr"`
	CA    string `json:"ca,omitempty"`
	Token string `json:"token,omitempty"`
	// Optional per-task budgets (bytes/s); 0 = the store default.
	NetworkReadBandwidth  int64 `json:"networkReadBandwidth,omitempty"`
	NetworkWriteBandwidth int64 `json:"networkWriteBandwidth,omitempty"`
}

// Sentinels callers branch on.
var (
	ErrBadRequest = errors.New("bad replication request")
	// ErrSourceCorrupt: a local blob failed verification; it was quarantined and not sent.
	ErrSourceCorrupt = errors.New("source blob is corrupt")
	ErrClosed        = errors.New("replication engine closed")
)

// Engine runs push and pull tasks.
type Engine struct {
	o   Options
	st  *blobstore.Store
	log *slog.Logger
	m   *Metrics
	sem chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	tasks   map[string]*taskState
	clients map[[32]byte]*oci.Client
}

type taskState struct {
	mu   sync.Mutex
	t    Task
	done chan struct{}
	// progress counters, folded into t on read
	bytesDone atomic.Int64
}

// New opens the engine; tasks a previous process left waiting or running
// are marked failed with the reason (their credentials were never stored).
func New(o Options) (*Engine, error) {
	if o.Store == nil || o.Dir == "" {
		return nil, errors.New("replicate: Store and Dir are required")
	}
	if o.MaxTasks <= 0 {
		o.MaxTasks = 4
	}
	if o.Parallelism <= 0 {
		o.Parallelism = 4
	}
	if o.Retries < 0 {
		o.Retries = 0
	}
	if o.RetryDelay <= 0 {
		o.RetryDelay = 2 * time.Second
	}
	if o.Retention <= 0 {
		o.Retention = 24 * time.Hour
	}
	if o.ReportEvery <= 0 {
		o.ReportEvery = 5 * time.Second
	}
	if o.PeerStale <= 0 {
		o.PeerStale = time.Minute
	}
	if o.MaxPeerTasks <= 0 {
		o.MaxPeerTasks = 4096
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics(nil)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("replicate: %w", err)
	}
	o.Metrics.Bandwidth.WithLabelValues("write").Set(float64(o.WriteBandwidth))
	o.Metrics.Bandwidth.WithLabelValues("read").Set(float64(o.ReadBandwidth))
	e := &Engine{o: o, st: o.Store, log: o.Logger, m: o.Metrics, sem: make(chan struct{}, o.MaxTasks), tasks: map[string]*taskState{}, clients: map[[32]byte]*oci.Client{}}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	old, err := loadTasks(o.Dir)
	if err != nil {
		return nil, fmt.Errorf("replicate: load tasks: %w", err)
	}
	now := time.Now()
	for _, t := range old {
		// A peer's record is the peer's to finish: its next report (or
		// PeerStale) decides.
		if !t.finished() && t.Role != RolePeer {
			t.Error = fmt.Sprintf("interrupted: the agent stopped while the task was %s; retry the %s", t.Status, t.Kind)
			t.Status = StatusFailed
			t.LastOpTime = now
			if err := saveTask(o.Dir, t); err != nil {
				return nil, err
			}
			e.log.Warn("replication task interrupted by restart", "task", t.ID, "kind", t.Kind, "image", t.Name+":"+t.ImageID)
		}
		ts := &taskState{t: t, done: make(chan struct{})}
		ts.bytesDone.Store(t.BytesDone)
		if t.finished() {
			close(ts.done)
		}
		e.tasks[t.ID] = ts
	}
	e.prune(now)
	e.mu.Lock()
	e.evictPeers(o.MaxPeerTasks)
	e.mu.Unlock()
	return e, nil
}

// Close cancels running tasks (they end failed, "agent stopping") and waits.
func (e *Engine) Close() error {
	e.cancel()
	e.wg.Wait()
	e.mu.Lock()
	for _, c := range e.clients {
		c.CloseIdleConnections()
	}
	e.mu.Unlock()
	return nil
}

func (e *Engine) prune(now time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for id, ts := range e.tasks {
		ts.mu.Lock()
		old := ts.t.finished() && now.Sub(ts.t.LastOpTime) > e.o.Retention ||
			ts.t.Role == RolePeer && now.Sub(ts.t.Heard) > e.o.Retention
		ts.mu.Unlock()
		if old {
			delete(e.tasks, id)
			os.Remove(taskPath(e.o.Dir, id))
		}
	}
}

// Task returns a snapshot of task id.
func (e *Engine) Task(id string) (Task, error) {
	e.mu.Lock()
	ts := e.tasks[id]
	e.mu.Unlock()
	if ts == nil {
		return Task{}, fmt.Errorf("%w: %s", ErrTaskNotFound, id)
	}
	t := ts.snapshot()
	if t.Role == RolePeer && !t.finished() && time.Since(t.Heard) > e.o.PeerStale {
		t.Status = StatusFailed
		t.Error = fmt.Sprintf("the store running this task (%s) has not reported for %v", t.Addr, time.Since(t.Heard).Round(time.Second))
	}
	return t, nil
}

// Errors of Report callers branch on.
var (
	// ErrTaskConflict: a peer reported a task under the id of one this store runs.
	ErrTaskConflict = errors.New("task id belongs to a task of this store")
	// ErrNotReporter: a report about a task another host reported first.
	ErrNotReporter = errors.New("task is reported by another host")
)

// MaxReportError bounds the error text kept from a peer's report (bytes);
// a longer one is cut.
const MaxReportError = 4 << 10

// Report records the state of a task the store at from (the reporting
// connection's host) runs with this one (PUT /v1/tasks/<id>), so the id
// answers here too: the management node polls either store. Only the host
// that reported a task first may report it again; a finished record stays
// as it is; a task this store runs is never touched.
func (e *Engine) Report(w Wire, from string) error {
	switch {
	case !validTaskID(w.ID):
		return fmt.Errorf("%w: task id %q", ErrBadRequest, w.ID)
	case !validStatus(w.Status):
		return fmt.Errorf("%w: status %q", ErrBadRequest, w.Status)
	case w.Kind != "push" && w.Kind != "pull":
		return fmt.Errorf("%w: kind %q", ErrBadRequest, w.Kind)
	case from == "":
		return fmt.Errorf("%w: no reporting host", ErrBadRequest)
	case w.BytesDone < 0 || w.BytesTotal < 0 || w.BlobsDone < 0 || w.BlobsTotal < 0 || w.Skipped < 0:
		return fmt.Errorf("%w: negative count", ErrBadRequest)
	}
	if err := (blobstore.Ref{Name: w.Name, ID: w.ImageID}).Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	if len(w.Error) > MaxReportError {
		w.Error = strings.ToValidUTF8(w.Error[:MaxReportError], "") + " [cut]"
	}
	now := time.Now()
	e.prune(now)
	e.mu.Lock()
	ts := e.tasks[w.ID]
	if ts == nil {
		e.evictPeers(e.o.MaxPeerTasks - 1)
		ts = &taskState{done: make(chan struct{}), t: Task{ID: w.ID, Kind: w.Kind, Name: w.Name, ImageID: w.ImageID,
			Addr: from, Role: RolePeer, Status: StatusWaiting, Created: now, LastOpTime: now, Heard: now}}
		e.tasks[w.ID] = ts
	}
	e.mu.Unlock()
	ts.mu.Lock()
	switch {
	case ts.t.Role != RolePeer:
		ts.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrTaskConflict, w.ID)
	case ts.t.Addr != from:
		addr := ts.t.Addr
		ts.mu.Unlock()
		return fmt.Errorf("%w: task %s is %s's, not %s's", ErrNotReporter, w.ID, addr, from)
	case ts.t.finished():
		ts.mu.Unlock()
		return nil
	case ts.t.Kind != w.Kind || ts.t.Name != w.Name || ts.t.ImageID != w.ImageID:
		ts.mu.Unlock()
		return fmt.Errorf("%w: task %s is %s of %s:%s", ErrBadRequest, w.ID, ts.t.Kind, ts.t.Name, ts.t.ImageID)
	}
	ts.t.Status, ts.t.Error, ts.t.Heard = w.Status, w.Error, now
	ts.t.LastOpTime = now // our clock: the poller compares it with ours
	ts.t.BytesTotal, ts.t.BlobsDone, ts.t.BlobsTotal, ts.t.Skipped = w.BytesTotal, w.BlobsDone, w.BlobsTotal, w.Skipped
	ts.bytesDone.Store(w.BytesDone)
	ts.t.BytesDone = w.BytesDone
	t := ts.t
	finished := t.finished()
	ts.mu.Unlock()
	if finished {
		close(ts.done)
	}
	return saveTask(e.o.Dir, t)
}

// evictPeers drops the peer records heard of longest ago until at most
// keep remain (e.mu held). Tasks this store runs are never dropped.
func (e *Engine) evictPeers(keep int) {
	type rec struct {
		id    string
		heard time.Time
	}
	var peers []rec
	for id, ts := range e.tasks {
		ts.mu.Lock()
		if ts.t.Role == RolePeer {
			peers = append(peers, rec{id, ts.t.Heard})
		}
		ts.mu.Unlock()
	}
	if len(peers) <= keep {
		return
	}
	slices.SortFunc(peers, func(a, b rec) int { return a.heard.Compare(b.heard) })
	for _, p := range peers[:len(peers)-max(keep, 0)] {
		delete(e.tasks, p.id)
		os.Remove(taskPath(e.o.Dir, p.id))
	}
	e.log.Warn("peer-reported task records over the limit; dropped the oldest", "dropped", len(peers)-max(keep, 0), "limit", e.o.MaxPeerTasks)
}

func (ts *taskState) snapshot() Task {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	t := ts.t
	t.BytesDone = max(0, ts.bytesDone.Load())
	return t
}

// Wait blocks until task id finishes or ctx ends.
func (e *Engine) Wait(ctx context.Context, id string) (Task, error) {
	e.mu.Lock()
	ts := e.tasks[id]
	e.mu.Unlock()
	if ts == nil {
		return Task{}, fmt.Errorf("%w: %s", ErrTaskNotFound, id)
	}
	select {
	case <-ts.done:
		return ts.snapshot(), nil
	case <-ctx.Done():
		return ts.snapshot(), ctx.Err()
	}
}

func (req *Request) validate() (blobstore.Ref, error) {
	r := blobstore.Ref{Name: req.Name, ID: req.ID}
	if err := r.Validate(); err != nil {
		return r, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	if req.Addr == "" {
		return r, fmt.Errorf("%w: addr is empty", ErrBadRequest)
	}
	if req.NetworkReadBandwidth < 0 || req.NetworkWriteBandwidth < 0 {
		return r, fmt.Errorf("%w: negative bandwidth", ErrBadRequest)
	}
	return r, nil
}

// client returns a pooled client for the peer, so repeated requests (a
// resync of many images) reuse kept-alive connections. The key is a hash;
// the token itself lives only inside the client.
func (e *Engine) client(req Request) (*oci.Client, error) {
	key := sha256.Sum256([]byte(req.Addr + "\x00" + req.CA + "\x00" + req.Token))
	e.mu.Lock()
	defer e.mu.Unlock()
	if c := e.clients[key]; c != nil {
		return c, nil
	}
	c, err := oci.New(oci.Options{Addr: req.Addr, CA: []byte(req.CA), ServerName: e.o.PeerServerName, Token: req.Token, Compress: !e.o.NoCompress})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	if len(e.clients) >= maxClients {
		for k, old := range e.clients {
			old.CloseIdleConnections()
			delete(e.clients, k)
		}
	}
	e.clients[key] = c
	return c, nil
}

// maxClients bounds the pool of peer clients.
const maxClients = 64

// Push starts copying req.Name:req.ID and its ancestors to the peer. It
// returns Existed when the peer already holds the same complete chain.
func (e *Engine) Push(ctx context.Context, req Request) (string, error) {
	ref, err := req.validate()
	if err != nil {
		return "", err
	}
	c, err := e.client(req)
	if err != nil {
		return "", err
	}
	return e.push(ctx, req, ref, c, "push")
}

// push starts a push of ref to c; kind is what the task reports ("pull"
// for a pull that goes the other way).
func (e *Engine) push(ctx context.Context, req Request, ref blobstore.Ref, c *oci.Client, kind string) (string, error) {
	r, err := Render(ctx, e.st, ref, true)
	if err != nil {
		return "", err
	}
	if d, err := c.HeadManifest(ctx, ref.Name, ref.ID); err == nil && d.Digest == r.Digest {
		e.m.Tasks.WithLabelValues(kind, "existed").Inc()
		e.m.BlobsSkipped.Add(float64(len(r.Layers)))
		return Existed, nil
	} else if err != nil && (errors.Is(err, oci.ErrUnauthorized) || untrusted(err)) {
		return "", fmt.Errorf("peer %s: %w", req.Addr, err)
	}
	bw := req.NetworkWriteBandwidth
	if bw == 0 {
		bw = e.o.WriteBandwidth
	}
	return e.start(kind, req, c, func(ctx context.Context, ts *taskState) error {
		return e.pushOnce(ctx, ts, c, ref, ratelimit.New(bw))
	})
}

// Pull starts copying req.Name:req.ID and its ancestors from the peer
// here; it repairs blobs quarantined locally. Existed when nothing is missing.
func (e *Engine) Pull(ctx context.Context, req Request) (string, error) {
	ref, err := req.validate()
	if err != nil {
		return "", err
	}
	c, err := e.client(req)
	if err != nil {
		return "", err
	}
	d, err := c.HeadManifest(ctx, ref.Name, ref.ID)
	if errors.Is(err, oci.ErrNotFound) {
		// The peer lacks it: if this store holds it, the copy goes the
		// other way. The management node's image recovery posts pull to
		// the store holding the image with addr = the one to recover it
		// on, and polls that one (PROTOCOL §7.1); backup recovery posts
		// it to the receiver. Either way the image ends up on both.
		if _, rerr := Render(ctx, e.st, ref, true); rerr == nil {
			e.log.Info("pull: the peer lacks the image and this store holds it; pushing it instead", "image", ref.String(), "peer", req.Addr)
			return e.push(ctx, req, ref, c, "pull")
		}
	}
	if err != nil {
		return "", fmt.Errorf("peer %s: manifest %s: %w", req.Addr, ref, err)
	}
	if r, err := Render(ctx, e.st, ref, true); err == nil && r.Digest == d.Digest {
		e.m.Tasks.WithLabelValues("pull", "existed").Inc()
		e.m.BlobsSkipped.Add(float64(len(r.Layers)))
		return Existed, nil
	}
	bw := req.NetworkReadBandwidth
	if bw == 0 {
		bw = e.o.ReadBandwidth
	}
	return e.start("pull", req, c, func(ctx context.Context, ts *taskState) error {
		return e.pullOnce(ctx, ts, c, ref, ratelimit.New(bw))
	})
}

func newID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (e *Engine) start(kind string, req Request, peer *oci.Client, run func(context.Context, *taskState) error) (string, error) {
	if e.ctx.Err() != nil {
		return "", ErrClosed
	}
	now := time.Now()
	e.prune(now)
	ts := &taskState{done: make(chan struct{}), t: Task{
		ID: newID(), Kind: kind, Name: req.Name, ImageID: req.ID, Addr: req.Addr,
		Status: StatusWaiting, Created: now, LastOpTime: now,
	}}
	if err := saveTask(e.o.Dir, ts.t); err != nil {
		return "", err
	}
	e.mu.Lock()
	e.tasks[ts.t.ID] = ts
	e.mu.Unlock()
	// The peer learns the id before the caller does, so whichever store
	// the management node polls answers.
	e.report(peer, ts)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer close(ts.done)
		stop := make(chan struct{})
		var hb sync.WaitGroup
		hb.Add(1)
		go func() {
			defer hb.Done()
			tick := time.NewTicker(e.o.ReportEvery)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					e.report(peer, ts)
				}
			}
		}()
		e.run(kind, ts, run)
		close(stop)
		hb.Wait()
		e.report(peer, ts) // the final state
	}()
	return ts.t.ID, nil
}

// reportTimeout bounds one report to the peer.
const reportTimeout = 10 * time.Second

// report tells the peer the task's state (PUT /v1/tasks/<id>). A peer that
// does not take it (an older store, a network cut) costs only that the id
// does not answer there; the copy itself goes on.
func (e *Engine) report(peer *oci.Client, ts *taskState) {
	t := ts.snapshot()
	b, err := json.Marshal(t.Wire())
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(e.ctx, reportTimeout)
	defer cancel()
	if err := peer.PutJSON(ctx, "/v1/tasks/"+t.ID, b); err != nil && e.ctx.Err() == nil {
		e.log.Warn("replication task not reported to the peer; polling the peer for it will not find it", "task", t.ID, "peer", t.Addr, "err", err)
	}
}

func (e *Engine) setStatus(ts *taskState, st Status, errMsg string) {
	ts.mu.Lock()
	ts.t.Status = st
	ts.t.Error = errMsg
	ts.t.LastOpTime = time.Now()
	ts.t.BytesDone = max(0, ts.bytesDone.Load())
	t := ts.t
	ts.mu.Unlock()
	if err := saveTask(e.o.Dir, t); err != nil {
		e.log.Error("replication task not persisted", "task", t.ID, "err", err)
	}
}

func (e *Engine) run(kind string, ts *taskState, run func(context.Context, *taskState) error) {
	ctx := e.ctx
	select {
	case e.sem <- struct{}{}:
	case <-ctx.Done():
		e.setStatus(ts, StatusFailed, "interrupted: agent stopping")
		e.m.Tasks.WithLabelValues(kind, "failed").Inc()
		return
	}
	defer func() { <-e.sem }()
	e.m.TasksRunning.Inc()
	defer e.m.TasksRunning.Dec()
	e.setStatus(ts, StatusRunning, "")
	t := ts.snapshot()
	log := e.log.With("task", t.ID, "kind", kind, "image", t.Name+":"+t.ImageID, "peer", t.Addr)
	log.Info("replication task started")
	err := e.taskRetry(log).Do(ctx, func(ctx context.Context, _ int) error { return run(ctx, ts) })
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("interrupted: agent stopping: %w", err)
		}
		log.Error("replication task failed", "err", err)
		e.setStatus(ts, StatusFailed, err.Error())
		e.m.Tasks.WithLabelValues(kind, "failed").Inc()
		return
	}
	log.Info("replication task succeeded", "bytes", ts.bytesDone.Load())
	e.setStatus(ts, StatusSuccess, "")
	e.m.Tasks.WithLabelValues(kind, "success").Inc()
}

// taskRetry is the policy of a task's attempts: Retries more after the
// first, RetryDelay (±20 %) apart, for the failures retryable allows.
func (e *Engine) taskRetry(log *slog.Logger) retry.Policy {
	return retry.Policy{
		Attempts: e.o.Retries + 1, Initial: e.o.RetryDelay, Max: e.o.RetryDelay, Jitter: 0.2,
		Retryable: retryable,
		OnRetry: func(attempt int, err error, _ time.Duration) {
			log.Warn("replication attempt failed; retrying", "attempt", attempt+1, "err", err)
		},
	}
}

// untrusted: the peer's certificate failed verification (wrong ca, or not
// issued to the configured server name); no retry will change that.
func untrusted(err error) bool {
	var cv *tls.CertificateVerificationError
	return errors.As(err, &cv)
}

// retryable: failures a later attempt may get past (network, peer restart).
func retryable(err error) bool {
	if untrusted(err) {
		return false
	}
	for _, s := range []error{ErrSourceCorrupt, ErrConflict, ErrBadRequest, oci.ErrQuota, oci.ErrUnauthorized,
		oci.ErrManifestInvalid, oci.ErrDigestInvalid, blobstore.ErrQuotaExceeded, blobstore.ErrNoSpace,
		blobstore.ErrDigestMismatch, blobstore.ErrCorrupt, ErrIncomplete, oci.ErrTooLarge} {
		if errors.Is(err, s) {
			return false
		}
	}
	return true
}

func (ts *taskState) plan(total int64, blobs, skipped int) {
	ts.mu.Lock()
	ts.t.BytesTotal = total
	ts.t.BlobsTotal = blobs
	ts.t.Skipped = skipped
	ts.t.LastOpTime = time.Now()
	ts.mu.Unlock()
	ts.bytesDone.Store(0)
}

func (ts *taskState) blobDone() {
	ts.mu.Lock()
	ts.t.BlobsDone++
	ts.t.LastOpTime = time.Now()
	ts.mu.Unlock()
}

func (ts *taskState) progress(n int64) {
	ts.bytesDone.Add(n)
	if n > 0 {
		ts.mu.Lock()
		ts.t.LastOpTime = time.Now()
		ts.mu.Unlock()
	}
}

func (e *Engine) pushOnce(ctx context.Context, ts *taskState, c *oci.Client, ref blobstore.Ref, lim *ratelimit.Limiter) error {
	r, err := Render(ctx, e.st, ref, true)
	if err != nil {
		return err
	}
	digests := make([]digest.Digest, 0, len(r.Layers))
	for _, l := range r.Layers {
		digests = append(digests, l.Digest)
	}
	release := e.st.Hold(digests...)
	defer release()

	// Check first: which layers does the peer lack?
	missing := make([]bool, len(r.Layers))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(e.o.Parallelism * 2)
	for i, l := range r.Layers {
		g.Go(func() error {
			size, err := c.StatBlob(gctx, ref.Name, l.Digest)
			switch {
			case err == nil && size == l.Size:
			case err == nil || errors.Is(err, oci.ErrNotFound):
				missing[i] = true
			default:
				return fmt.Errorf("peer: stat blob %s: %w", l.Digest, err)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	var total int64
	var todo []oci.Descriptor
	for i, l := range r.Layers {
		if missing[i] {
			todo = append(todo, l)
			total += l.Size
		}
	}
	skipped := len(r.Layers) - len(todo)
	e.m.BlobsSkipped.Add(float64(skipped))
	ts.plan(total, len(todo), skipped)

	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(e.o.Parallelism)
	for _, l := range todo {
		g.Go(func() error { return e.sendBlob(gctx, ts, c, ref.Name, l, lim) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if _, err := c.StatBlob(ctx, ref.Name, r.ConfigD); err != nil {
		if err := c.PutBlob(ctx, ref.Name, r.ConfigD, r.Config); err != nil {
			return fmt.Errorf("peer: config blob: %w", err)
		}
	}
	if _, err := c.PutManifest(ctx, ref.Name, ref.ID, oci.MediaTypeManifest, r.Manifest); err != nil {
		return fmt.Errorf("peer: manifest %s: %w", ref, err)
	}
	return nil
}

func (e *Engine) pullOnce(ctx context.Context, ts *taskState, c *oci.Client, ref blobstore.Ref, lim *ratelimit.Limiter) error {
	mb, _, err := c.GetManifest(ctx, ref.Name, ref.ID)
	if err != nil {
		return fmt.Errorf("peer: manifest %s: %w", ref, err)
	}
	m, err := oci.ParseManifest(mb)
	if err != nil {
		return fmt.Errorf("peer: manifest %s: %w", ref, err)
	}
	cb, err := c.FetchSmallBlob(ctx, ref.Name, m.Config.Digest, oci.MaxManifestSize)
	if err != nil {
		return fmt.Errorf("peer: config of %s: %w", ref, err)
	}
	cfg, err := ParseConfig(cb)
	if err != nil {
		return err
	}
	if _, err := Validate(m, cfg, ref.Name, ref.ID); err != nil {
		return err
	}
	// Hold every layer before asking whether we have it: a blob found here
	// (say, left by a deleted image) must not be freed by GC while the
	// others download, or Apply would find the chain incomplete.
	digests := make([]digest.Digest, len(m.Layers))
	for i, l := range m.Layers {
		digests[i] = l.Digest
	}
	release := e.st.Hold(digests...)
	defer release()
	var todo []oci.Descriptor
	var total int64
	for _, l := range m.Layers {
		if !e.st.Exists(l.Digest) {
			todo = append(todo, l)
			total += l.Size
		}
	}
	skipped := len(m.Layers) - len(todo)
	e.m.BlobsSkipped.Add(float64(skipped))
	ts.plan(total, len(todo), skipped)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(e.o.Parallelism)
	created := make([]blobstore.Creation, len(todo)) // one slot per goroutine
	for i, l := range todo {
		g.Go(func() (err error) {
			created[i], err = e.fetchBlob(gctx, ts, c, ref.Name, l, lim)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	_, err = Apply(ctx, e.st, m, cfg, ref.Name, ref.ID, nil)
	if errors.Is(err, oci.ErrManifestInvalid) || errors.Is(err, ErrConflict) {
		// Refused: the blobs this pull created are nobody's (Discard
		// keeps any that a record, a hold or a later commit uses by now).
		release()
		for _, cr := range created {
			if _, derr := e.st.Discard(context.WithoutCancel(ctx), cr); derr != nil {
				e.log.Warn("discarding a refused pull's blob", "blob", cr.Digest, "err", derr)
			}
		}
	}
	return err
}

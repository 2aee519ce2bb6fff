// Package agent serves the management-node protocol on :8001 (the
// /imagestore/* paths of docs/agent-protocol.md): sync and async commands,
// job bookkeeping with callbacks, auth, export downloads and metrics.
package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"imagestore/agent/api"
	"imagestore/agent/config"
	"imagestore/agent/exports"
	"imagestore/agent/hostxfer"
	"imagestore/agent/images"
	"imagestore/agent/ingest"
	"imagestore/agent/jobs"
	"imagestore/agent/metadata"
	"imagestore/agent/nbdtarget"
	"imagestore/agent/uploads"
	"imagestore/blobstore"
	"imagestore/internal/fsutil"
	"imagestore/layer"
	"imagestore/transfer/replicate"
)

// Agent is the management-protocol server of one store.
type Agent struct {
	cfg    config.Config
	store  *blobstore.Store
	log    *slog.Logger
	reg    *prometheus.Registry
	m      *metrics
	jobs   *jobs.Manager
	routes map[string]*boundRoute

	root string // absolute store root

	stateMu sync.Mutex
	state   agentState

	// sessions maps the secret token of each open upload URL to its
	// upload job's id (not secret: it is logged and reported).
	sessMu   sync.Mutex
	sessions map[string]string

	layers  *layer.Store       // stored layers and chains
	uploads *uploads.Uploads   // upload dirs, confined file access, upload sessions
	images  *images.Service    // image reads, delete, gc
	ingest  *ingest.Service    // imports
	exports *exports.Service   // download exports in <root>/exports
	nbd     *nbdtarget.Service // NBD targets and remote targets

	hostxfer *hostxfer.Service // transfers with KVM hosts over SSH
	pulls    *replicate.Engine // chains pulled from other stores for zstore:// imports
	metadata *metadata.Service // the management node's image-metadata file
}

// agentState is persisted in <root>/agent.json.
type agentState struct {
	UUID        string    `json:"uuid"` // set by connect
	ConnectedAt time.Time `json:"connectedAt,omitzero"`
}

// New builds an agent over an open store. It loads persisted jobs, failing
// those a previous run left unfinished.
func New(cfg config.Config, store *blobstore.Store, logger *slog.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	root := store.Root()
	a := &Agent{
		cfg: cfg, store: store, log: logger, reg: prometheus.NewRegistry(),
		root: root,
	}
	a.m = newMetrics(a.reg, a.storeStats)
	routes, err := buildRoutes(routeTable())
	if err != nil {
		return nil, err
	}
	a.routes = routes
	if err := a.newImageServices(); err != nil {
		return nil, err
	}
	// exports.New also removes exports a crash interrupted (no export.json).
	if a.exports, err = exports.New(exports.Options{
		Root: filepath.Join(root, "exports"), Layers: a.layers, Expiry: cfg.ExportExpiry, Logger: logger,
	}); err != nil {
		return nil, err
	}
	if a.metadata, err = metadata.New(metadata.Options{Root: root, Logger: logger}); err != nil {
		return nil, err
	}
	a.nbd = a.newNBD()
	a.reg.MustRegister(a.nbd.Collector())
	if b, err := os.ReadFile(filepath.Join(root, "agent.json")); err == nil {
		if err := json.Unmarshal(b, &a.state); err != nil {
			return nil, fmt.Errorf("agent state %s: %w", filepath.Join(root, "agent.json"), err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	jm, err := jobs.New(jobs.Options{
		Dir:              filepath.Join(root, "jobs"),
		Parallelism:      cfg.ParallelismDegree,
		CallbackRetries:  cfg.CallbackRetries,
		CallbackMaxDelay: cfg.CallbackMaxDelay,
		CallbackTimeout:  cfg.CallbackTimeout,
		Metrics:          a.m.jobs,
		Logger:           logger,
	})
	if err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}
	a.jobs = jm
	jm.ResumeCallbacks()
	return a, nil
}

// Registry is the Prometheus registry /metrics serves; other servers of
// the daemon (the :8000 registry) register their collectors on it.
func (a *Agent) Registry() *prometheus.Registry { return a.reg }

// Config returns the configuration the agent runs with.
func (a *Agent) Config() config.Config { return a.cfg }

func (a *Agent) storeStats() (storeStats, bool) {
	c, err := a.store.Capacity()
	if err != nil {
		return storeStats{}, false
	}
	return storeStats{Total: c.Total, Used: c.Used, Free: c.Free, Quota: c.Quota, Blobs: c.Blobs, Images: c.Images}, true
}

// UnboundedCapacity is the totalSize a store without a size of its own (a
// bucket) reports when no quota bounds it: the management node sends no
// backup to a store whose free space is 0, and a bucket has no figure to
// report (README, "Storing on S3").
const UnboundedCapacity = 1 << 50 // 1 PiB

// capacity reports totalSize/freeSize. With a quota, the store's space is
// the quota: free is what the quota still allows (bounded by the disk). A
// store without a size (S3) reports the quota, else UnboundedCapacity, less
// what it holds.
func (a *Agent) capacity() api.Capacity {
	c, err := a.store.Capacity()
	if err != nil {
		a.log.Warn("store capacity", "err", err)
		return api.Capacity{}
	}
	if c.Unbounded {
		total := int64(UnboundedCapacity)
		if c.Quota > 0 {
			total = c.Quota
		}
		return api.Capacity{TotalSize: total, FreeSize: max(total-c.Used, 0)}
	}
	if c.Quota > 0 {
		free := max(c.Quota-c.Used, 0)
		return api.Capacity{TotalSize: c.Quota, FreeSize: min(free, c.Free)}
	}
	return api.Capacity{TotalSize: c.Total, FreeSize: c.Free}
}

func (a *Agent) saveState() error {
	a.stateMu.Lock()
	defer a.stateMu.Unlock()
	b, err := json.Marshal(a.state)
	if err != nil {
		return err
	}
	return fsutil.WriteFile(filepath.Join(a.root, "agent.json"), b, 0o600)
}

// Run runs the background loops (upload-dir expiry, job pruning, periodic
// verification) until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	tick := time.NewTicker(time.Minute)
	defer tick.Stop()
	var verify <-chan time.Time
	if a.cfg.VerifyInterval > 0 {
		vt := time.NewTicker(a.cfg.VerifyInterval)
		defer vt.Stop()
		verify = vt.C
	}
	a.housekeeping()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			a.housekeeping()
		case <-verify:
			a.verify(ctx)
		}
	}
}

func (a *Agent) housekeeping() {
	a.nbd.Expire(context.Background(), time.Now())
	if a.cfg.ExportExpiry > 0 {
		a.exports.Sweep()
	}
	if n, err := a.uploads.CleanExpired(time.Now()); err != nil {
		a.log.Warn("upload dir cleanup", "err", err)
	} else if n > 0 {
		a.log.Info("removed expired upload dirs", "count", n)
	}
	if n := a.jobs.Prune(time.Now().Add(-a.cfg.JobRetention)); n > 0 {
		a.log.Info("pruned finished jobs", "count", n)
	}
}

func (a *Agent) verify(ctx context.Context) {
	sample := a.cfg.VerifySample
	if sample >= 1 {
		sample = 0
	}
	rep, err := a.store.Verify(ctx, sample)
	a.m.verifyRuns.Inc()
	if err != nil {
		a.log.Error("periodic verify", "err", err)
	}
	a.m.verifyFailures.Add(float64(len(rep.Corrupt)))
	for _, c := range rep.Corrupt {
		a.log.Error("corrupt blob quarantined", "digest", c.Digest, "quarantine", c.QuarantinePath, "images", fmt.Sprint(c.Images), "err", c.Err)
	}
	a.log.Info("periodic verify done", "checked", rep.Checked, "bytes", rep.Bytes, "corrupt", len(rep.Corrupt))
}

// Shutdown stops the jobs: running and waiting ones are marked failed with
// jobs.ReasonInterrupted (persisted) and their callbacks left for the next start.
func (a *Agent) Shutdown(ctx context.Context) error { return a.jobs.Shutdown(ctx) }

// Close releases the agent (after Shutdown); the store is the caller's.
func (a *Agent) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.ShutdownTimeout)
	defer cancel()
	err := a.jobs.Shutdown(ctx)
	a.nbd.Close()
	_ = a.hostxfer.Close() // after the jobs: a running host transfer holds pool connections
	_ = a.pulls.Close()
	return err
}

// newImageServices builds the layer store, the upload boundary and the
// image services.
func (a *Agent) newImageServices() error {
	var err error
	if a.layers, err = layer.New(layer.Options{Blobs: a.store, Logger: a.log}); err != nil {
		return err
	}
	a.uploads, err = uploads.New(uploads.Options{
		Root: filepath.Join(a.root, "uploads"), AllowedRoots: a.cfg.AllowedImportRoots,
		Expiry: a.cfg.UploadDirExpiry, ReleasedTarget: a.nbdTargetPath, MaxChunk: a.cfg.MaxBodyBytes, Logger: a.log,
	})
	if err != nil {
		return err
	}
	if a.images, err = images.New(images.Options{Store: a.store, GCFreed: a.m.gcFreed, Logger: a.log}); err != nil {
		return err
	}
	a.hostxfer, err = hostxfer.New(hostxfer.Options{
		Layers: a.layers, Images: a.images, KnownHostsFile: a.cfg.KnownHostsFile, Parallelism: a.cfg.ParallelismDegree,
		Registerer: a.reg, Ingested: a.m.bytesIngested, Exported: a.m.bytesExported, Logger: a.log,
	})
	if err != nil {
		return err
	}
	// zstore:// imports pull a chain from another store's registry as
	// /v1/pull does (same checks, identity kept), with tasks of their own.
	a.pulls, err = replicate.New(replicate.Options{
		Store: a.store, Dir: filepath.Join(a.root, "imports", "tasks"), Parallelism: a.cfg.Replication.Parallelism,
		Retries: a.cfg.Replication.Retries, Retention: a.cfg.JobRetention, PeerServerName: a.cfg.ServerName, Logger: a.log,
	})
	if err != nil {
		return err
	}
	_, registryPort, _ := net.SplitHostPort(a.cfg.RegistryListen)
	a.ingest, err = ingest.New(ingest.Options{
		Store: a.store, Layers: a.layers, Images: a.images, Uploads: a.uploads,
		MaxImportSize: int64(a.cfg.MaxImportSize), KnownHostsFile: a.cfg.KnownHostsFile, SSHKeyFile: a.cfg.SSHKeyFile,
		// The host transfers' pool: connections are reused across imports
		// and host transfers, and closed by Close.
		OpenSFTP:       a.hostxfer.Pool().Open,
		ReleaseProcess: a.releaseProcess, Ingested: a.m.bytesIngested, Logger: a.log,
		PullChain: a.pullChain, RegistryPort: registryPort,
	})
	return err
}

// pullChain copies ref's chain from the store whose registry is at addr
// and waits for it (see ingest.Options.PullChain).
func (a *Agent) pullChain(ctx context.Context, addr, caPEM string, ref blobstore.Ref) error {
	id, err := a.pulls.Pull(ctx, replicate.Request{Name: ref.Name, ID: ref.ID, Addr: addr, CA: caPEM})
	if err != nil || id == replicate.Existed {
		return err
	}
	t, err := a.pulls.Wait(ctx, id)
	if err != nil {
		return err
	}
	if t.Status != replicate.StatusSuccess {
		return fmt.Errorf("pull %s: %s", t.Status, t.Error)
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

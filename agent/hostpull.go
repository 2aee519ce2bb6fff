package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/parallel"
	"imagestore/transfer/ratelimit"
	"imagestore/transfer/sshfs"
	"imagestore/transfer/staging"
)

type pullFromHostReq struct {
	hostFields
	Path                 string   `json:"path"`
	Parent               string   `json:"parent"`
	Name                 string   `json:"name"`
	ID                   string   `json:"id"`
	InstallPath          string   `json:"installPath"`
	Desc                 string   `json:"desc"`
	VolumeReadBandwidth  ByteSize `json:"volumeReadBandwidth"`
	NetworkReadBandwidth ByteSize `json:"networkReadBandwidth"`
	Parallelism          int      `json:"parallelism"`
}

func (q *pullFromHostReq) validate() error {
	if err := q.hostFields.validate(); err != nil {
		return err
	}
	switch {
	case q.Path == "":
		return missing("path")
	case q.Name == "" && q.Parent == "" && q.InstallPath == "":
		return missing("name")
	case q.VolumeReadBandwidth < 0 || q.NetworkReadBandwidth < 0:
		return errors.New("bandwidth fields must not be negative")
	case q.Parallelism < 0:
		return fmt.Errorf("parallelism %d is negative", q.Parallelism)
	}
	return nil
}

type pullReply struct {
	importReply
	HostBytesRead  int64 `json:"hostBytesRead"`
	AllocatedBytes int64 `json:"allocatedBytes"` // guest bytes of the pulled layer's data clusters
}

// maxPullParallelism bounds the streams (and so memory: one chunk each).
const maxPullParallelism = 64

// pullFromHost reads one qcow2 layer (only its own allocated clusters) from
// a KVM host over SFTP, normalises it into a canonical layer on top of
// parent, commits it and records the image.
func (a *Agent) pullFromHost(w http.ResponseWriter, r *http.Request) {
	var req pullFromHostReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "pullfromhost", Backup: true, Err: err}, func(ctx context.Context, job *Job) (any, error) {
		h, err := a.sshHost(req.hostFields)
		if err != nil {
			return nil, err
		}
		var parent *blobstore.Image
		if req.Parent != "" {
			p, err := a.lookupImage(ctx, "parent", req.Parent)
			if err != nil {
				return nil, err
			}
			parent = &p
		}
		ref, err := a.newImageRef(req.InstallPath, req.Name, parent)
		if err != nil {
			return nil, err
		}
		if req.ID != "" && req.InstallPath == "" {
			ref.ID = req.ID
			if err := ref.Validate(); err != nil {
				return nil, fmt.Errorf("id: %w", err)
			}
		}
		job.SetImage(ref.Name, ref.InstallPath(), "qcow2")
		par := req.Parallelism
		if par == 0 {
			par = a.cfg.ParallelismDegree
		}
		st := a.hosts()
		res, err := pullLayer(ctx, pullSpec{
			Pool: st.pool, Host: h, Path: req.Path, Store: a.store, Parent: parent,
			Limiters:    []*ratelimit.Limiter{limiterFor(int64(req.VolumeReadBandwidth)), limiterFor(int64(req.NetworkReadBandwidth))},
			Parallelism: min(max(par, 1), maxPullParallelism),
			Lanes:       st.pullLanes(h),
			LaneRefused: func() { st.oneLane.Store(laneKey(h), time.Now()) },
			Job:         job, Counter: st.readBytes.Add, Log: a.log,
		})
		if err != nil {
			return nil, err
		}
		release := a.store.Hold(res.Blob)
		defer release()
		img, err := a.recordImage(ctx, NewImage{
			Ref: ref, Blob: res.Blob, Parent: parent, Size: res.Size,
			VirtualSize: res.VirtualSize, Format: "qcow2", Desc: req.Desc,
		})
		if err != nil {
			return nil, err
		}
		a.m.bytesIngested.Add(float64(res.HostBytesRead))
		return pullReply{importReply: importReplyFor(img, a.capacity()), HostBytesRead: res.HostBytesRead, AllocatedBytes: res.Allocated}, nil
	})
}

func limiterFor(bps int64) *ratelimit.Limiter {
	if bps <= 0 {
		return nil
	}
	return ratelimit.New(bps)
}

// pullSpec is one layer pull.
type pullSpec struct {
	Pool        *sshfs.Pool
	Host        sshfs.Host
	Path        string
	Store       *blobstore.Store
	Parent      *blobstore.Image // nil: the layer must have no backing file
	Limiters    []*ratelimit.Limiter
	Parallelism int
	Lanes       int           // SSH connections at most; default pullLanes
	LaneRefused func()        // called when an extra connection failed; may be nil
	Chunk       int64         // bytes per ranged read; default pullChunk
	Job         *Job          // progress; may be nil
	Counter     func(float64) // host bytes read, for the metric; may be nil
	Log         *slog.Logger
}

type pullResult struct {
	Blob          digest.Digest
	Size          int64
	VirtualSize   int64
	Allocated     int64
	HostBytesRead int64
	OnePass       bool // normalized while fetching (no all-zero data cluster)
}

// pullChunk is the size of one ranged read: large enough that the SFTP
// client keeps many requests in flight per stream.
const pullChunk = 8 << 20

// pullLayer reads the header and tables over SFTP (small reads), then the
// layer's data clusters — DataRanges, in host order, with Parallelism
// streams sharing one rate budget — into a local unlinked staging file, and
// normalizes the layer (qcow2.Normalize, as every other import) from there
// into a blobstore ingest.
//
// Why stage: the canonical layout puts metadata first, so the writer must
// know every cluster's stored form before it writes a data byte; staging
// keeps the host read to one pass. The staging file is sparse (only
// allocated clusters are written), lives on the store's filesystem and is
// unlinked at once, so a crash leaves nothing behind.
//
// Why speculate: the normalize runs while the fetch is still going, with
// qcow2.WriteOptions.AssumeNoZeroData (no scan pass; reads wait for their
// bytes to land), so its one read of the staged data trails the fetch
// instead of following it. If the layer turns out to have an all-zero data
// cluster, that ingest is dropped and Normalize runs again, normally, from
// the staged copy. Either way the output is Normalize's, byte for byte.
func pullLayer(ctx context.Context, s pullSpec) (pullResult, error) {
	var res pullResult
	// Every host read (and rate-limiter wait, and reconnect) runs on fctx,
	// so that cancelFetch stops them all at once after a normalize error.
	fctx, cancelFetch := context.WithCancel(ctx)
	defer cancelFetch()
	src, err := s.Pool.OpenReader(fctx, s.Host, s.Path, sshfs.ReadOptions{
		Lanes:       min(s.Parallelism, int(cmp(int64(s.Lanes), pullLanes))),
		LaneRefused: func(int, error) { callIf(s.LaneRefused) },
		OnRead: func(n int64) {
			if s.Job != nil {
				s.Job.Add(n)
			}
			if s.Counter != nil {
				s.Counter(float64(n))
			}
		},
	})
	if err != nil {
		return res, hostErr(s.Host, s.Path, err)
	}
	defer src.Close()
	limited := ratelimit.ReaderAt(fctx, src, s.Limiters...)
	staged := staging.New(limited)
	im, err := qcow2.Open(staged, src.Size())
	if err != nil {
		if errors.Is(err, qcow2.ErrNotQcow2) {
			return res, fmt.Errorf("%s:%s is not a qcow2 image: %w", s.Host.Addr, s.Path, err)
		}
		return res, fmt.Errorf("%s:%s: %w", s.Host.Addr, s.Path, err)
	}
	res.VirtualSize = im.VirtualSize()
	res.Allocated = im.AllocatedBytes()
	var opts qcow2.WriteOptions
	switch {
	case s.Parent != nil && s.Parent.VirtualSize != im.VirtualSize():
		return res, fmt.Errorf("%s:%s: virtual size %d differs from parent %s's %d; a delta must have its parent's size",
			s.Host.Addr, s.Path, im.VirtualSize(), s.Parent.Ref, s.Parent.VirtualSize)
	case s.Parent != nil:
		opts.BackingFile = blobstore.BackingName(s.Parent.Blob)
	case im.BackingFile() != "":
		return res, fmt.Errorf("%s:%s has backing file %q but no parent was given; pull the chain base first and name it as parent",
			s.Host.Addr, s.Path, im.BackingFile())
	}
	var ranges []parallel.Range
	var total int64
	for _, r := range im.DataRanges() {
		ranges = append(ranges, parallel.Range{Offset: r.Offset, Length: r.Length})
		total += r.Length
	}
	if s.Job != nil {
		s.Job.SetTotal(total)
	}

	stage, err := staging.TempFile(s.Store.Root(), ".hostpull-*")
	if err != nil {
		return res, fmt.Errorf("staging file: %w", err)
	}
	defer stage.Close()
	chunk := cmp(s.Chunk, pullChunk)
	staged.Start(stage, ranges, chunk, int(max(1, pullMemWindow/chunk)))
	staged.PunchConsumed(staging.PunchHole(stage))

	t0 := time.Now()
	fetched := make(chan error, 1)
	var fetchTime time.Duration
	go func() {
		err := staged.Fetch(fctx, limited, s.Parallelism)
		fetchTime = time.Since(t0)
		fetched <- err
	}()
	// waitFetch returns the fetch's error; after it, fetchTime is set.
	waitFetch := func() error {
		err := <-fetched
		fetched <- err
		return err
	}

	spec := opts
	spec.AssumeNoZeroData = true
	d, n, err := normalizeInto(ctx, s.Store, im, spec)
	onePass := err == nil
	if errors.Is(err, qcow2.ErrZeroData) {
		staged.PunchConsumed(nil) // the full normalize reads the data twice
		if err = waitFetch(); err == nil {
			err = staged.Refetch(ctx, limited, s.Parallelism)
		}
		if err == nil {
			d, n, err = normalizeInto(ctx, s.Store, im, opts)
		}
	}
	if err != nil {
		cancelFetch()
		if ferr := waitFetch(); ferr != nil && !errors.Is(ferr, context.Canceled) {
			return res, ferr // the cause; the normalize only saw its echo
		}
		return res, fmt.Errorf("normalizing %s:%s: %w", s.Host.Addr, s.Path, err)
	}
	if err := waitFetch(); err != nil {
		// Cannot happen after a complete normalize (it read every data
		// byte), but never store a layer from a fetch that failed.
		return res, err
	}
	res.Blob, res.Size, res.HostBytesRead, res.OnePass = d, n, src.BytesRead(), onePass
	s.Log.Info("layer pulled from host", "host", s.Host.Addr, "path", s.Path, "hostBytes", res.HostBytesRead,
		"fetch", fetchTime, "total", time.Since(t0), "onePass", onePass, "blob", d, "size", n)
	return res, nil
}

func callIf(f func()) {
	if f != nil {
		f()
	}
}

// normalizeInto normalizes im into a new ingest and commits it.
func normalizeInto(ctx context.Context, store *blobstore.Store, im *qcow2.Image, opts qcow2.WriteOptions) (digest.Digest, int64, error) {
	ing, err := store.Writer(ctx, "hostpull-"+randomHex(12))
	if err != nil {
		return "", 0, err
	}
	n, err := qcow2.Normalize(ctx, ing, im, opts)
	if err != nil {
		_ = ing.Cancel()
		return "", 0, err
	}
	d, err := ing.Commit(ctx, n, "")
	if err != nil {
		_ = ing.Cancel()
		return "", 0, fmt.Errorf("committing layer: %w", err)
	}
	_ = ing.Close()
	return d, n, nil
}

func cmp(v, def int64) int64 {
	if v > 0 {
		return v
	}
	return def
}

// pullMemWindow bounds the fetched pieces kept in memory for the
// speculative normalize (beyond it, pieces go to the staging file).
const pullMemWindow = 64 << 20

// pullLanes caps the SSH connections of one pull. Measured on the 2-core CI
// VM (bench/pull.sh, 4 GiB, parallelism 4, medians of 3-5 runs): one
// connection 254-299 MB/s, two 291-319 MB/s, four 263-287 MB/s; each lane
// is one more sshd process on the host and one more handshake.
const pullLanes = 2

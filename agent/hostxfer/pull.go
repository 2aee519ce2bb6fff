package hostxfer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"imagestore/agent/images"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/qcow2"
	"imagestore/transfer/parallel"
	"imagestore/transfer/ratelimit"
	"imagestore/transfer/sshfs"
	"imagestore/transfer/staging"
)

// PullRequest is one layer to pull from a host.
type PullRequest struct {
	Login
	Path string // of the qcow2 on the host
	// Parent is the image the layer is a delta on (an install path or
	// name:id); "" for a base, which must have no backing file.
	Parent string
	// The new image: InstallPath if set, else Name (else the parent's
	// name) with ID (else a fresh one).
	Name, ID, InstallPath string
	Desc                  string
	// Bandwidths in bytes per second (0: unlimited), one budget shared by
	// every stream of the pull.
	VolumeReadBandwidth, NetworkReadBandwidth int64
	// Parallelism is the streams of ranged reads (0: Options.Parallelism;
	// at most MaxParallelism).
	Parallelism int
	// Chunk is the bytes of one ranged read (0: PullChunk).
	Chunk int64
}

// PullResult is what a pull stored.
type PullResult struct {
	Image         blobstore.Image // the recorded layer
	HostBytesRead int64           // bytes received from the host, retries included
	Allocated     int64           // guest bytes of the layer's data clusters
	OnePass       bool            // normalized while fetching (no all-zero data cluster)
}

const (
	// MaxParallelism bounds the streams of a pull (and so memory: one
	// chunk each).
	MaxParallelism = 64
	// PullChunk is the default size of one ranged read: large enough
	// that the SFTP client keeps many requests in flight per stream.
	PullChunk = 8 << 20
	// MaxLanes caps the SSH connections of one pull. Measured on the
	// 2-core CI VM (bench/pull.sh, 4 GiB, parallelism 4, medians of 3-5
	// runs): one connection 254-299 MB/s, two 291-319 MB/s, four 263-287
	// MB/s; each lane is one more sshd process on the host and one more
	// handshake.
	MaxLanes = 2
	// memWindow bounds the fetched pieces kept in memory for the
	// speculative normalize (beyond it, pieces go to the staging file).
	memWindow = 64 << 20
)

// Pull reads one qcow2 layer (only its own allocated clusters) from a
// host over SFTP, normalizes it into a canonical layer on top of its
// parent, commits it and records the image. Progress counts the bytes of
// data clusters received.
//
// It reads the header and tables first (small reads), then the layer's
// data clusters in host order as ranged reads, with Parallelism streams
// over up to MaxLanes connections sharing one rate budget, into a local
// unlinked staging file (transfer/staging), and normalizes the layer from
// there into a blobstore ingest (layer.Store.Commit).
//
// Why stage: the canonical layout puts metadata first, so the writer must
// know every cluster's stored form before it writes a data byte; staging
// keeps the host read to one pass. The staging file is sparse, lives on
// the store's filesystem and is unlinked at once, so a crash leaves
// nothing behind.
//
// Why speculate: the normalize runs while the fetch is still going, with
// qcow2.WriteOptions.AssumeNoZeroData (no scan pass; reads wait for their
// bytes to land), so its one read of the staged data trails the fetch
// instead of following it. If the layer turns out to have an all-zero data
// cluster, that ingest is dropped and the layer normalized again,
// normally, from the staged copy. Either way the output is Normalize's,
// byte for byte.
func (s *Service) Pull(ctx context.Context, req PullRequest, p jobs.Progress) (PullResult, error) {
	if p == nil {
		p = jobs.Nop{}
	}
	h, err := s.host(req.Login)
	if err != nil {
		return PullResult{}, err
	}
	parent, ref, err := s.pullTarget(ctx, req)
	if err != nil {
		return PullResult{}, err
	}
	p.SetImage(ref.Name, ref.InstallPath(), "qcow2")
	par := req.Parallelism
	if par == 0 {
		par = s.parallelism
	}
	pl := &pull{
		s: s, req: req, host: h, parent: parent, ref: ref, progress: p,
		parallelism: min(max(par, 1), MaxParallelism),
		limiters:    []*ratelimit.Limiter{limiter(req.VolumeReadBandwidth), limiter(req.NetworkReadBandwidth)},
	}
	res, err := pl.run(ctx)
	if err != nil {
		return PullResult{}, err
	}
	if s.ingested != nil {
		s.ingested.Add(float64(res.HostBytesRead))
	}
	return res, nil
}

// pullTarget resolves the request's parent (nil for a base) and the new
// image's ref.
func (s *Service) pullTarget(ctx context.Context, req PullRequest) (*blobstore.Image, blobstore.Ref, error) {
	var parent *blobstore.Image
	if req.Parent != "" {
		p, err := s.images.Lookup(ctx, "parent", req.Parent)
		if err != nil {
			return nil, blobstore.Ref{}, err
		}
		parent = &p
	}
	ref, err := images.NewRef(req.InstallPath, req.Name, parent)
	if err != nil {
		return nil, blobstore.Ref{}, err
	}
	if req.ID != "" && req.InstallPath == "" {
		ref.ID = req.ID
		if err := ref.Validate(); err != nil {
			return nil, blobstore.Ref{}, fmt.Errorf("id: %w", err)
		}
	}
	return parent, ref, nil
}

func limiter(bps int64) *ratelimit.Limiter {
	if bps <= 0 {
		return nil
	}
	return ratelimit.New(bps)
}

// pull is one running Pull.
type pull struct {
	s           *Service
	req         PullRequest
	host        sshfs.Host
	parent      *blobstore.Image
	ref         blobstore.Ref
	progress    jobs.Progress
	parallelism int
	limiters    []*ratelimit.Limiter
}

// run pulls the layer: open the host file, check it fits the parent, then
// fetch and normalize at once (see Pull).
func (pl *pull) run(ctx context.Context) (PullResult, error) {
	var res PullResult
	// Every host read (and rate-limiter wait, and reconnect) runs on fctx,
	// so that cancelFetch stops them all at once after a normalize error.
	fctx, cancelFetch := context.WithCancel(ctx)
	defer cancelFetch()
	src, err := pl.open(fctx)
	if err != nil {
		return res, err
	}
	defer src.Close()
	limited := ratelimit.ReaderAt(fctx, src, pl.limiters...)
	staged := staging.New(limited)
	im, err := pl.parse(staged, src.Size())
	if err != nil {
		return res, err
	}
	res.Allocated = im.AllocatedBytes()
	var ranges []parallel.Range
	var total int64
	for _, r := range im.DataRanges() {
		ranges = append(ranges, parallel.Range{Offset: r.Offset, Length: r.Length})
		total += r.Length
	}
	pl.progress.SetTotal(total)

	stage, err := staging.TempFile(pl.s.layers.Blobs().Root(), ".hostpull-*")
	if err != nil {
		return res, fmt.Errorf("staging file: %w", err)
	}
	defer stage.Close()
	chunk := pl.req.Chunk
	if chunk <= 0 {
		chunk = PullChunk
	}
	staged.Start(stage, ranges, chunk, int(max(1, memWindow/chunk)))
	staged.PunchConsumed(staging.PunchHole(stage))

	t0 := time.Now()
	fetch := startFetch(fctx, staged, limited, pl.parallelism)
	img, onePass, err := pl.commit(ctx, im, staged, limited, fetch)
	if err != nil {
		cancelFetch()
		if ferr := fetch.wait(); ferr != nil && !errors.Is(ferr, context.Canceled) {
			return res, ferr // the cause; the normalize only saw its echo
		}
		return res, err
	}
	res.Image, res.HostBytesRead, res.OnePass = img, src.BytesRead(), onePass
	pl.s.log.Info("layer pulled from host", "host", pl.host.Addr, "path", pl.req.Path, "hostBytes", res.HostBytesRead,
		"fetch", fetch.took, "total", time.Since(t0), "onePass", onePass, "blob", img.Blob, "size", img.Size)
	return res, nil
}

// open opens the host file over as many lanes as the pull may use.
func (pl *pull) open(ctx context.Context) (*sshfs.Reader, error) {
	src, err := pl.s.pool.OpenReader(ctx, pl.host, pl.req.Path, sshfs.ReadOptions{
		Lanes:       min(pl.parallelism, pl.s.lanes(pl.host)),
		LaneRefused: func(int, error) { pl.s.laneRefused(pl.host) },
		OnRead: func(n int64) {
			pl.progress.Add(n)
			pl.s.readBytes.Add(float64(n))
		},
	})
	if err != nil {
		return nil, hostErr(pl.host, pl.req.Path, err)
	}
	return src, nil
}

// parse reads the layer's header and tables and checks that it fits the
// parent before any data moves.
func (pl *pull) parse(r *staging.Reader, size int64) (*qcow2.Image, error) {
	where := pl.host.Addr + ":" + pl.req.Path
	im, err := qcow2.Open(r, size)
	if err != nil {
		if errors.Is(err, qcow2.ErrNotQcow2) {
			return nil, fmt.Errorf("%s is not a qcow2 image: %w", where, err)
		}
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	if err := layer.CheckParent(im, pl.parent); err != nil {
		if pl.parent == nil {
			return nil, fmt.Errorf("%s: %w; pull the chain base first and name it as parent", where, err)
		}
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	return im, nil
}

// fetch is the staging fetch running in the background.
type fetch struct {
	done chan error
	took time.Duration // set once done
}

func startFetch(ctx context.Context, staged *staging.Reader, src io.ReaderAt, workers int) *fetch {
	f := &fetch{done: make(chan error, 1)}
	t0 := time.Now()
	go func() {
		err := staged.Fetch(ctx, src, workers)
		f.took = time.Since(t0)
		f.done <- err
	}()
	return f
}

// wait returns the fetch's error once it ended; after it, took is set.
func (f *fetch) wait() error {
	err := <-f.done
	f.done <- err
	return err
}

// commit normalizes the layer into the store and records it: first while
// the fetch runs (AssumeNoZeroData), and if the layer has an all-zero data
// cluster, again from the staged copy, the pieces the first pass dropped
// fetched again.
func (pl *pull) commit(ctx context.Context, im *qcow2.Image, staged *staging.Reader, src io.ReaderAt, f *fetch) (blobstore.Image, bool, error) {
	img, err := pl.commitOnce(ctx, im, qcow2.WriteOptions{AssumeNoZeroData: true}, f)
	if !errors.Is(err, qcow2.ErrZeroData) {
		return img, err == nil, err
	}
	staged.PunchConsumed(nil) // the full normalize reads the data twice
	if err := f.wait(); err != nil {
		return img, false, err
	}
	if err := staged.Refetch(ctx, src, pl.parallelism); err != nil {
		return img, false, fmt.Errorf("normalizing %s:%s: %w", pl.host.Addr, pl.req.Path, err)
	}
	img, err = pl.commitOnce(ctx, im, qcow2.WriteOptions{}, f)
	return img, false, err
}

// commitOnce normalizes im with opts into a fresh ingest and, once the
// fetch ended well, records it. A failed normalize is wrapped with where
// it read from; qcow2.ErrZeroData stays matchable.
func (pl *pull) commitOnce(ctx context.Context, im *qcow2.Image, opts qcow2.WriteOptions, f *fetch) (blobstore.Image, error) {
	ingested := false
	img, err := pl.s.layers.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: pl.ref, Parent: pl.parent, Format: "qcow2", Desc: pl.req.Desc},
		Ingest:  "hostpull-" + randomHex(12),
		Content: layer.Normalize(im, pl.parent, opts),
		Verify: func(context.Context, layer.Layer) error {
			ingested = true
			// Cannot fail after a complete normalize (it read every data
			// byte), but never record a layer from a fetch that failed.
			return f.wait()
		},
	})
	if err != nil && !ingested {
		return img, fmt.Errorf("normalizing %s:%s: %w", pl.host.Addr, pl.req.Path, err)
	}
	return img, err
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

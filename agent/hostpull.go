package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/pkg/sftp"
	"golang.org/x/sys/unix"

	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/parallel"
	"imagestore/transfer/ratelimit"
	"imagestore/transfer/sshfs"
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
	src := &hostReader{pool: s.Pool, host: s.Host, path: s.Path, job: s.Job, counter: s.Counter,
		lanes: min(s.Parallelism, int(cmp(int64(s.Lanes), pullLanes))), laneRefused: s.LaneRefused, log: s.Log}
	if err := src.open(fctx); err != nil {
		return res, err
	}
	defer src.Close()
	limited := ratelimit.ReaderAt(fctx, src, s.Limiters...)
	staged := &stagedReaderAt{remote: limited}
	im, err := qcow2.Open(staged, src.size)
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
	ranges := im.DataRanges()
	var total int64
	for _, r := range ranges {
		total += r.Length
	}
	if s.Job != nil {
		s.Job.SetTotal(total)
	}

	stage, err := os.CreateTemp(s.Store.Root(), ".hostpull-*")
	if err != nil {
		return res, fmt.Errorf("staging file: %w", err)
	}
	_ = os.Remove(stage.Name())
	defer stage.Close()
	chunk := cmp(s.Chunk, pullChunk)
	pieces := splitRanges(ranges, chunk)
	staged.start(stage, ranges, pieces, int(max(1, pullMemWindow/chunk)))
	staged.punchConsumed(func(off, n int64) error {
		return unix.Fallocate(int(stage.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	})

	t0 := time.Now()
	fetched := make(chan error, 1)
	var fetchTime time.Duration
	go func() {
		err := fetchPieces(fctx, limited, pieces, s.Parallelism, staged.bufs, staged.deliver)
		fetchTime = time.Since(t0)
		staged.finish(err)
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
		staged.punchConsumed(nil) // the full normalize reads the data twice
		if err = waitFetch(); err == nil {
			err = refetchPunched(ctx, stage, limited, staged, s.Parallelism)
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
	res.Blob, res.Size, res.HostBytesRead, res.OnePass = d, n, src.read.Load(), onePass
	s.Log.Info("layer pulled from host", "host", s.Host.Addr, "path", s.Path, "hostBytes", res.HostBytesRead,
		"fetch", fetchTime, "total", time.Since(t0), "onePass", onePass, "blob", d, "size", n)
	return res, nil
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

// splitRanges cuts ranges into pieces of at most chunk bytes, in order.
func splitRanges(ranges []qcow2.HostRange, chunk int64) []parallel.Range {
	var pieces []parallel.Range
	for _, r := range ranges {
		for off := r.Offset; off < r.Offset+r.Length; off += chunk {
			pieces = append(pieces, parallel.Range{Offset: off, Length: min(chunk, r.Offset+r.Length-off)})
		}
	}
	return pieces
}

// pullMemWindow bounds the fetched pieces kept in memory for the
// speculative normalize (beyond it, pieces go to the staging file).
const pullMemWindow = 64 << 20

// pieceBufs is a pool of buffers of the largest piece's size.
func pieceBufs(pieces []parallel.Range) *sync.Pool {
	var chunk int64
	for _, p := range pieces {
		chunk = max(chunk, p.Length)
	}
	return &sync.Pool{New: func() any { b := make([]byte, chunk); return &b }}
}

// fetchPieces reads pieces of src with workers streams into buffers from
// bufs and hands piece i to sink, which either keeps the buffer (true) or
// is done with it on return. Workers take pieces in order, so the staged
// data grows roughly front to back. Memory: workers × the largest piece,
// plus what sinks keep.
func fetchPieces(ctx context.Context, src io.ReaderAt, pieces []parallel.Range, workers int, bufs *sync.Pool, sink func(i int, bp *[]byte) (bool, error)) error {
	return parallel.Do(ctx, len(pieces), workers, func(ctx context.Context, i int) error {
		p := pieces[i]
		bp := bufs.Get().(*[]byte)
		b := (*bp)[:p.Length]
		if _, err := io.ReadFull(io.NewSectionReader(src, p.Offset, p.Length), b); err != nil {
			bufs.Put(bp)
			return fmt.Errorf("reading host bytes [%d, +%d): %w", p.Offset, p.Length, err)
		}
		kept, err := sink(i, bp)
		if !kept {
			bufs.Put(bp)
		}
		if err != nil {
			return fmt.Errorf("staging: %w", err)
		}
		return ctx.Err()
	})
}

// refetchPunched reads the pieces the speculative normalize consumed (and
// so dropped from staging) from the host again, for the full normalize.
// Rare (a layer with an all-zero data cluster), and the host bytes count.
func refetchPunched(ctx context.Context, stage io.WriterAt, src io.ReaderAt, staged *stagedReaderAt, workers int) error {
	idx := staged.punchedPieces()
	pieces := make([]parallel.Range, len(idx))
	for i, k := range idx {
		pieces[i] = staged.pieces[k]
	}
	return fetchPieces(ctx, src, pieces, workers, pieceBufs(pieces), func(i int, bp *[]byte) (bool, error) {
		if err := stageWrite(stage, (*bp)[:pieces[i].Length], pieces[i].Offset); err != nil {
			return false, err
		}
		staged.unpunch(idx[i])
		return false, nil
	})
}

// stageWriteMax bounds one write to the staging file: the kernel sizes
// page-cache folios by the write's length, and huge ones (multi-MiB
// writes) can cost far more to fill than the copy (see blobstore's
// writeSyscallMax).
const stageWriteMax = 256 << 10

// stageWrite writes b at off in writes of at most stageWriteMax.
func stageWrite(w io.WriterAt, b []byte, off int64) error {
	for len(b) > 0 {
		n := min(len(b), stageWriteMax)
		if _, err := w.WriteAt(b[:n], off); err != nil {
			return err
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// errFetchEnded is what a read of a piece the fetch never delivered gets
// when the fetch ended without an error of its own (it cannot, but a reader
// must never block forever).
var errFetchEnded = errors.New("host fetch ended before the data arrived")

// stagingFile is the sparse local copy of the layer's data clusters.
type stagingFile interface {
	io.ReaderAt
	io.WriterAt
}

// stagedReaderAt serves reads inside the staged ranges from memory or the
// local file, waiting for the fetch to deliver the pieces they cover, and
// everything else (header and tables during Open) from the host.
//
// Up to memMax delivered pieces stay in memory while consumed pieces are
// being dropped (the speculative normalize trails the fetch closely, so
// most pieces are read from memory and never touch the file); the rest
// are written to the file.
type stagedReaderAt struct {
	remote io.ReaderAt
	bufs   *sync.Pool // piece buffers, shared with the fetch

	mu     sync.Mutex
	cond   sync.Cond
	local  stagingFile
	ranges []qcow2.HostRange
	pieces []parallel.Range
	have   []bool
	ended  bool
	err    error // the fetch's, once ended
	// waiters counts the readers in cond.Wait (lets tests order reads).
	waiters int

	// Punching (see punchConsumed): per piece, the bytes read from local,
	// the local reads in progress, and whether its staged bytes are gone.
	drop        bool                     // drop consumed pieces
	punch       func(off, n int64) error // drops a piece from the file
	punchBroken bool                     // punch failed once: keep file pieces
	consumed    []int64
	inflight    []int32
	punched     []bool    // dropped (from memory or the file)
	mem         []*[]byte // pieces held in memory
	memLeft     int       // pieces that may still be held in memory
}

// start switches data reads to local, pending the pieces' arrival.
func (s *stagedReaderAt) start(local stagingFile, ranges []qcow2.HostRange, pieces []parallel.Range, memMax int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cond.L = &s.mu
	s.local, s.ranges, s.pieces, s.have = local, ranges, pieces, make([]bool, len(pieces))
	s.consumed, s.inflight, s.punched = make([]int64, len(pieces)), make([]int32, len(pieces)), make([]bool, len(pieces))
	s.mem, s.memLeft, s.bufs = make([]*[]byte, len(pieces)), memMax, pieceBufs(pieces)
}

// deliver takes fetched piece i: into memory while dropping and within
// the window, else into the staging file.
func (s *stagedReaderAt) deliver(i int, bp *[]byte) (bool, error) {
	s.mu.Lock()
	if s.drop && s.memLeft > 0 {
		s.mem[i] = bp
		s.memLeft--
		s.have[i] = true
		s.mu.Unlock()
		s.cond.Broadcast()
		return true, nil
	}
	s.mu.Unlock()
	p := s.pieces[i]
	if err := stageWrite(s.local, (*bp)[:p.Length], p.Offset); err != nil {
		return false, err
	}
	s.done(i)
	return false, nil
}

// punchConsumed makes every piece whose bytes have all been read once from
// the staging file get dropped from it with punch (a hole punched in the
// file), so its page-cache pages are discarded, dirty or not, instead of
// being written back to disk: under AssumeNoZeroData the normalize reads
// each data byte once, so the staged copy is dead weight as soon as it has
// been read. A read that still needs a punched piece (overlapping
// compressed clusters, or a normalize that re-reads) goes to the host,
// counted like any host read; after a fallback, unpunch restores them.
// Pieces held in memory are dropped the same way, without a syscall.
// punch nil stops dropping (pieces already in memory stay there).
func (s *stagedReaderAt) punchConsumed(punch func(off, n int64) error) {
	s.mu.Lock()
	s.drop, s.punch, s.punchBroken = punch != nil, punch, false
	s.mu.Unlock()
}

// punchedPieces lists the pieces whose staged bytes were dropped.
func (s *stagedReaderAt) punchedPieces() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for k, p := range s.punched {
		if p {
			out = append(out, k)
		}
	}
	return out
}

// unpunch marks piece k staged again (the caller re-fetched it).
func (s *stagedReaderAt) unpunch(k int) {
	s.mu.Lock()
	s.punched[k], s.consumed[k] = false, 0
	s.mu.Unlock()
}

func (s *stagedReaderAt) done(i int) {
	s.mu.Lock()
	s.have[i] = true
	s.mu.Unlock()
	s.cond.Broadcast()
}

// finish records the end of the fetch and wakes every waiting reader.
func (s *stagedReaderAt) finish(err error) {
	s.mu.Lock()
	s.ended = true
	s.err = cmpErr(err, errFetchEnded)
	s.mu.Unlock()
	s.cond.Broadcast()
}

func cmpErr(err, def error) error {
	if err != nil {
		return err
	}
	return def
}

func (s *stagedReaderAt) ReadAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	local, ranges := s.local, s.ranges
	if local == nil {
		s.mu.Unlock()
		return s.remote.ReadAt(p, off)
	}
	end := off + int64(len(p))
	i := sort.Search(len(ranges), func(i int) bool { return ranges[i].Offset+ranges[i].Length > off })
	if i == len(ranges) || ranges[i].Offset > off || end > ranges[i].Offset+ranges[i].Length {
		s.mu.Unlock()
		return s.remote.ReadAt(p, off)
	}
	// Wait for the pieces covering [off, end): consecutive, as pieces are
	// sorted and tile each range. After a wait the check starts over: while
	// the lock was released another read may have dropped a piece already
	// checked, and only a check done in one hold of the lock, ending with
	// inflight raised below, keeps the pieces from being dropped under us.
	first := sort.Search(len(s.pieces), func(k int) bool { return s.pieces[k].Offset+s.pieces[k].Length > off })
	last := first
	for last < len(s.pieces) && s.pieces[last].Offset < end {
		if !s.have[last] {
			if s.ended {
				err := s.err
				s.mu.Unlock()
				return 0, err
			}
			s.waiters++
			s.cond.Wait()
			s.waiters--
			last = first
			continue
		}
		if s.punched[last] {
			s.mu.Unlock()
			return s.remote.ReadAt(p, off)
		}
		last++
	}
	var memBuf [4]*[]byte
	mem := memBuf[:0]
	for k := first; k < last; k++ {
		s.inflight[k]++
		mem = append(mem, s.mem[k]) // stays valid while inflight
	}
	s.mu.Unlock()
	var err error
	for k := first; k < last && err == nil; k++ {
		pc := s.pieces[k]
		a, b := max(off, pc.Offset), min(end, pc.Offset+pc.Length)
		if m := mem[k-first]; m != nil {
			copy(p[a-off:b-off], (*m)[a-pc.Offset:b-pc.Offset])
			continue
		}
		var n int
		if n, err = local.ReadAt(p[a-off:b-off], a); n == int(b-a) {
			err = nil
		} else if err == nil {
			err = io.ErrUnexpectedEOF
		}
	}

	s.mu.Lock()
	var drop []int
	for k := first; k < last; k++ {
		pc := s.pieces[k]
		s.inflight[k]--
		s.consumed[k] += min(end, pc.Offset+pc.Length) - max(off, pc.Offset)
		if !s.drop || s.punched[k] || s.inflight[k] > 0 || s.consumed[k] < pc.Length {
			continue
		}
		switch {
		case s.mem[k] != nil:
			s.punched[k] = true
			s.bufs.Put(s.mem[k])
			s.mem[k] = nil
			s.memLeft++
		case !s.punchBroken:
			s.punched[k] = true // from now on reads of k go to the host
			drop = append(drop, k)
		}
	}
	punch := s.punch
	s.mu.Unlock()
	for _, k := range drop {
		if perr := punch(s.pieces[k].Offset, s.pieces[k].Length); perr != nil {
			// Not supported here (or failed): keep the bytes, stop trying.
			s.mu.Lock()
			s.punched[k], s.punchBroken = false, true
			s.mu.Unlock()
		}
	}
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// hostReader is the remote file as an io.ReaderAt that counts the bytes it
// receives and survives lost connections: sshfs already reconnects a few
// times inside one ReadAt; when that gives up, hostReader reopens the file
// (refusing if its size or mtime changed) and retries, up to hostRetries.
//
// It reads over up to lanes SSH connections (sshfs.Host.Lane), taking them
// in turn, so that parallel reads do not all queue behind one sshd process
// and one connection's channel window.
type hostReader struct {
	pool    *sshfs.Pool
	host    sshfs.Host
	path    string
	job     *Job
	counter func(float64)
	lanes   int          // connections to read over; <= 1 means one
	log     *slog.Logger // may be nil
	// laneRefused, if set, is called when an extra lane fails to open.
	laneRefused func()

	ctx   context.Context // bounds reconnects (ReadAt has none); set by open
	read  atomic.Int64
	size  int64
	mtime time.Time
	next  atomic.Uint32 // the lane of the next read

	mu        sync.Mutex
	files     []sshfs.File                                            // one per lane; nil after Close
	gens      []int                                                   // per lane, bumped on each reopen
	reopening map[int]chan struct{}                                   // lanes being reopened; closed when done
	retries   int                                                     // reopens so far, all lanes together
	dialLane  func(ctx context.Context, lane int) (sshfs.File, error) // tests: replaces openLane in reopen
}

const hostRetries = 8

// pullLanes caps the SSH connections of one pull. Measured on the 2-core CI
// VM (bench/pull.sh, 4 GiB, parallelism 4, medians of 3-5 runs): one
// connection 254-299 MB/s, two 291-319 MB/s, four 263-287 MB/s; each lane
// is one more sshd process on the host and one more handshake.
const pullLanes = 2

func (h *hostReader) open(ctx context.Context) error {
	f, err := h.openOn(ctx, 0)
	if err != nil {
		return err
	}
	h.files, h.gens, h.size, h.mtime, h.ctx = []sshfs.File{f}, []int{0}, f.Size(), f.ModTime(), ctx
	for lane := 1; lane < h.lanes; lane++ {
		// A lane that cannot open (the host limits connections, say) only
		// costs parallelism: read over the lanes that did.
		g, err := h.openLane(ctx, lane)
		if cerr := ctx.Err(); cerr != nil || errors.Is(err, errFileChanged) {
			if g != nil {
				_ = g.Close()
			}
			_ = h.Close()
			return cmpErr(err, cerr)
		}
		if err != nil {
			if h.log != nil {
				h.log.Warn("pull: reading over fewer connections", "host", h.host.Addr, "path", h.path, "lanes", lane, "err", err)
			}
			if h.laneRefused != nil {
				h.laneRefused()
			}
			break
		}
		h.files, h.gens = append(h.files, g), append(h.gens, 0)
	}
	return nil
}

// openOn opens the file on lane's connection.
func (h *hostReader) openOn(ctx context.Context, lane int) (sshfs.File, error) {
	host := h.host
	host.Lane = lane
	f, err := h.pool.Open(ctx, host, h.path)
	if err != nil {
		return nil, hostErr(h.host, h.path, err)
	}
	return f, nil
}

// openLane opens the file on lane's connection, refusing a file that is
// not the one the other lanes read (its size or mtime changed).
func (h *hostReader) openLane(ctx context.Context, lane int) (sshfs.File, error) {
	f, err := h.openOn(ctx, lane)
	if err != nil {
		return nil, err
	}
	if f.Size() != h.size || !f.ModTime().Equal(h.mtime) {
		_ = f.Close()
		return nil, fmt.Errorf("%s:%s %w (size %d→%d); not storing a mixed layer", h.host.Addr, h.path, errFileChanged, h.size, f.Size())
	}
	return f, nil
}

// errFileChanged: the host file's size or mtime changed during the pull.
var errFileChanged = errors.New("changed while being pulled")

func (h *hostReader) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var err error
	for _, f := range h.files {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	h.files = nil
	return err
}

func (h *hostReader) ReadAt(p []byte, off int64) (int, error) {
	// sshfs already reads on after a short answer inside the file; this
	// loop keeps hostReader a strict io.ReaderAt over any sshfs.File (a
	// short read inside the file is read on, or says why it stopped).
	var done int
	for {
		n, err := h.readAt(p[done:], off+int64(done))
		done += n
		if n == 0 || done == len(p) || !errors.Is(err, io.EOF) || off+int64(done) >= h.size {
			if done < len(p) && err == nil { // io.ReaderAt: a short read says why
				err = io.ErrUnexpectedEOF
				if off+int64(done) >= h.size {
					err = io.EOF
				}
			}
			return done, err
		}
	}
}

func (h *hostReader) readAt(p []byte, off int64) (int, error) {
	for {
		h.mu.Lock()
		if h.files == nil {
			h.mu.Unlock()
			return 0, os.ErrClosed
		}
		lane := int(h.next.Add(1) % uint32(len(h.files)))
		f, gen := h.files[lane], h.gens[lane]
		h.mu.Unlock()
		n, err := f.ReadAt(p, off)
		if n > 0 {
			h.read.Add(int64(n))
			if h.job != nil {
				h.job.Add(int64(n))
			}
			if h.counter != nil {
				h.counter(float64(n))
			}
		}
		if err == nil || n == len(p) || errors.Is(err, io.EOF) || !retryable(err) {
			if err != nil && !errors.Is(err, io.EOF) {
				err = hostErr(h.host, h.path, err)
			}
			return n, err
		}
		if rerr := h.reopen(lane, gen, err); rerr != nil {
			return n, rerr
		}
		// Retry the whole read: the bytes read so far are read again (and counted again).
	}
}

// retryable tells a lost connection from a definite answer.
func retryable(err error) bool {
	var se *sftp.StatusError
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, sshfs.ErrHostKey), errors.Is(err, sshfs.ErrAuth), errors.As(err, &se):
		return false
	}
	return true
}

// reopen replaces lane's file of generation gen with one on a fresh
// connection, after a backoff; if another reader already did, it does
// nothing, and while one reopen of a lane runs, other readers of that lane
// wait for it. The lock is not held meanwhile, so reads on the other lanes
// go on.
func (h *hostReader) reopen(lane, gen int, cause error) error {
	h.mu.Lock()
	for {
		if h.files == nil {
			h.mu.Unlock()
			return os.ErrClosed
		}
		if h.gens[lane] != gen {
			h.mu.Unlock()
			return nil // another reader already reopened
		}
		busy := h.reopening[lane]
		if busy == nil {
			break
		}
		h.mu.Unlock()
		<-busy
		h.mu.Lock()
	}
	if h.retries >= hostRetries {
		h.mu.Unlock()
		return fmt.Errorf("%s:%s: giving up after %d reconnects: %w", h.host.Addr, h.path, h.retries, cause)
	}
	h.retries++
	retries := h.retries
	done := make(chan struct{})
	if h.reopening == nil {
		h.reopening = map[int]chan struct{}{}
	}
	h.reopening[lane] = done
	h.mu.Unlock()

	f, err := h.redial(lane, retries, cause)

	h.mu.Lock()
	delete(h.reopening, lane)
	close(done)
	if err != nil {
		h.mu.Unlock()
		return err
	}
	if h.files == nil { // closed meanwhile
		h.mu.Unlock()
		_ = f.Close()
		return os.ErrClosed
	}
	old := h.files[lane]
	h.files[lane] = f
	h.gens[lane]++
	h.mu.Unlock()
	_ = old.Close()
	return nil
}

// redial waits a backoff growing with retries, then opens the file on
// lane's connection again.
func (h *hostReader) redial(lane, retries int, cause error) (sshfs.File, error) {
	ctx := h.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	backoff := time.NewTimer(time.Duration(retries) * 100 * time.Millisecond)
	defer backoff.Stop()
	select {
	case <-ctx.Done():
		return nil, fmt.Errorf("%s:%s: reconnect after %w: %w", h.host.Addr, h.path, cause, ctx.Err())
	case <-backoff.C:
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	openLane := h.openLane
	if h.dialLane != nil {
		openLane = h.dialLane
	}
	f, err := openLane(ctx, lane)
	if err != nil {
		return nil, fmt.Errorf("%s:%s: reconnect after %w: %w", h.host.Addr, h.path, cause, err)
	}
	return f, nil
}

package main

import (
	"imagestore/internal/fsutil"
	"imagestore/internal/retry"

	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/qcow2"
	"imagestore/transfer/oci"
	"imagestore/transfer/parallel"
	"imagestore/transfer/ratelimit"
)

type pullResult struct {
	Name        string `json:"name"`
	ID          string `json:"id"`
	InstallPath string `json:"installPath"`
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtualsize"`
	Size        int64  `json:"size"` // bytes written to installPath
	Layers      int    `json:"layers"`
}

func cmdPull(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("pull")
	dst := fs.String("installpath", "", "destination file (written atomically)")
	format := fs.String("format", "qcow2", "output format: qcow2 or raw (qcow2 chains only)")
	conc := fs.Int("concurrency", 4, "layers downloaded in parallel")
	verify := fs.Bool("verify", true, "check every layer against its digest (the bytes the flatten reads are hashed in order, what it skips is read for the hash); DST is replaced only if all match")
	var bw byteFlag
	fs.Var(&bw, "bwlimit", "download limit in bytes/s shared by all layers (suffixes K, M, G; 0 = none)")
	if g.face == faceZstcli {
		fs.Bool("shared", false, "the destination is shared storage (accepted)")
	}
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *dst == "" {
		return usageErr("pull -installpath DST name:id")
	}
	if strings.Contains(*dst, "://") {
		return fmt.Errorf("-installpath %s: only local files can be written", *dst)
	}
	if *format != "qcow2" && *format != "raw" {
		return usageErr("-format must be qcow2 or raw")
	}
	if *conc < 1 {
		return usageErr("-concurrency must be at least 1")
	}
	c, ri, err := g.openImage(ctx, pos[0])
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()

	var total int64
	for _, l := range ri.Manifest.Layers {
		total += l.Size
	}
	p := g.newPhase("pull", total, 0, 99)
	defer p.Done()
	lim := ratelimit.New(bw.v)
	top := ri.Top()
	var written int64
	if top.Format != "qcow2" {
		// An opaque blob (a database dump): the layer is the content.
		if len(ri.Chain) != 1 {
			return fmt.Errorf("image %s: %s chain of %d layers cannot be pulled", ri.Ref, top.Format, len(ri.Chain))
		}
		written, err = fsutil.WriteFunc(*dst, 0o600, func(w io.Writer) (int64, error) {
			return downloadBlob(ctx, c, ri.Ref.Name, ri.Manifest.Layers[0], w, lim, p.Add)
		})
	} else {
		written, err = flattenRemote(ctx, c, ri, *dst, *format, *conc, lim, p, *verify)
	}
	if err != nil {
		return err
	}
	if g.face == faceZstcli {
		if err := writeImf(*dst, infoOf(top)); err != nil {
			return err
		}
	}
	res := pullResult{Name: ri.Ref.Name, ID: ri.Ref.ID, InstallPath: *dst, Format: *format, VirtualSize: top.VirtualSize, Size: written, Layers: len(ri.Chain)}
	if top.Format != "qcow2" {
		res.Format = top.Format
	}
	return g.printOutcome(res, func(w io.Writer) {
		fmt.Fprintf(w, "%s:%s -> %s (%s, %d layers, %d bytes)\n", res.Name, res.ID, res.InstallPath, res.Format, res.Layers, res.Size)
	})
}

// Pull's range reads: 1 MiB pieces, and a lag that covers how far apart
// the flatten's parallel readers can be (its workers + 2 guest chunks of
// 4 MiB, each up to 4 MiB of pieces plus range boundaries).
const (
	pullPiece = 1 << 20
	pullLag   = 24
)

// flattenRemote flattens the stored chain into dst while it arrives: the
// layers are opened over range reads of their blobs (the reader fetches
// only the tables), in the records' order (never by the backing names
// inside them); the chain's read plan (qcow2.Chain.ReadPlan: the bytes of
// each layer the flatten will read, in the order it reads them) is fetched
// ahead by conc workers in 1 MiB pieces through one
// parallel.Prefetcher, so memory is bounded by the window whatever the
// chain's size or depth, and nothing is staged on disk. The output goes
// through fsutil.WriteFunc: DST is untouched or complete. raw is written
// sparse (zeros are holes; the file gets its full size).
//
// A range cannot be checked against the layer's digest. With verify, each
// layer's bytes are hashed in order as the flatten reads them, and what it
// does not read (a base's clusters a delta overrides) is read for the hash
// afterwards (layerHasher); DST is replaced only once every layer hashed
// to its digest: a blob damaged at rest on the store fails the pull.
// Without, the store is trusted for the bytes as for the records (each
// layer is still parsed by our hardened reader, which bounds everything).
func flattenRemote(ctx context.Context, c *oci.Client, ri *remoteImage, dst, format string, conc int, lim *ratelimit.Limiter, p *progress, verify bool) (int64, error) {
	opts := qcow2.WriteOptions{AssumeNoZeroData: true}
	for {
		n, err := flattenOnce(ctx, c, ri, dst, format, conc, lim, p, opts, verify)
		if errors.Is(err, qcow2.ErrZeroData) && opts.AssumeNoZeroData {
			// A layer with an all-zero data cluster (not one we wrote):
			// the writer's scan pass lays it out.
			opts.AssumeNoZeroData = false
			continue
		}
		return n, err
	}
}

// flattenOnce writes the chain into DST's temp file; with verify, every
// layer must hash to its digest before the temp file replaces DST.
func flattenOnce(ctx context.Context, c *oci.Client, ri *remoteImage, dst, format string, conc int, lim *ratelimit.Limiter, p *progress, opts qcow2.WriteOptions, verify bool) (int64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	space := &layerSpace{}
	var hashers []*layerHasher
	for _, l := range ri.Manifest.Layers {
		space.bases = append(space.bases, space.size)
		var r io.ReaderAt = c.BlobReaderAt(ctx, ri.Ref.Name, l.Digest, l.Size)
		if verify {
			h := newLayerHasher(r, ratelimit.ReaderAt(ctx, r, lim), l.Digest, l.Size)
			defer h.Close()
			hashers = append(hashers, h)
			r = h
		}
		space.readers = append(space.readers, r)
		space.size += l.Size
	}
	check := func() error {
		for _, h := range hashers {
			if err := h.Finish(ctx); err != nil {
				return err
			}
		}
		return nil
	}
	var src io.ReaderAt = &countingReaderAt{r: space, add: p.Add}
	src = ratelimit.ReaderAt(ctx, src, lim)
	sw := &switchReaderAt{}
	sw.r.Store(&src)
	layers := make([]*qcow2.Image, len(ri.Chain))
	for i, img := range ri.Chain {
		l := ri.Manifest.Layers[i]
		im, err := qcow2.Open(io.NewSectionReader(sw, space.bases[i], l.Size), l.Size)
		if err != nil {
			return 0, fmt.Errorf("layer %s of %s: %w", img.Blob, img.Ref, err)
		}
		layers[len(layers)-1-i] = im // top first
	}
	chain, err := qcow2.NewChain(layers...)
	if err != nil {
		return 0, err
	}
	var ranges []parallel.Range
	perLayer := make([][]parallel.Range, len(layers))
	for _, r := range chain.ReadPlan() {
		i := len(layers) - 1 - r.Layer // plan layers are top first
		ranges = append(ranges, parallel.Range{Offset: space.bases[i] + r.Offset, Length: r.Length})
		perLayer[i] = append(perLayer[i], parallel.Range{Offset: r.Offset, Length: r.Length})
	}
	for i, h := range hashers {
		h.setPlan(perLayer[i])
	}
	pf := parallel.NewPrefetcherLag(ctx, src, ranges, conc, pullPiece, pullLag)
	defer pf.Close()
	var data io.ReaderAt = pf
	sw.r.Store(&data)
	return fsutil.WriteFunc(dst, 0o600, func(w io.Writer) (int64, error) {
		// WriteFunc's writer is its temp *os.File. The disk takes the
		// output as it is written, not all at the final fsync: raw on a
		// local file system in aligned 4 MiB pieces with O_DIRECT (no
		// page-cache copy, no write-back later), the rest through
		// write-behind.
		f := w.(*os.File)
		var n int64
		var err error
		var dw *fsutil.DirectWriter
		if format == "raw" {
			dw = fsutil.NewDirectWriter(f)
		}
		if dw != nil {
			n, err = qcow2.FlattenRawSparse(ctx, dw, chain)
			// A background flush's failure (the device refused to make
			// the file durable) fails the pull as the fsync would.
			if cerr := dw.Close(); err == nil {
				err = cerr
			}
		} else {
			wb := fsutil.NewWriteBehind(f, 0)
			defer wb.Close()
			if format == "raw" {
				n, err = qcow2.FlattenRawSparse(ctx, wb, chain)
			} else {
				n, err = qcow2.Flatten(ctx, wb, chain, format, opts)
			}
		}
		if err == nil {
			err = check()
		}
		return n, err
	})
}

// layerSpace lays the chain's blobs end to end (base first), so one
// prefetcher plans reads over all of them; no read crosses a blob's end
// (each layer reads through its own section).
type layerSpace struct {
	bases   []int64
	readers []io.ReaderAt
	size    int64
}

func (s *layerSpace) ReadAt(p []byte, off int64) (int, error) {
	i := sort.Search(len(s.bases), func(i int) bool { return s.bases[i] > off }) - 1
	if i < 0 || off >= s.size {
		return 0, io.EOF
	}
	return s.readers[i].ReadAt(p, off-s.bases[i])
}

// switchReaderAt reads through whichever reader was stored last: the
// layers' tables are read directly, their data through the prefetcher
// built from the plan the tables give.
type switchReaderAt struct{ r atomic.Pointer[io.ReaderAt] }

func (s *switchReaderAt) ReadAt(p []byte, off int64) (int, error) {
	return (*s.r.Load()).ReadAt(p, off)
}

type countingReaderAt struct {
	r   io.ReaderAt
	add func(int64)
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.add(int64(n))
	return n, err
}

// downloadBlob streams blob l into w, hashing as it writes; a cut
// connection resumes with a Range request from the bytes already written
// (the hash state carries over, so every byte is hashed once, in order).
func downloadBlob(ctx context.Context, c *oci.Client, name string, l oci.Descriptor, w io.Writer, lim *ratelimit.Limiter, add func(int64)) (int64, error) {
	h := sha256.New()
	var off int64
	// Up to 6 resumes, 200 ms doubling to 1 s, each from the bytes written.
	policy := retry.Policy{Attempts: 7, Initial: 200 * time.Millisecond, Max: time.Second, Jitter: 0.2, Retryable: retryable}
	err := policy.Do(ctx, func(ctx context.Context, _ int) error {
		return fetchFrom(ctx, c, name, l, w, h, &off, lim, add)
	})
	if ctx.Err() != nil {
		return off, ctx.Err()
	}
	if err != nil {
		return off, fmt.Errorf("download %s: %w", l.Digest, err)
	}
	if got := digest.NewDigest(digest.SHA256, h); got != l.Digest {
		return off, fmt.Errorf("download %s: %w: got %s", l.Digest, oci.ErrDigestInvalid, got)
	}
	return off, nil
}

func fetchFrom(ctx context.Context, c *oci.Client, name string, l oci.Descriptor, f io.Writer, h hash.Hash, off *int64, lim *ratelimit.Limiter, add func(int64)) error {
	if *off >= l.Size {
		if *off > l.Size {
			return fmt.Errorf("%w: blob longer than %d bytes", oci.ErrTooLarge, l.Size)
		}
		return nil
	}
	rc, err := c.GetBlob(ctx, name, l.Digest, *off, l.Size)
	if err != nil {
		return err
	}
	defer rc.Close()
	buf := make([]byte, 1<<20)
	r := ratelimit.Reader(ctx, rc, lim)
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			if _, err := f.Write(buf[:n]); err != nil {
				return err
			}
			h.Write(buf[:n])
			*off += int64(n)
			add(int64(n))
		}
		if rerr == io.EOF {
			if *off < l.Size {
				return io.ErrUnexpectedEOF
			}
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// retryable: anything but a definite answer from the server or a local
// write failure is a transport problem (a cut mid-body surfaces as an
// unexpected EOF, a reset, or a zstd frame error), worth a resume.
func retryable(err error) bool {
	var oe *oci.Error
	if errors.As(err, &oe) {
		return oe.Temporary()
	}
	var pe *os.PathError
	return !errors.Is(err, oci.ErrTooLarge) && !errors.As(err, &pe) && !errors.Is(err, syscall.ENOSPC)
}

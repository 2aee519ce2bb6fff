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
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"imagestore/qcow2"
	"imagestore/transfer/oci"
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
	dir := filepath.Dir(*dst)
	work, err := os.MkdirTemp(dir, ".imagestore-pull-*")
	if err != nil {
		return fmt.Errorf("installpath: %w", err)
	}
	defer os.RemoveAll(work)

	var total int64
	for _, l := range ri.Manifest.Layers {
		total += l.Size
	}
	p := g.newPhase("pull", total, 0, 90)
	lim := ratelimit.New(bw.v)
	paths := make([]string, len(ri.Manifest.Layers))
	grp, gctx := errgroup.WithContext(ctx)
	grp.SetLimit(*conc)
	for i, l := range ri.Manifest.Layers {
		paths[i] = filepath.Join(work, l.Digest.Encoded())
		grp.Go(func() error { return downloadBlob(gctx, c, ri.Ref.Name, l, paths[i], lim, p) })
	}
	err = grp.Wait()
	p.Done()
	if err != nil {
		return err
	}

	top := ri.Top()
	var written int64
	if top.Format != "qcow2" {
		// An opaque blob (a database dump): the layer is the content.
		if len(ri.Chain) != 1 {
			return fmt.Errorf("image %s: %s chain of %d layers cannot be pulled", ri.Ref, top.Format, len(ri.Chain))
		}
		written, err = fsutil.WriteFunc(*dst, 0o600, func(w io.Writer) (int64, error) {
			f, err := os.Open(paths[0])
			if err != nil {
				return 0, err
			}
			defer f.Close()
			return io.Copy(w, f)
		})
	} else {
		written, err = flattenTo(ctx, g, ri, paths, *dst, *format)
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

// flattenTo opens the downloaded layers as a chain (in the records' order,
// never by the backing names inside them) and writes it flattened.
func flattenTo(ctx context.Context, g *globals, ri *remoteImage, paths []string, dst, format string) (int64, error) {
	layers := make([]*qcow2.Image, len(paths))
	for i := range paths {
		f, err := os.Open(paths[i])
		if err != nil {
			return 0, err
		}
		defer f.Close()
		im, err := qcow2.Open(f, ri.Chain[i].Size)
		if err != nil {
			return 0, fmt.Errorf("layer %s of %s: %w", ri.Chain[i].Blob, ri.Chain[i].Ref, err)
		}
		layers[len(paths)-1-i] = im // top first
	}
	chain, err := qcow2.NewChain(layers...)
	if err != nil {
		return 0, err
	}
	p := g.newProgress("flatten", 0)
	defer p.Done()
	return fsutil.WriteFunc(dst, 0o600, func(w io.Writer) (int64, error) {
		n, err := qcow2.Flatten(ctx, w, chain, format, qcow2.WriteOptions{})
		p.Add(n)
		return n, err
	})
}

// downloadBlob fetches blob l into path, hashing as it writes; a cut
// connection resumes with a Range request from the bytes already on disk
// (the hash state carries over, so every byte is hashed once, in order).
func downloadBlob(ctx context.Context, c *oci.Client, name string, l oci.Descriptor, path string, lim *ratelimit.Limiter, p *progress) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	var off int64
	// Up to 6 resumes, 200 ms doubling to 1 s, each from the bytes on disk.
	policy := retry.Policy{Attempts: 7, Initial: 200 * time.Millisecond, Max: time.Second, Jitter: 0.2, Retryable: retryable}
	err = policy.Do(ctx, func(ctx context.Context, _ int) error {
		return fetchFrom(ctx, c, name, l, f, h, &off, lim, p)
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		return fmt.Errorf("download %s: %w", l.Digest, err)
	}
	if got := digest.NewDigest(digest.SHA256, h); got != l.Digest {
		return fmt.Errorf("download %s: %w: got %s", l.Digest, oci.ErrDigestInvalid, got)
	}
	return f.Sync()
}

func fetchFrom(ctx context.Context, c *oci.Client, name string, l oci.Descriptor, f *os.File, h hash.Hash, off *int64, lim *ratelimit.Limiter, p *progress) error {
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
			p.Add(int64(n))
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

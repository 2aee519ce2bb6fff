package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/oci"
	"imagestore/transfer/parallel"
	"imagestore/transfer/ratelimit"
)

type pushResult struct {
	Name        string `json:"name"`
	ID          string `json:"id"`
	VirtualSize int64  `json:"virtualsize"`
	Size        int64  `json:"size"`
	Blobsum     string `json:"blobsum"`
	Parent      string `json:"parent,omitempty"`
	// Sent is how many layer bytes went over the wire (0 when the store had the layer).
	Sent int64 `json:"sent"`
}

func cmdPush(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("push")
	conc := fs.Int("concurrency", 4, "parallel readers of a qcow2 FILE's data clusters while normalizing (the upload is one ordered stream)")
	parent := fs.String("parent", "", "parent image name:id (the file is a delta on top of it)")
	var bw byteFlag
	fs.Var(&bw, "bwlimit", "upload limit in bytes/s (suffixes K, M, G; 0 = none)")
	name := fs.String("name", "", "image name (default: the parent's name, else a new uuid)")
	id := fs.String("id", "", "image id (default: a new random id)")
	desc := fs.String("desc", "", "description stored with the image")
	arch := fs.String("arch", "", "architecture stored with the image")
	author := fs.String("author", "", "author stored with the image")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("push [flags] FILE")
	}
	if *conc < 1 {
		return usageErr("-concurrency must be at least 1")
	}
	c, err := g.connect(ctx)
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()

	pref, chain, backing, err := parentChain(ctx, c, *parent)
	if err != nil {
		return err
	}
	ref := blobstore.Ref{Name: *name, ID: *id}
	if ref.Name == "" {
		ref.Name = pref.Name
		if ref.Name == "" {
			ref.Name = newID(16)
		}
	}
	if ref.ID == "" {
		ref.ID = newID(16)
	}
	if err := ref.Validate(); err != nil {
		return usageErr("%v", err)
	}

	layer, err := normalizeFile(ctx, g, pos[0], backing, chain, *conc)
	if err != nil {
		return err
	}
	defer layer.remove()

	lim := ratelimit.New(bw.v)
	sent, err := uploadLayer(ctx, g, c, ref.Name, layer, lim)
	if err != nil {
		return err
	}
	img := blobstore.Image{
		Ref: ref, Blob: layer.digest, Created: time.Now().UTC().Truncate(time.Second),
		Author: *author, Arch: *arch, Desc: *desc,
		Size: layer.size, VirtualSize: layer.virtualSize, Format: "qcow2",
	}
	if *parent != "" {
		img.Parent = pref.String()
	}
	if err := putImage(ctx, c, append(chain, img)); err != nil {
		return err
	}
	res := pushResult{Name: ref.Name, ID: ref.ID, VirtualSize: img.VirtualSize, Size: img.Size,
		Blobsum: img.Blob.String(), Parent: img.Parent, Sent: sent}
	return g.printResult(res, func(w io.Writer) {
		fmt.Fprintf(w, "%s:%s virtualsize=%d size=%d blobsum=%s\n", res.Name, res.ID, res.VirtualSize, res.Size, res.Blobsum)
	})
}

// parentChain resolves push's -parent (name:id; "" for a base): its ref,
// its chain base first, and the backing file name a delta on it records.
func parentChain(ctx context.Context, c *oci.Client, parent string) (blobstore.Ref, []blobstore.Image, string, error) {
	if parent == "" {
		return blobstore.Ref{}, nil, "", nil
	}
	pref, err := blobstore.ParseRef(parent)
	if err != nil {
		return pref, nil, "", usageErr("-parent: %v", err)
	}
	ri, err := fetchImage(ctx, c, pref)
	if err != nil {
		return pref, nil, "", fmt.Errorf("parent: %w", err)
	}
	for _, img := range ri.Chain {
		if img.Format != "qcow2" {
			return pref, nil, "", fmt.Errorf("parent %s: layer %s has format %q; only qcow2 chains take deltas", pref, img.Ref, img.Format)
		}
	}
	return pref, ri.Chain, blobstore.BackingName(ri.Top().Blob), nil
}

// localLayer is a canonical layer written to a temp file.
type localLayer struct {
	path        string
	f           *os.File
	digest      digest.Digest
	size        int64
	virtualSize int64
}

func (l *localLayer) remove() {
	l.f.Close()
	os.Remove(l.path)
}

// normalizeFile re-encodes path (qcow2 or raw) as a canonical layer in a
// temp file beside it (or in $TMPDIR when that directory is read-only),
// hashing on the way: the digest must be known before the upload starts.
//
// With readers > 1, a qcow2 source's data clusters (DataRanges, in file
// order) are read ahead by that many goroutines in 4 MiB pieces (at most
// 2 × readers pieces in memory) for the writer's first pass, which helps
// on storage that needs several requests in flight (NFS, Ceph, a busy
// array). A raw source is read by the writer itself, holes skipped.
func normalizeFile(ctx context.Context, g *globals, path, backing string, parentChain []blobstore.Image, readers int) (*localLayer, error) {
	src, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	im, err := qcow2.Open(src, st.Size())
	raw := errors.Is(err, qcow2.ErrNotQcow2)
	if err != nil && !raw {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	vsize := st.Size()
	if !raw {
		vsize = im.VirtualSize()
	}
	if n := len(parentChain); n > 0 && parentChain[n-1].VirtualSize != vsize {
		return nil, fmt.Errorf("%s: virtual size %d differs from the parent's %d", path, vsize, parentChain[n-1].VirtualSize)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".imagestore-push-*")
	if err != nil {
		if tmp, err = os.CreateTemp("", "imagestore-push-*"); err != nil {
			return nil, err
		}
	}
	l := &localLayer{path: tmp.Name(), f: tmp, virtualSize: vsize}
	ok := false
	defer func() {
		if !ok {
			l.remove()
		}
	}()
	h := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(tmp, h), 1<<20)
	p := g.newProgress("normalize", 0)
	opts := qcow2.WriteOptions{BackingFile: backing}
	var n int64
	if raw {
		n, err = qcow2.NormalizeRaw(ctx, bw, src, vsize, opts)
	} else {
		n, err = normalizeQcow2(ctx, bw, src, st.Size(), im, opts, readers)
	}
	p.Add(n)
	p.Done()
	if err != nil {
		return nil, fmt.Errorf("%s: normalize: %w", path, err)
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	l.size = n
	l.digest = digest.NewDigest(digest.SHA256, h)
	ok = true
	return l, nil
}

// normalizeQcow2 runs qcow2.Normalize on im, reading its data clusters
// through a parallel prefetcher when readers > 1.
func normalizeQcow2(ctx context.Context, w io.Writer, src io.ReaderAt, size int64, im *qcow2.Image, opts qcow2.WriteOptions, readers int) (int64, error) {
	if readers <= 1 {
		return qcow2.Normalize(ctx, w, im, opts)
	}
	var ranges []parallel.Range
	for _, r := range im.DataRanges() {
		ranges = append(ranges, parallel.Range{Offset: r.Offset, Length: r.Length})
	}
	pf := parallel.NewPrefetcher(ctx, src, ranges, readers, 4<<20)
	defer pf.Close()
	// Reopened on the prefetcher: metadata reads fall outside the plan and
	// go straight to the file; data reads are served from the fetched pieces.
	pim, err := qcow2.Open(pf, size)
	if err != nil {
		return 0, err
	}
	return qcow2.Normalize(ctx, w, pim, opts)
}

// uploadLayer sends the layer unless the store has it already; returns the
// bytes sent. PushBlob resumes a cut upload from the store's durable offset.
func uploadLayer(ctx context.Context, g *globals, c *oci.Client, name string, l *localLayer, lim *ratelimit.Limiter) (int64, error) {
	size, err := c.StatBlob(ctx, name, l.digest)
	switch {
	case err == nil && size == l.size:
		return 0, nil
	case err == nil || errors.Is(err, oci.ErrNotFound):
	default:
		return 0, fmt.Errorf("check blob %s: %w", l.digest, err)
	}
	p := g.newProgress("push", l.size)
	defer p.Done()
	// A layer is one upload session: the distribution protocol appends a
	// session's chunks in order, so there is nothing to split across streams.
	var sent atomic.Int64
	err = c.PushBlob(ctx, name, l.digest, l.size, ratelimit.ReaderAt(ctx, l.f, lim), oci.PushOptions{Progress: func(n int64) {
		sent.Add(n)
		p.Add(n)
	}})
	if err != nil {
		return sent.Load(), fmt.Errorf("upload %s: %w", l.digest, err)
	}
	return sent.Load(), nil
}

package main

import (
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
	conc := fs.Int("concurrency", 0, "parallel readers ahead of the encoder of a qcow2 FILE's data clusters (0 = 4 on a network file system such as NFS, SMB, Ceph or FUSE, else 1: none; the upload is one ordered stream)")
	parent := fs.String("parent", "", "parent image name:id (the file is a delta on top of it)")
	var bw byteFlag
	fs.Var(&bw, "bwlimit", "upload limit in bytes/s (suffixes K, M, G; 0 = none)")
	name := fs.String("name", "", "image name (default: the parent's name, else a new uuid)")
	id := fs.String("id", "", "image id (default: a new random id)")
	desc := fs.String("desc", "", "description stored with the image")
	arch := fs.String("arch", "", "architecture stored with the image")
	author := fs.String("author", "", "author stored with the image")
	mount := fs.Bool("mount", true, "when the last push of this unchanged FILE made a layer with these options, ask the store for it first and send nothing if it has it")
	compress := fs.Bool("compress", false, "store the layer's compressible clusters zstd-compressed (qemu reads them in place); reads FILE twice")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("push [flags] FILE")
	}
	if *conc < 0 {
		return usageErr("-concurrency must be 0 (by the file system) or more")
	}
	// The zstcli face: the identity add gave this file, else -imageUuid.
	var added *indexEntry
	if g.face == faceZstcli && *name == "" && *id == "" {
		if added, err = g.addedAs(pos[0]); err != nil {
			return err
		}
		if added != nil {
			*name, *id = added.Name, added.ID
			if *desc == "" {
				*desc = added.Desc
			}
		} else {
			*name = g.imageUUID
		}
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

	created := time.Now().UTC().Truncate(time.Second)
	if added != nil {
		created = added.Created
		if added.Pulled {
			_, err := fetchImage(ctx, c, added.Ref)
			if err == nil || !errors.Is(err, oci.ErrNotFound) {
				return err // the file was pulled as this image: nothing to send
			}
		} else if done, err := alreadyPushed(ctx, c, added.Ref, added.Blobsum); done || err != nil {
			return err // a repeated push of an added file: nothing to do
		}
	}
	src, err := openSource(pos[0], chain)
	if err != nil {
		return err
	}
	defer src.f.Close()
	opts := qcow2.WriteOptions{BackingFile: backing, Compress: *compress}
	cache, key, fid, at, cacheable := sourceCache(g, src, opts)
	var layer pushed
	if *mount {
		if layer, err = mountKnown(ctx, c, ref.Name, src, added, opts, cache, key, fid, cacheable); err != nil {
			return err
		}
	}
	if layer.digest == "" {
		readers := *conc
		if readers == 0 {
			readers = defaultReaders(src.f)
		}
		if layer, err = pushLayer(ctx, g, c, ref.Name, src, opts, readers, ratelimit.New(bw.v)); err != nil {
			return err
		}
		if cacheable {
			if err := cache.put(key, fid, at, layer.digest, layer.size); err != nil {
				fmt.Fprintf(g.stderr, "%v (the next push of this file sends it again)\n", err)
			}
		}
	}
	sent := layer.sent
	img := blobstore.Image{
		Ref: ref, Blob: layer.digest, Created: created,
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
	return g.printOutcome(res, func(w io.Writer) {
		fmt.Fprintf(w, "%s:%s virtualsize=%d size=%d blobsum=%s\n", res.Name, res.ID, res.VirtualSize, res.Size, res.Blobsum)
	})
}

// addedAs returns the host index's entry for file (nil when add never
// saw it). A file changed since add keeps its name:id (the caller has
// recorded it); stderr says so.
func (g *globals) addedAs(file string) (*indexEntry, error) {
	abs, err := canonicalPath(file)
	if err != nil {
		return nil, err
	}
	e, ok, err := hostIndex{dir: g.stateDir}.get(abs)
	if err != nil || !ok {
		return nil, err
	}
	if st, err := os.Stat(abs); err == nil && !e.sameFile(st) {
		fmt.Fprintf(g.stderr, "%s: changed since add; pushing it as %s all the same\n", abs, e.Ref)
	}
	return &e, nil
}

// alreadyPushed reports whether the store holds ref with top layer d; ref
// holding anything else is an error (records are immutable).
func alreadyPushed(ctx context.Context, c *oci.Client, ref blobstore.Ref, d digest.Digest) (bool, error) {
	ri, err := fetchImage(ctx, c, ref)
	if errors.Is(err, oci.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if ri.Top().Blob != d {
		return false, fmt.Errorf("image %s is on the store with other content (%s; this file was added as %s)", ref, ri.Top().Blob, d)
	}
	return true, nil
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

// source is push's FILE: a qcow2 image (im set) or a raw disk.
type source struct {
	path  string
	f     *os.File
	size  int64 // file bytes
	im    *qcow2.Image
	vsize int64
}

// openSource opens path and checks it against the parent chain.
func openSource(path string, parentChain []blobstore.Image) (*source, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	s := &source{path: path, f: f}
	ok := false
	defer func() {
		if !ok {
			f.Close()
		}
	}()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	s.size, s.vsize = st.Size(), st.Size()
	im, err := qcow2.Open(f, st.Size())
	switch {
	case err == nil:
		s.im, s.vsize = im, im.VirtualSize()
	case !errors.Is(err, qcow2.ErrNotQcow2):
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if n := len(parentChain); n > 0 && parentChain[n-1].VirtualSize != s.vsize {
		return nil, fmt.Errorf("%s: virtual size %d differs from the parent's %d", path, s.vsize, parentChain[n-1].VirtualSize)
	}
	ok = true
	return s, nil
}

// sourceCache is the push cache's key for src under opts and the file's
// identity now; cacheable is false for a qcow2 whose local backing files
// are flattened into the layer (their changes would not show in FILE's
// identity) and when FILE cannot be identified.
func sourceCache(g *globals, src *source, opts qcow2.WriteOptions) (pushCache, pushCacheKey, fileID, time.Time, bool) {
	cache := pushCache{dir: g.stateDir}
	if src.im != nil && opts.BackingFile == "" && src.im.BackingFile() != "" {
		return cache, pushCacheKey{}, fileID{}, time.Time{}, false
	}
	abs, err := canonicalPath(src.path)
	if err != nil {
		return cache, pushCacheKey{}, fileID{}, time.Time{}, false
	}
	id, at, err := statID(src.f)
	if err != nil {
		return cache, pushCacheKey{}, fileID{}, time.Time{}, false
	}
	return cache, pushCacheKey{Path: abs, Backing: opts.BackingFile, Compress: opts.Compress}, id, at, true
}

// mountKnown looks for a layer of src the store may already hold: the one
// the push cache recorded for this unchanged file and these options, or
// the one add measured (a base layer without -compress, the file unchanged
// since). If the store has it (a mount, which also keeps it from GC until
// the manifest names it), the returned layer is it and nothing is read or
// sent; else the returned layer is empty and the caller pushes.
func mountKnown(ctx context.Context, c *oci.Client, name string, src *source, added *indexEntry, opts qcow2.WriteOptions, cache pushCache, key pushCacheKey, id fileID, cacheable bool) (pushed, error) {
	var d digest.Digest
	var size int64
	if cacheable {
		d, size, _ = cache.get(key, id)
	}
	// add measured FILE flattened with its local backing files (which
	// FILE's identity does not cover), and its identity with ctime only
	// when the file had settled: the same rules as the push cache.
	if d == "" && added != nil && !added.Pulled && added.Blobsum != "" && opts.BackingFile == "" && !opts.Compress &&
		cacheable && added.File != nil && *added.File == id && (src.im == nil || src.im.BackingFile() == "") {
		d, size = added.Blobsum, added.Size
	}
	if d == "" {
		return pushed{}, nil
	}
	ok, err := c.MountBlob(ctx, name, d)
	if ctx.Err() != nil {
		return pushed{}, ctx.Err()
	}
	if err != nil || !ok {
		return pushed{}, nil // the push sends it
	}
	return pushed{digest: d, size: size, virtualSize: src.vsize}, nil
}

// pushed is a layer the store now holds.
type pushed struct {
	digest      digest.Digest
	size        int64
	virtualSize int64
	sent        int64
}

// pushLayer streams src, re-encoded as a canonical layer, to the store in
// one pass: the encoder writes into the upload as it reads, the digest is
// computed on the way and named by the completing PUT, so nothing of the
// layer is kept locally. After a cut the encoder runs again (it is
// deterministic) and the upload resumes at the store's durable offset.
//
// Without compression the layout of a qcow2 FILE is guessed from its
// allocation (AssumeNoZeroData), so FILE is read once; if it holds an all-zero data
// cluster the guess fails and the push starts over with the writer's scan
// pass. With compression the writer's scan pass reads FILE first, to learn
// each compressed cluster's size (the tables come before the data), then
// the write pass reads it again while uploading.
//
// With readers > 1, a qcow2 source's data clusters (DataRanges, in file
// order) are read ahead by that many goroutines in 4 MiB pieces (at most
// 2 × readers pieces in memory), which helps on storage that needs several
// requests in flight (NFS, Ceph, a busy array). A raw source is read by
// the writer itself, holes skipped.
func pushLayer(ctx context.Context, g *globals, c *oci.Client, name string, src *source, opts qcow2.WriteOptions, readers int, lim *ratelimit.Limiter) (pushed, error) {
	total := src.size
	if src.im != nil {
		total = src.im.AllocatedBytes()
	}
	p := g.newPhase("push", total, 0, 99)
	defer p.Done()
	var sent atomic.Int64
	// A raw disk is full of zero clusters, so it always takes the scan pass.
	opts.AssumeNoZeroData = !opts.Compress && src.im != nil
	for {
		produce := func(ctx context.Context, w io.Writer) (int64, error) {
			w = ratelimit.Writer(ctx, w, lim)
			return src.encode(ctx, w, opts, readers)
		}
		d, n, err := c.PushProduced(ctx, name, produce, oci.StreamOptions{Progress: func(n int64) {
			sent.Add(n)
			p.Add(n)
		}})
		if errors.Is(err, qcow2.ErrZeroData) && opts.AssumeNoZeroData {
			opts.AssumeNoZeroData = false // the same layer, laid out by the scan pass
			continue
		}
		if err != nil {
			return pushed{sent: sent.Load()}, fmt.Errorf("%s: push: %w", src.path, err)
		}
		return pushed{digest: d, size: n, virtualSize: src.vsize, sent: sent.Load()}, nil
	}
}

// encode writes src as a canonical layer: a raw disk, a qcow2 layer, or,
// for a qcow2 with a backing file pushed without a parent, the whole local
// chain flattened (the host's own backing files, followed by name).
func (src *source) encode(ctx context.Context, w io.Writer, opts qcow2.WriteOptions, readers int) (int64, error) {
	switch {
	case src.im == nil:
		return qcow2.NormalizeRaw(ctx, w, src.f, src.vsize, opts)
	case opts.BackingFile == "" && src.im.BackingFile() != "":
		return flattenLocal(ctx, w, src.path, src.im, opts)
	}
	return normalizeQcow2(ctx, w, src.f, src.size, src.im, opts, readers)
}

// measured is what encoding a file as a layer gives.
type measured struct {
	digest      digest.Digest
	size        int64
	virtualSize int64
}

// measureFile encodes path as push would (nothing written, nothing sent):
// add learns the size and digest the layer will have.
func measureFile(ctx context.Context, path string) (measured, error) {
	src, err := openSource(path, nil)
	if err != nil {
		return measured{}, err
	}
	defer src.f.Close()
	h := sha256.New()
	n, err := src.encode(ctx, h, qcow2.WriteOptions{}, 4)
	if err != nil {
		return measured{}, fmt.Errorf("%s: %w", path, err)
	}
	return measured{digest: digest.NewDigest(digest.SHA256, h), size: n, virtualSize: src.vsize}, nil
}

// maxLocalChain bounds the backing files followed on the host.
const maxLocalChain = 256

// flattenLocal writes top and the backing files it names (relative names
// from the referring file's directory; qcow2 only) as one standalone layer.
func flattenLocal(ctx context.Context, w io.Writer, path string, top *qcow2.Image, opts qcow2.WriteOptions) (int64, error) {
	layers := []*qcow2.Image{top}
	cur, im := path, top
	for im.BackingFile() != "" {
		if len(layers) >= maxLocalChain {
			return 0, fmt.Errorf("backing chain deeper than %d", maxLocalChain)
		}
		if f := im.BackingFormat(); f != "" && f != "qcow2" {
			return 0, fmt.Errorf("backing file %s has format %q; only qcow2 chains are flattened", im.BackingFile(), f)
		}
		next := im.BackingFile()
		if !filepath.IsAbs(next) {
			next = filepath.Join(filepath.Dir(cur), next)
		}
		f, err := os.Open(next)
		if err != nil {
			return 0, fmt.Errorf("backing file: %w", err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return 0, err
		}
		if im, err = qcow2.Open(f, st.Size()); err != nil {
			return 0, fmt.Errorf("backing file %s: %w", next, err)
		}
		layers = append(layers, im)
		cur = next
	}
	chain, err := qcow2.NewChain(layers...)
	if err != nil {
		return 0, err
	}
	return qcow2.Flatten(ctx, w, chain, "qcow2", opts)
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

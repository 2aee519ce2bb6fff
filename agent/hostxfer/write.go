package hostxfer

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/ratelimit"
	"imagestore/transfer/sshfs"
)

// WriteRequest is one chain to write to a host.
type WriteRequest struct {
	Login
	InstallPath string // the top of the stored chain
	Path        string // on the host
	Format      string // "qcow2" (default) or "raw"
	// Bandwidth in bytes per second (0: unlimited) for the write and the
	// read back.
	Bandwidth int64
}

// WriteResult is what a write left on the host.
type WriteResult struct {
	Image  blobstore.Image // the top of the chain written
	Format string
	Size   int64  // bytes of the written file
	SHA256 string // of the file, as read back from the host
}

// Write (revert) flattens a stored chain into one standalone image and
// writes it to a path on a host: the chain is opened through
// layer.Store.OpenChain (every layer's digest verified first), written to
// a temp file beside the target, fsynced and renamed, then read back and
// hashed to prove the host holds exactly what was sent. Progress counts
// the bytes of the image written.
func (s *Service) Write(ctx context.Context, req WriteRequest, p jobs.Progress) (WriteResult, error) {
	if p == nil {
		p = jobs.Nop{}
	}
	h, err := s.host(req.Login)
	if err != nil {
		return WriteResult{}, err
	}
	img, err := s.images.Lookup(ctx, "installPath", req.InstallPath)
	if err != nil {
		return WriteResult{}, err
	}
	format := req.Format
	if format == "" {
		format = "qcow2"
	}
	p.SetImage(img.Name, img.InstallPath(), format)
	w := &write{s: s, host: h, path: req.Path, format: format, limiter: limiter(req.Bandwidth), progress: p}
	size, sum, err := w.run(ctx, img)
	if err != nil {
		return WriteResult{}, err
	}
	if s.exported != nil {
		s.exported.Add(float64(size))
	}
	s.log.Info("chain written to host", "image", img.InstallPath(), "host", h.Addr, "path", req.Path, "format", format, "size", size, "sha256", sum)
	return WriteResult{Image: img, Format: format, Size: size, SHA256: sum}, nil
}

// write is one running Write.
type write struct {
	s        *Service
	host     sshfs.Host
	path     string
	format   string
	limiter  *ratelimit.Limiter // nil = unlimited
	progress jobs.Progress
}

// run flattens top's chain into the host file and checks it.
func (w *write) run(ctx context.Context, top blobstore.Image) (int64, string, error) {
	c, closeChain, err := w.s.layers.OpenChain(ctx, top.Ref)
	if err != nil {
		return 0, "", err
	}
	defer closeChain()
	af, err := w.s.pool.CreateAtomic(ctx, w.host, w.path)
	if err != nil {
		return 0, "", hostErr(w.host, w.path, err)
	}
	defer af.Abort() // no-op after Commit
	sum := sha256.New()
	var n int64
	switch w.format {
	case "raw":
		n, err = w.raw(ctx, af, sum, c.Chain)
	default:
		n, err = w.qcow2(ctx, af, sum, c.Chain)
	}
	if err != nil {
		return 0, "", fmt.Errorf("writing %s:%s: %w", w.host.Addr, w.path, err)
	}
	if err := af.Commit(); err != nil {
		return 0, "", hostErr(w.host, w.path, fmt.Errorf("commit: %w", err))
	}
	want := hex.EncodeToString(sum.Sum(nil))
	got, size, err := w.hashRemote(ctx)
	if err == nil && (size != n || got != want) {
		err = fmt.Errorf("%s:%s: read back %d bytes with sha256 %s, wrote %d bytes with sha256 %s; removed it", w.host.Addr, w.path, size, got, n, want)
		_ = w.s.pool.Remove(ctx, w.host, w.path)
	}
	if err != nil {
		return 0, "", err
	}
	return n, got, nil
}

// hostWriter charges the limiter, counts and hashes everything sent.
type hostWriter struct {
	ctx context.Context
	out io.Writer
	h   hash.Hash
	w   *write
	n   int64
}

func (hw *hostWriter) Write(p []byte) (int, error) {
	n, err := ratelimit.Writer(hw.ctx, hw.out, hw.w.limiter).Write(p)
	hw.h.Write(p[:n])
	hw.account(n, true)
	return n, err
}

// account records n bytes of output; sent says they crossed the network
// (skipped zero ranges of a raw file did not).
func (hw *hostWriter) account(n int, sent bool) {
	hw.n += int64(n)
	hw.w.progress.Add(int64(n))
	if sent {
		hw.w.s.wroteBytes.Add(float64(n))
	}
}

func (w *write) qcow2(ctx context.Context, af sshfs.AtomicFile, sum hash.Hash, c *qcow2.Chain) (int64, error) {
	hw := &hostWriter{ctx: ctx, out: af, h: sum, w: w}
	// Large writes let the SFTP client keep many write requests in flight.
	bw := bufio.NewWriterSize(hw, 4<<20)
	if _, err := qcow2.Flatten(ctx, bw, c, "qcow2", qcow2.WriteOptions{}); err != nil {
		return hw.n, err
	}
	err := bw.Flush()
	return hw.n, err
}

// sparseHostWriter is the raw target: qcow2.FlattenRawSparse writes only
// data, in ascending order, so the skipped ranges are hashed (and counted
// as progress, not as network bytes) as zeros here, keeping the hash that
// of the whole file.
type sparseHostWriter struct {
	hw  *hostWriter
	af  sshfs.AtomicFile
	pos int64 // end of the last write
}

func (sw *sparseHostWriter) WriteAt(p []byte, off int64) (int, error) {
	if off < sw.pos {
		return 0, fmt.Errorf("internal error: raw write at %d after %d", off, sw.pos)
	}
	sw.skip(off)
	if err := sw.hw.w.limiter.WaitN(sw.hw.ctx, len(p)); err != nil {
		return 0, err
	}
	n, err := sw.af.WriteAt(p, off)
	sw.hw.h.Write(p[:n])
	sw.hw.account(n, true)
	sw.pos = off + int64(n)
	return n, err
}

// skip hashes zeros from pos up to off.
func (sw *sparseHostWriter) skip(off int64) {
	var zeros [64 << 10]byte
	for sw.pos < off {
		k := min(int64(len(zeros)), off-sw.pos)
		sw.hw.h.Write(zeros[:k])
		sw.hw.account(int(k), false)
		sw.pos += k
	}
}

// raw writes the guest view, leaving zero ranges as holes on the host.
func (w *write) raw(ctx context.Context, af sshfs.AtomicFile, sum hash.Hash, c *qcow2.Chain) (int64, error) {
	w.progress.SetTotal(c.VirtualSize())
	sw := &sparseHostWriter{hw: &hostWriter{ctx: ctx, h: sum, w: w}, af: af}
	if _, err := qcow2.FlattenRawSparse(ctx, sw, c); err != nil {
		return sw.hw.n, err
	}
	sw.skip(c.VirtualSize()) // nothing unless the size came from a truncate
	return sw.hw.n, nil
}

// hashRemote reads the written file back over SFTP and hashes it.
func (w *write) hashRemote(ctx context.Context) (string, int64, error) {
	f, err := w.s.pool.Open(ctx, w.host, w.path)
	if err != nil {
		return "", 0, hostErr(w.host, w.path, fmt.Errorf("reopening to verify: %w", err))
	}
	defer f.Close()
	h := sha256.New()
	r := ratelimit.Reader(ctx, io.NewSectionReader(f, 0, f.Size()), w.limiter)
	n, err := io.CopyBuffer(h, r, make([]byte, 4<<20))
	if err != nil {
		return "", n, hostErr(w.host, w.path, fmt.Errorf("verifying: %w", err))
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

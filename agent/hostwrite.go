package agent

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/ratelimit"
	"imagestore/transfer/sshfs"
)

type writeToHostReq struct {
	hostFields
	InstallPath      string   `json:"installPath"`
	Path             string   `json:"path"`
	Format           string   `json:"format"` // "qcow2" (default) or "raw"
	RecoverBandwidth ByteSize `json:"recoverBandwidth"`
}

func (q *writeToHostReq) validate() error {
	if err := q.hostFields.validate(); err != nil {
		return err
	}
	switch {
	case q.InstallPath == "":
		return missing("installPath")
	case q.Path == "":
		return missing("path")
	case q.Format != "" && q.Format != "qcow2" && q.Format != "raw":
		return fmt.Errorf("format %q: want qcow2 or raw", q.Format)
	case q.RecoverBandwidth < 0:
		return errors.New("recoverBandwidth must not be negative")
	}
	return nil
}

type writeToHostReply struct {
	InstallPath string `json:"installPath"`
	Hostname    string `json:"hostname"`
	Path        string `json:"path"`
	Format      string `json:"format"`
	Size        int64  `json:"size"` // bytes of the written file
	VirtualSize int64  `json:"virtualsize"`
	SHA256      string `json:"sha256"` // of the file, as read back from the host
}

// writeToHost (revert) flattens a stored chain into one standalone image
// and writes it to a path on a KVM host: layer digests verified first,
// written to a temp file beside the target, fsynced and renamed, then read
// back and hashed to prove the host holds exactly what was sent.
func (a *Agent) writeToHost(w http.ResponseWriter, r *http.Request) {
	var req writeToHostReq
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "writetohost", Backup: true, Err: err}, func(ctx context.Context, job *Job) (any, error) {
		h, err := a.sshHost(req.hostFields)
		if err != nil {
			return nil, err
		}
		img, err := a.lookupImage(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		format := firstNonEmpty(req.Format, "qcow2")
		job.SetImage(img.Name, img.InstallPath(), format)
		st := a.hosts()
		out, err := writeChainToHost(ctx, writeSpec{
			Pool: st.pool, Host: h, Path: req.Path, Store: a.store, Top: img, Format: format,
			Limiter: limiterFor(int64(req.RecoverBandwidth)), Job: job, Counter: st.wrote.Add,
		})
		if err != nil {
			return nil, err
		}
		a.m.bytesExported.Add(float64(out.Size))
		a.log.Info("chain written to host", "image", img.InstallPath(), "host", h.Addr, "path", req.Path, "format", format, "size", out.Size, "sha256", out.SHA256)
		return writeToHostReply{
			InstallPath: img.InstallPath(), Hostname: req.Hostname, Path: req.Path, Format: format,
			Size: out.Size, VirtualSize: img.VirtualSize, SHA256: out.SHA256,
		}, nil
	})
}

type writeSpec struct {
	Pool    *sshfs.Pool
	Host    sshfs.Host
	Path    string
	Store   *blobstore.Store
	Top     blobstore.Image
	Format  string
	Limiter *ratelimit.Limiter // nil = unlimited
	Job     *Job
	Counter func(float64)
}

type writeResult struct {
	Size   int64
	SHA256 string
}

// openChain verifies every layer's digest and opens the chain top→base.
// The returned release closes the blobs and drops the GC hold.
func openChain(ctx context.Context, store *blobstore.Store, top blobstore.Image) (*qcow2.Chain, func(), error) {
	imgs, err := store.Chain(ctx, top.Ref)
	if err != nil {
		return nil, nil, err
	}
	var ds []digest.Digest
	for _, im := range imgs {
		ds = append(ds, im.Blob)
	}
	unhold := store.Hold(ds...)
	var blobs []blobstore.Blob
	release := func() {
		for _, b := range blobs {
			_ = b.Close()
		}
		unhold()
	}
	var layers []*qcow2.Image
	for _, im := range imgs {
		if im.Format != "qcow2" {
			release()
			return nil, nil, fmt.Errorf("image %s is %s, not qcow2; only qcow2 chains can be flattened", im.Ref, im.Format)
		}
		// Verification reads each layer once; a corrupt blob is quarantined
		// and nothing is written to the host.
		if err := store.VerifyBlob(ctx, im.Blob); err != nil {
			release()
			return nil, nil, fmt.Errorf("layer %s (%s) failed verification: %w", im.Ref, im.Blob, err)
		}
		b, err := store.OpenBlob(ctx, im.Blob)
		if err != nil {
			release()
			return nil, nil, err
		}
		blobs = append(blobs, b)
		l, err := qcow2.Open(b, b.Size())
		if err != nil {
			release()
			return nil, nil, fmt.Errorf("layer %s: %w", im.Ref, err)
		}
		layers = append(layers, l)
	}
	c, err := qcow2.NewChain(layers...)
	if err != nil {
		release()
		return nil, nil, err
	}
	return c, release, nil
}

// writeChainToHost flattens s.Top's chain into s.Path on the host.
func writeChainToHost(ctx context.Context, s writeSpec) (writeResult, error) {
	var res writeResult
	c, release, err := openChain(ctx, s.Store, s.Top)
	if err != nil {
		return res, err
	}
	defer release()
	af, err := s.Pool.CreateAtomic(ctx, s.Host, s.Path)
	if err != nil {
		return res, hostErr(s.Host, s.Path, err)
	}
	defer af.Abort() // no-op after Commit
	sum := sha256.New()
	var n int64
	switch s.Format {
	case "raw":
		n, err = writeRaw(ctx, af, sum, c, s)
	default:
		n, err = writeQcow2(ctx, af, sum, c, s)
	}
	if err != nil {
		return res, fmt.Errorf("writing %s:%s: %w", s.Host.Addr, s.Path, err)
	}
	if err := af.Commit(); err != nil {
		return res, hostErr(s.Host, s.Path, fmt.Errorf("commit: %w", err))
	}
	want := hex.EncodeToString(sum.Sum(nil))
	got, size, err := hashRemote(ctx, s)
	if err == nil && (size != n || got != want) {
		err = fmt.Errorf("%s:%s: read back %d bytes with sha256 %s, wrote %d bytes with sha256 %s; removed it", s.Host.Addr, s.Path, size, got, n, want)
		_ = s.Pool.Remove(ctx, s.Host, s.Path)
	}
	if err != nil {
		return res, err
	}
	return writeResult{Size: n, SHA256: got}, nil
}

// hostWriter charges the limiter, counts and hashes everything sent.
type hostWriter struct {
	ctx context.Context
	w   io.Writer
	h   hash.Hash
	s   writeSpec
	n   int64
}

func (w *hostWriter) Write(p []byte) (int, error) {
	n, err := ratelimit.Writer(w.ctx, w.w, w.s.Limiter).Write(p)
	w.h.Write(p[:n])
	w.account(n, true)
	return n, err
}

// account records n bytes of output; sent says they crossed the network
// (skipped zero ranges of a raw file did not).
func (w *hostWriter) account(n int, sent bool) {
	w.n += int64(n)
	if w.s.Job != nil {
		w.s.Job.Add(int64(n))
	}
	if sent && w.s.Counter != nil {
		w.s.Counter(float64(n))
	}
}

func writeQcow2(ctx context.Context, af sshfs.AtomicFile, sum hash.Hash, c *qcow2.Chain, s writeSpec) (int64, error) {
	hw := &hostWriter{ctx: ctx, w: af, h: sum, s: s}
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

func (w *sparseHostWriter) WriteAt(p []byte, off int64) (int, error) {
	if off < w.pos {
		return 0, fmt.Errorf("internal error: raw write at %d after %d", off, w.pos)
	}
	w.skip(off)
	if err := w.hw.s.Limiter.WaitN(w.hw.ctx, len(p)); err != nil {
		return 0, err
	}
	n, err := w.af.WriteAt(p, off)
	w.hw.h.Write(p[:n])
	w.hw.account(n, true)
	w.pos = off + int64(n)
	return n, err
}

// skip hashes zeros from pos up to off.
func (w *sparseHostWriter) skip(off int64) {
	var zeros [64 << 10]byte
	for w.pos < off {
		k := min(int64(len(zeros)), off-w.pos)
		w.hw.h.Write(zeros[:k])
		w.hw.account(int(k), false)
		w.pos += k
	}
}

// writeRaw writes the guest view, leaving zero ranges as holes on the host.
func writeRaw(ctx context.Context, af sshfs.AtomicFile, sum hash.Hash, c *qcow2.Chain, s writeSpec) (int64, error) {
	if s.Job != nil {
		s.Job.SetTotal(c.VirtualSize())
	}
	w := &sparseHostWriter{hw: &hostWriter{ctx: ctx, h: sum, s: s}, af: af}
	if _, err := qcow2.FlattenRawSparse(ctx, w, c); err != nil {
		return w.hw.n, err
	}
	w.skip(c.VirtualSize()) // nothing unless the size came from a truncate
	return w.hw.n, nil
}

// hashRemote reads the written file back over SFTP and hashes it.
func hashRemote(ctx context.Context, s writeSpec) (string, int64, error) {
	f, err := s.Pool.Open(ctx, s.Host, s.Path)
	if err != nil {
		return "", 0, hostErr(s.Host, s.Path, fmt.Errorf("reopening to verify: %w", err))
	}
	defer f.Close()
	h := sha256.New()
	r := ratelimit.Reader(ctx, io.NewSectionReader(f, 0, f.Size()), s.Limiter)
	n, err := io.CopyBuffer(h, r, make([]byte, 4<<20))
	if err != nil {
		return "", n, hostErr(s.Host, s.Path, fmt.Errorf("verifying: %w", err))
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

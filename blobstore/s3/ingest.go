package s3store

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"strings"

	"imagestore/blobstore"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/opencontainers/go-digest"
)

// An ingest <ref> lives under ingest/<ref>/:
//
//	data   the multipart upload's key (and, after CompleteMultipartUpload,
//	       the finished object until it is copied to its blob key)
//	state  ingestState: the upload id, the parts that succeeded, the
//	       marshalled sha256 of exactly their bytes
//	tail-<end>  bytes written after the last part when the Writer was
//	       closed (under a part size, so not yet a part), up to offset
//	       <end>, with their sha256 in state
const (
	ingestData  = "data"
	ingestState = "state"
	ingestTail  = "tail-" // + the ingest's offset at its end: a new tail never overwrites the one the state names
)

// ingestStateV1 is the durable checkpoint of an S3 ingest. It is written
// only after every part it lists has been stored, so it never claims a
// byte the server does not hold.
type ingestStateV1 struct {
	Version    int        `json:"version"`
	UploadID   string     `json:"uploadId"`
	Offset     int64      `json:"offset"` // bytes in Parts
	SHA256     []byte     `json:"sha256"` // crypto/sha256 MarshalBinary over those bytes
	Parts      []partInfo `json:"parts"`
	Tail       int64      `json:"tail,omitempty"`       // bytes in the tail object, after Offset
	TailSHA256 string     `json:"tailSha256,omitempty"` // hex sha256 of those bytes
}

type partInfo struct {
	Number int32  `json:"n"`
	Size   int64  `json:"size"`
	ETag   string `json:"etag"` // "<hex md5>" as S3 returns it, quotes included
}

// parseState decodes and checks a state object: it comes from the bucket,
// which other agents (or a torn history) may have written.
func parseState(b []byte) (ingestStateV1, hash.Hash, error) {
	var st ingestStateV1
	if err := json.Unmarshal(b, &st); err != nil {
		return st, nil, fmt.Errorf("ingest state: %w", err)
	}
	if st.Version != 1 {
		return st, nil, fmt.Errorf("ingest state: unknown version %d", st.Version)
	}
	if st.Offset < 0 || st.Tail < 0 || st.Tail > 5<<30 {
		return st, nil, fmt.Errorf("ingest state: bad offset %d / tail %d", st.Offset, st.Tail)
	}
	if st.UploadID == "" && (st.Offset != 0 || len(st.Parts) != 0) {
		return st, nil, fmt.Errorf("ingest state: parts without an upload id")
	}
	if len(st.Parts) > maxParts {
		return st, nil, fmt.Errorf("ingest state: %d parts", len(st.Parts))
	}
	var sum int64
	for i, p := range st.Parts {
		if p.Number != int32(i+1) || p.Size < minPartSize || p.Size > 5<<30 || p.ETag == "" {
			return st, nil, fmt.Errorf("ingest state: bad part %d: %+v", i+1, p)
		}
		sum += p.Size
	}
	if sum != st.Offset {
		return st, nil, fmt.Errorf("ingest state: parts hold %d bytes, offset says %d", sum, st.Offset)
	}
	if st.Tail > 0 {
		if t, err := hex.DecodeString(st.TailSHA256); err != nil || len(t) != sha256.Size {
			return st, nil, fmt.Errorf("ingest state: bad tail sha256")
		}
	}
	h, err := blobstore.UnmarshalHashState(st.SHA256, st.Offset)
	if err != nil {
		return st, nil, fmt.Errorf("ingest state: %w", err)
	}
	return st, h, nil
}

// Writer is one ingest: bytes go to a part buffer and are hashed there,
// in order; each full buffer becomes a multipart part uploaded in the
// background (at most PartsInFlight at once, so memory is PartsInFlight+1
// part buffers whatever the blob's size), and the state object follows
// the parts in order: it only ever lists parts 1..N all acknowledged, so a
// part finishing before the one ahead of it is claimed only once that one
// is too. A Writer is not safe for concurrent use.
type Writer struct {
	b   *Backend
	ctx context.Context
	ref string

	uploadID    string
	parts       []partInfo
	durable     int64      // bytes in parts
	durableHash []byte     // marshalled sha256 of those bytes
	h           hash.Hash  // over durable + buf
	buf         []byte     // bytes after the last part (< PartSize)
	tailSaved   int64      // leading bytes of buf stored in the tail object
	tailEnd     int64      // the offset naming that tail object (0: none)
	resumed     int64      // offset the Writer started from
	stateSaved  bool       // the ref's state object exists (read at resume, or written since)
	pending     []*partJob // parts uploading, in part order, after parts
	pendingSize int64      // bytes in pending
	spare       [][]byte   // part buffers back from finished uploads

	err    error // sticky: after a failed part nothing more is accepted
	closed bool
	done   bool
}

// Writer opens (or resumes) the ingest ref. A ref with an open Writer in
// this process is blobstore.ErrLocked. Resume trusts the state object only
// where ListParts confirms it; anything else restarts the ingest from zero
// (a NoSuchKey or NoSuchUpload from ListParts means the upload is gone).
// ctx bounds every request the Writer makes.
func (b *Backend) Writer(ctx context.Context, ref string) (*Writer, error) {
	if err := blobstore.ValidateName(ref); err != nil {
		return nil, err
	}
	b.mu.Lock()
	if b.active[ref] {
		b.mu.Unlock()
		return nil, fmt.Errorf("%w: ingest %s", blobstore.ErrLocked, ref)
	}
	b.active[ref] = true
	b.mu.Unlock()
	w := &Writer{b: b, ctx: ctx, ref: ref, h: blobstore.NewIngestHash()}
	if err := w.resume(ctx); err != nil {
		b.release(ref)
		return nil, err
	}
	w.resumed = w.Offset()
	return w, nil
}

func (b *Backend) release(ref string) {
	b.mu.Lock()
	delete(b.active, ref)
	b.mu.Unlock()
}

func (w *Writer) resume(ctx context.Context) error {
	b := w.b
	raw, _, err := b.getSmall(ctx, b.ingestKey(w.ref, ingestState))
	if errors.Is(err, blobstore.ErrNotFound) {
		return w.fresh(ctx, "")
	}
	if err != nil {
		return err
	}
	st, h, err := parseState(raw)
	if err != nil {
		b.log.Warn("unusable ingest state, restarting the ingest from zero", "ref", w.ref, "err", err)
		return w.fresh(ctx, st.UploadID)
	}
	if st.UploadID != "" {
		have, err := b.listParts(ctx, b.ingestKey(w.ref, ingestData), st.UploadID)
		if uploadGone(err) {
			b.log.Warn("multipart upload gone, restarting the ingest from zero", "ref", w.ref, "upload", st.UploadID)
			return w.fresh(ctx, "")
		}
		if err != nil {
			return fmt.Errorf("s3store: resume %s: %w", w.ref, err)
		}
		for _, p := range st.Parts {
			if q, ok := have[p.Number]; !ok || q.Size != p.Size || q.ETag != p.ETag {
				b.log.Warn("multipart upload lost a part, restarting the ingest from zero", "ref", w.ref, "part", p.Number)
				return w.fresh(ctx, st.UploadID)
			}
		}
	}
	w.uploadID, w.parts, w.durable, w.durableHash, w.h = st.UploadID, st.Parts, st.Offset, st.SHA256, h
	w.stateSaved = true
	if st.Tail > 0 {
		tail, _, err := b.getLimited(ctx, b.tailKey(w.ref, st.Offset+st.Tail), st.Tail)
		sum := sha256.Sum256(tail)
		switch {
		case err == nil && int64(len(tail)) == st.Tail && hex.EncodeToString(sum[:]) == st.TailSHA256:
			w.buf = append(make([]byte, 0, b.opts.PartSize), tail...)
			w.h.Write(tail)
			w.tailSaved, w.tailEnd = st.Tail, st.Offset+st.Tail
		case err == nil || errors.Is(err, blobstore.ErrNotFound):
			b.log.Warn("ingest tail does not match its state, resuming from the last part", "ref", w.ref, "offset", st.Offset)
		default:
			return fmt.Errorf("s3store: resume %s: %w", w.ref, err)
		}
	}
	return nil
}

// fresh restarts the ingest from zero: it aborts every multipart upload
// at the ref's data key (abandoned by a crash before the first state, or
// no longer trusted), removes the ref's objects and writes a state at 0.
func (w *Writer) fresh(ctx context.Context, uploadID string) error {
	b := w.b
	key := b.ingestKey(w.ref, ingestData)
	ids, err := b.uploadsAt(ctx, key)
	if err != nil {
		return err
	}
	if uploadID != "" {
		ids = append(ids, uploadID)
	}
	for _, id := range ids {
		if err := b.abort(ctx, key, id); err != nil {
			return err
		}
	}
	if err := b.deleteIngestObjects(ctx, w.ref); err != nil {
		return err
	}
	w.uploadID, w.parts, w.durable, w.durableHash, w.buf, w.tailSaved, w.tailEnd = "", nil, 0, nil, nil, 0, 0
	w.stateSaved = false
	w.h = blobstore.NewIngestHash()
	// The ingest exists from now on (IngestOffset finds it at 0), as a
	// local ingest's directory does.
	return w.saveState(ctx)
}

// Offset is the number of bytes the ingest holds (resumed + written).
func (w *Writer) Offset() int64 { return w.durable + w.pendingSize + int64(len(w.buf)) }

// Digest is the sha256 of the Offset bytes.
func (w *Writer) Digest() digest.Digest { return digest.NewDigest(digest.SHA256, w.h) }

// Resumed is the offset the Writer started from.
func (w *Writer) Resumed() int64 { return w.resumed }

// Write buffers p, uploading a part whenever the buffer is full. After a
// failed part the Writer accepts nothing more; a new Writer for the ref
// resumes from the last durable state.
func (w *Writer) Write(p []byte) (int, error) {
	if w.closed || w.done {
		return 0, fmt.Errorf("s3store: write to closed ingest %s", w.ref)
	}
	if w.err != nil {
		return 0, w.err
	}
	ps := int(w.b.opts.PartSize)
	n := 0
	for len(p) > 0 {
		if w.buf == nil {
			w.buf = w.newBuf()
		}
		k := min(len(p), ps-len(w.buf))
		w.buf = append(w.buf, p[:k]...)
		w.h.Write(p[:k])
		p, n = p[k:], n+k
		if len(w.buf) == ps {
			if err := w.flushPart(w.ctx); err != nil {
				w.err = err
				return n, err
			}
		}
	}
	return n, nil
}

// partJob is one part uploading in the background.
type partJob struct {
	num  int32
	buf  []byte
	hash []byte        // marshalled sha256 of the ingest through this part
	done chan struct{} // closed when etag or err is set
	etag string
	err  error
}

func (w *Writer) newBuf() []byte {
	if k := len(w.spare); k > 0 {
		buf := w.spare[k-1]
		w.spare = w.spare[:k-1]
		return buf[:0]
	}
	return make([]byte, 0, w.b.opts.PartSize)
}

// flushPart hands the full buffer to a background upload as the next
// part and settles the parts that have finished; it waits when
// PartsInFlight are uploading. The first part after a resume that had a
// tail is waited for: the state names that tail until the part holding
// its bytes is durable.
func (w *Writer) flushPart(ctx context.Context) error {
	if err := w.startUpload(ctx); err != nil {
		return err
	}
	num := int32(len(w.parts) + len(w.pending) + 1)
	if num > maxParts {
		return fmt.Errorf("s3store: ingest %s needs more than %d parts of %d bytes", w.ref, maxParts, w.b.opts.PartSize)
	}
	hb, err := blobstore.MarshalHashState(w.h)
	if err != nil {
		return err
	}
	job := &partJob{num: num, buf: w.buf, hash: hb, done: make(chan struct{})}
	w.pending = append(w.pending, job)
	w.pendingSize += int64(len(job.buf))
	w.buf = nil
	key, id := w.b.ingestKey(w.ref, ingestData), w.uploadID
	go func() {
		defer close(job.done)
		job.etag, job.err = w.b.putPart(ctx, w.ref, key, id, job.num, job.buf)
	}()
	keep := w.b.opts.PartsInFlight - 1
	if w.tailEnd > 0 {
		keep = 0
	}
	return w.settle(ctx, keep)
}

// settle makes the finished parts at the head of pending durable (then
// saves the state once), waiting until at most keep are left. A failed
// part fails the Writer once every upload has ended; the state keeps
// what was durable before it.
func (w *Writer) settle(ctx context.Context, keep int) error {
	moved := false
	for len(w.pending) > 0 {
		job := w.pending[0]
		if len(w.pending) > keep {
			<-job.done
		} else {
			select {
			case <-job.done:
			default:
			}
		}
		select {
		case <-job.done:
		default:
			return w.saveSettled(ctx, moved)
		}
		if job.err != nil {
			for _, j := range w.pending[1:] {
				<-j.done
			}
			// pendingSize stays in Offset: the Writer accepted those
			// bytes (OpenIngest reports them dropped).
			w.pending = nil
			if err := w.saveSettled(ctx, moved); err != nil {
				return errors.Join(job.err, err)
			}
			return job.err
		}
		w.parts = append(w.parts, partInfo{Number: job.num, Size: int64(len(job.buf)), ETag: job.etag})
		w.durable += int64(len(job.buf))
		w.durableHash = job.hash
		w.pendingSize -= int64(len(job.buf))
		w.pending = w.pending[1:]
		w.spare = append(w.spare, job.buf)
		moved = true
	}
	return w.saveSettled(ctx, moved)
}

// saveSettled saves the state after parts became durable (moved); a tail
// the state named is then deleted: its bytes are in a part.
func (w *Writer) saveSettled(ctx context.Context, moved bool) error {
	if !moved {
		return nil
	}
	oldTail := w.tailEnd
	w.tailSaved, w.tailEnd = 0, 0
	if err := w.saveState(ctx); err != nil {
		return err
	}
	if oldTail > 0 {
		// The state no longer names the tail; a leftover is harmless.
		_ = w.b.deleteKey(ctx, w.b.tailKey(w.ref, oldTail))
	}
	return nil
}

// drain waits for every part uploading, ignoring their outcome (the
// Writer has failed or is being removed).
func (w *Writer) drain() {
	for _, j := range w.pending {
		<-j.done
	}
	w.pending = nil
}

// startUpload creates the multipart upload if there is none yet.
func (w *Writer) startUpload(ctx context.Context) error {
	if w.uploadID != "" {
		return nil
	}
	b := w.b
	key := b.ingestKey(w.ref, ingestData)
	var out *s3.CreateMultipartUploadOutput
	err := b.do(ctx, func(ctx context.Context) error {
		var err error
		out, err = b.cli.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &b.bucket, Key: &key})
		return err
	})
	if err != nil {
		return fmt.Errorf("s3store: start upload %s: %w", key, err)
	}
	w.uploadID = aws.ToString(out.UploadId)
	return nil
}

// putPart uploads p as part num and checks the server's ETag is its md5.
func (b *Backend) putPart(ctx context.Context, ref, key, uploadID string, num int32, p []byte) (string, error) {
	sum, hexsum := contentMD5(p)
	var etag string
	err := b.do(ctx, func(ctx context.Context) error {
		out, err := b.cli.UploadPart(ctx, &s3.UploadPartInput{
			Bucket: &b.bucket, Key: &key, UploadId: &uploadID, PartNumber: &num,
			Body: bytes.NewReader(p), ContentLength: aws.Int64(int64(len(p))), ContentMD5: &sum,
		})
		if err != nil {
			return err
		}
		etag = aws.ToString(out.ETag)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("s3store: upload part %d of %s: %w", num, ref, err)
	}
	if strings.Trim(etag, `"`) != hexsum {
		return "", fmt.Errorf("s3store: part %d of %s: server ETag %s is not the md5 %s of what was sent", num, ref, etag, hexsum)
	}
	return etag, nil
}

// uploadPart stores buf as the next part and waits for it (commit's
// last part); every part before it has settled.
func (w *Writer) uploadPart(ctx context.Context) error {
	if err := w.startUpload(ctx); err != nil {
		return err
	}
	num := int32(len(w.parts) + 1)
	if num > maxParts {
		return fmt.Errorf("s3store: ingest %s needs more than %d parts of %d bytes", w.ref, maxParts, w.b.opts.PartSize)
	}
	etag, err := w.b.putPart(ctx, w.ref, w.b.ingestKey(w.ref, ingestData), w.uploadID, num, w.buf)
	if err != nil {
		return err
	}
	w.parts = append(w.parts, partInfo{Number: num, Size: int64(len(w.buf)), ETag: etag})
	w.durable += int64(len(w.buf))
	return nil
}

func (w *Writer) saveState(ctx context.Context) error {
	st := ingestStateV1{Version: 1, UploadID: w.uploadID, Offset: w.durable, SHA256: w.durableHash, Parts: w.parts}
	if st.SHA256 == nil {
		hb, err := blobstore.MarshalHashState(blobstore.NewIngestHash())
		if err != nil {
			return err
		}
		st.SHA256 = hb
	}
	if w.tailSaved > 0 {
		sum := sha256.Sum256(w.buf[:w.tailSaved])
		st.Tail, st.TailSHA256 = w.tailSaved, hex.EncodeToString(sum[:])
	}
	raw, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if _, err = w.b.putCond(ctx, w.b.ingestKey(w.ref, ingestState), raw, false, ""); err != nil {
		return err
	}
	w.stateSaved = true
	return nil
}

// Close keeps the ingest resumable: bytes after the last part are saved as
// the tail object, then the state names them. A new Writer for the ref
// resumes at Offset.
func (w *Writer) Close() error {
	if w.closed || w.done {
		return nil
	}
	w.closed = true
	defer w.b.release(w.ref)
	w.b.mu.Lock()
	w.b.ended[w.ref] = w.Offset()
	w.b.mu.Unlock()
	if w.err != nil {
		w.drain()
		return nil
	}
	if err := w.settle(w.ctx, 0); err != nil {
		w.err = err
		return err
	}
	if int64(len(w.buf)) == w.tailSaved {
		if !w.stateSaved {
			// Opened and closed with nothing written (the registry's
			// upload session before its first byte): it must still be
			// there to resume, at 0, as on local disk.
			return w.saveState(w.ctx)
		}
		return nil
	}
	end := w.Offset()
	if _, err := w.b.putCond(w.ctx, w.b.tailKey(w.ref, end), w.buf, false, ""); err != nil {
		return err
	}
	oldTail := w.tailEnd
	w.tailSaved, w.tailEnd = int64(len(w.buf)), end
	if err := w.saveState(w.ctx); err != nil {
		return err
	}
	if oldTail > 0 {
		_ = w.b.deleteKey(w.ctx, w.b.tailKey(w.ref, oldTail))
	}
	return nil
}

// Cancel removes the ingest: the upload is aborted and its objects deleted.
func (w *Writer) Cancel() error {
	if w.done {
		return nil
	}
	w.b.mu.Lock()
	delete(w.b.ended, w.ref)
	w.b.mu.Unlock()
	if !w.closed {
		defer w.b.release(w.ref)
	}
	w.closed, w.done = true, true
	w.drain()
	w.buf = nil
	return w.b.removeIngest(context.WithoutCancel(w.ctx), w.ref, w.uploadID)
}

// removeIngest aborts uploadID (and any other upload at the ref's data
// key) and deletes the ref's objects.
func (b *Backend) removeIngest(ctx context.Context, ref, uploadID string) error {
	key := b.ingestKey(ref, ingestData)
	ids, err := b.uploadsAt(ctx, key)
	if err != nil {
		return err
	}
	if uploadID != "" && !contains(ids, uploadID) {
		ids = append(ids, uploadID)
	}
	var first error
	for _, id := range ids {
		if err := b.abort(ctx, key, id); err != nil && first == nil {
			first = err
		}
	}
	if err := b.deleteIngestObjects(ctx, ref); err != nil && first == nil {
		first = err
	}
	return first
}

func (b *Backend) tailKey(ref string, end int64) string {
	return b.ingestKey(ref, fmt.Sprintf("%s%d", ingestTail, end))
}

// deleteIngestObjects deletes every object under ingest/<ref>/.
func (b *Backend) deleteIngestObjects(ctx context.Context, ref string) error {
	var ks []string
	if err := b.list(ctx, b.ingestKey(ref, ""), "", func(k string, _ object) error {
		ks = append(ks, k)
		return nil
	}); err != nil {
		return err
	}
	for _, k := range ks {
		if err := b.deleteKey(ctx, k); err != nil {
			return err
		}
	}
	return nil
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// Committed is what Commit did.
type Committed struct {
	Digest digest.Digest
	Size   int64
	// Existed: the blob was already stored; its LastModified was renewed
	// and the ingest's bytes dropped.
	Existed bool
}

// commit checks size (-1 = any) and expected ("" = any) against what was
// written, then makes the blob visible at its key: in one PutObject when
// no part was uploaded, else by completing the upload under the ingest key
// and copying it server-side. A mismatch aborts the upload and removes the
// ingest (blobstore.ErrSizeMismatch / ErrDigestMismatch). Other failures
// leave the ingest resumable by a new Writer.
func (w *Writer) commit(ctx context.Context, size int64, expected digest.Digest) (Committed, error) {
	if w.done || w.closed {
		return Committed{}, fmt.Errorf("s3store: commit of finished ingest %s", w.ref)
	}
	if w.err != nil {
		return Committed{}, w.err
	}
	if err := w.settle(ctx, 0); err != nil {
		w.err = err
		_ = w.Close()
		return Committed{}, err
	}
	b := w.b
	total := w.Offset()
	if size >= 0 && size != total {
		_ = w.Cancel()
		return Committed{}, fmt.Errorf("%w: ingest %s has %d bytes, expected %d", blobstore.ErrSizeMismatch, w.ref, total, size)
	}
	d := digest.NewDigest(digest.SHA256, w.h)
	if expected != "" && d != expected {
		_ = w.Cancel()
		return Committed{}, fmt.Errorf("%w: ingest %s is %s, expected %s", blobstore.ErrDigestMismatch, w.ref, d, expected)
	}
	res := Committed{Digest: d, Size: total}
	fail := func(err error) (Committed, error) {
		// Keep what is durable for a retry by a new Writer.
		w.err = err
		_ = w.Close()
		return Committed{}, err
	}
	unlock := b.lockDigest(d)
	defer unlock()
	dst := b.blobKey(d.Encoded())
	existed := false
	if _, err := b.head(ctx, dst); err == nil {
		if existed, err = b.pinExisting(ctx, d.Encoded(), total); err != nil {
			return fail(err)
		}
	} else if !errors.Is(err, blobstore.ErrNotFound) {
		return fail(err)
	}
	if existed {
		res.Existed = true
	} else if len(w.parts) == 0 {
		if _, err := b.putCond(ctx, dst, w.buf, false, ""); err != nil {
			return fail(err)
		}
	} else {
		if len(w.buf) > 0 {
			if err := w.uploadPart(ctx); err != nil {
				return fail(err)
			}
			w.buf = w.buf[:0]
		}
		src := b.ingestKey(w.ref, ingestData)
		if err := b.complete(ctx, src, w.uploadID, w.parts, total); err != nil {
			return fail(err)
		}
		w.uploadID = "" // completed: nothing left to abort
		if err := b.copyBlob(ctx, src, dst, total); err != nil {
			return fail(err)
		}
	}
	w.done = true
	w.closed = true
	b.mu.Lock()
	delete(b.ended, w.ref)
	b.mu.Unlock()
	b.release(w.ref)
	// The blob is visible; the ingest's objects are garbage from here on
	// (a crash now leaves them to the next Writer or the sweeper).
	if err := b.removeIngest(context.WithoutCancel(ctx), w.ref, w.uploadID); err != nil {
		b.log.Warn("ingest left behind after commit", "ref", w.ref, "err", err)
	}
	return res, nil
}

// multipartETag is the ETag S3 gives a completed multipart object:
// md5 of the parts' binary md5s, "-", the part count.
func multipartETag(parts []partInfo) string {
	h := md5.New()
	for _, p := range parts {
		s, _ := hex.DecodeString(strings.Trim(p.ETag, `"`))
		h.Write(s)
	}
	return fmt.Sprintf("%x-%d", h.Sum(nil), len(parts))
}

// complete finishes the upload and checks the object it made. A retry
// after a lost reply finds the upload gone; the object's ETag and size then
// tell whether the first try succeeded.
func (b *Backend) complete(ctx context.Context, key, uploadID string, parts []partInfo, size int64) error {
	cp := make([]types.CompletedPart, len(parts))
	for i, p := range parts {
		cp[i] = types.CompletedPart{PartNumber: aws.Int32(p.Number), ETag: aws.String(p.ETag)}
	}
	err := b.do(ctx, func(ctx context.Context) error {
		_, err := b.cli.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
			Bucket: &b.bucket, Key: &key, UploadId: &uploadID,
			MultipartUpload: &types.CompletedMultipartUpload{Parts: cp},
		})
		return err
	})
	if err != nil && !uploadGone(err) {
		return fmt.Errorf("s3store: complete %s: %w", key, err)
	}
	o, herr := b.head(ctx, key)
	if herr != nil {
		if err != nil {
			return fmt.Errorf("s3store: complete %s: %w", key, err)
		}
		return herr
	}
	if want := multipartETag(parts); o.Size != size || strings.Trim(o.ETag, `"`) != want {
		return fmt.Errorf("s3store: completed %s is %d bytes, ETag %s; want %d bytes, %s", key, o.Size, o.ETag, size, want)
	}
	return nil
}

// listParts returns the upload's parts by number (paginated).
func (b *Backend) listParts(ctx context.Context, key, uploadID string) (map[int32]partInfo, error) {
	have := map[int32]partInfo{}
	in := &s3.ListPartsInput{Bucket: &b.bucket, Key: &key, UploadId: &uploadID}
	for {
		var out *s3.ListPartsOutput
		err := b.do(ctx, func(ctx context.Context) error {
			var err error
			out, err = b.cli.ListParts(ctx, in)
			return err
		})
		if err != nil {
			return nil, err
		}
		for _, p := range out.Parts {
			n := aws.ToInt32(p.PartNumber)
			have[n] = partInfo{Number: n, Size: aws.ToInt64(p.Size), ETag: aws.ToString(p.ETag)}
		}
		if !aws.ToBool(out.IsTruncated) || out.NextPartNumberMarker == nil {
			return have, nil
		}
		in.PartNumberMarker = out.NextPartNumberMarker
	}
}

// uploadsAt lists the ids of the multipart uploads at exactly key.
func (b *Backend) uploadsAt(ctx context.Context, key string) ([]string, error) {
	var ids []string
	err := b.listUploads(ctx, key, func(u types.MultipartUpload) error {
		if aws.ToString(u.Key) == key {
			ids = append(ids, aws.ToString(u.UploadId))
		}
		return nil
	})
	return ids, err
}

// listUploads calls fn for every multipart upload under prefix.
func (b *Backend) listUploads(ctx context.Context, prefix string, fn func(types.MultipartUpload) error) error {
	in := &s3.ListMultipartUploadsInput{Bucket: &b.bucket, Prefix: &prefix}
	for {
		var out *s3.ListMultipartUploadsOutput
		err := b.do(ctx, func(ctx context.Context) error {
			var err error
			out, err = b.cli.ListMultipartUploads(ctx, in)
			return err
		})
		if err != nil {
			return fmt.Errorf("s3store: list uploads %s: %w", prefix, err)
		}
		for _, u := range out.Uploads {
			if err := fn(u); err != nil {
				return err
			}
		}
		if !aws.ToBool(out.IsTruncated) {
			return nil
		}
		in.KeyMarker, in.UploadIdMarker = out.NextKeyMarker, out.NextUploadIdMarker
	}
}

// abort aborts an upload; one already gone is no error.
func (b *Backend) abort(ctx context.Context, key, uploadID string) error {
	err := b.do(ctx, func(ctx context.Context) error {
		_, err := b.cli.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{Bucket: &b.bucket, Key: &key, UploadId: &uploadID})
		if uploadGone(err) {
			return nil
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("s3store: abort upload %s of %s: %w", uploadID, key, err)
	}
	return nil
}

// IngestOffset is the offset a new Writer for ref would resume from, as
// far as the state object says; blobstore.ErrNotFound if there is none.
func (b *Backend) IngestOffset(ctx context.Context, ref string) (int64, error) {
	if err := blobstore.ValidateName(ref); err != nil {
		return 0, err
	}
	raw, _, err := b.getSmall(ctx, b.ingestKey(ref, ingestState))
	if err != nil {
		return 0, err
	}
	st, _, err := parseState(raw)
	if err != nil {
		return 0, nil
	}
	return st.Offset + st.Tail, nil
}

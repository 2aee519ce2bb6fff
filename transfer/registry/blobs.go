package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/transfer/crcframe"
	"imagestore/transfer/oci"
)

type countingReader struct {
	r io.ReadSeeker
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func (c *countingReader) Seek(off int64, whence int) (int64, error) { return c.r.Seek(off, whence) }

// serveMissingBlob answers for a blob the store could not stat or open
// (err): a rendered image config is served from memory, any other miss
// is the store's error.
func (s *Server) serveMissingBlob(w http.ResponseWriter, r *http.Request, d digest.Digest, err error) {
	if cfg, ok := s.config(d); ok && errors.Is(err, blobstore.ErrNotFound) {
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(cfg))
		return
	}
	storeError(w, err, oci.CodeBlobUnknown)
}

func (s *Server) serveBlob(w http.ResponseWriter, r *http.Request, name, ref string) {
	if r.Method == http.MethodDelete {
		// A blob is stored once per store and shared by every image (in any
		// repository) whose chain holds it; GC frees it when no record does.
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, http.StatusMethodNotAllowed, oci.CodeUnsupported,
			"blobs are shared by content and freed by GC once no image references them: delete the manifest instead", nil)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		methodNotAllowed(w, "GET, HEAD")
		return
	}
	d, err := parseDigest(ref)
	if err != nil {
		writeError(w, http.StatusBadRequest, oci.CodeDigestInvalid, err.Error(), nil)
		return
	}
	w.Header().Set(oci.HeaderContentDigest, d.String())
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("ETag", `"`+d.String()+`"`)
	if r.Method == http.MethodHead {
		// A HEAD asks whether the store holds the blob now (a client
		// skips uploading what it holds): the store's own answer, not an
		// open, which may reuse a recently opened blob's size (S3).
		info, err := s.st.Stat(r.Context(), d)
		if err != nil {
			s.serveMissingBlob(w, r, d, err)
			return
		}
		// ServeContent answers a HEAD from the size alone; it never reads.
		http.ServeContent(w, r, "", time.Time{}, io.NewSectionReader(noBytes{}, 0, info.Size))
		return
	}
	b, err := s.st.OpenBlob(r.Context(), d)
	if err != nil {
		s.serveMissingBlob(w, r, d, err)
		return
	}
	defer b.Close()
	size := b.Size()
	if r.Method == http.MethodGet && r.Header.Get("Range") == "" && size > 0 && acceptsZstd(r.Header.Get("Accept-Encoding")) &&
		oci.Compressible(io.NewSectionReader(b, 0, size)) {
		w.Header().Set("Content-Encoding", "zstd")
		w.Header().Set("Vary", "Accept-Encoding")
		zw, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(1<<20))
		if err != nil {
			storeError(w, err, oci.CodeBlobUnknown)
			return
		}
		var src io.Reader = io.NewSectionReader(b, 0, size)
		if rr, ok := b.(blobstore.RangeReader); ok {
			body, err := rr.ReadRange(r.Context(), 0, size)
			if err != nil {
				zw.Close()
				storeError(w, err, oci.CodeBlobUnknown)
				return
			}
			defer body.Close()
			src = body
		}
		n, err := io.CopyBuffer(zw, src, make([]byte, 1<<20))
		if err == nil {
			err = zw.Close()
		} else {
			zw.Close()
		}
		s.m.SentBytes.Add(float64(n))
		if err != nil {
			s.log.Debug("blob download cut", "blob", d, "sent", n, "err", err)
		}
		return
	}
	if f := s.blobFile(d, size); f != nil {
		// A blob on local disk is served from its own file, so that the
		// kernel copies it to the socket (sendfile) instead of a read
		// into our buffer and a write out of it: a pull reads every layer
		// by ranges from here.
		defer f.Close()
		cw := &countingResponse{ResponseWriter: w}
		http.ServeContent(cw, r, "", time.Time{}, f)
		s.m.SentBytes.Add(float64(cw.n))
		return
	}
	cr := &countingReader{r: io.NewSectionReader(b, 0, size)}
	if rr, ok := b.(blobstore.RangeReader); ok && r.Method == http.MethodGet {
		// A backend that streams a range better than it answers ReadAt
		// calls (S3: one GET, or readahead, instead of a GET per read)
		// serves a sequential range as a stream. Small ranges (a
		// client's qcow2 header and table reads) keep ReadAt and its
		// cache.
		if start, end, ok := wantedRange(r.Header.Get("Range"), size); ok && end-start >= streamRangeMin {
			rs := &rangeSeeker{ctx: r.Context(), rr: rr, size: size, end: end}
			defer rs.Close()
			cr.r = rs
			bw := &bulkResponse{ResponseWriter: w, src: cr, rs: rs, bufs: &s.copyBufs}
			defer bw.done()
			w = bw
		}
	}
	http.ServeContent(w, r, "", time.Time{}, cr)
	s.m.SentBytes.Add(float64(cr.n))
}

// noBytes is the content of a HEAD answer: never read.
type noBytes struct{}

func (noBytes) ReadAt([]byte, int64) (int, error) {
	return 0, errors.New("registry: a HEAD answer has no body")
}

// streamRangeMin is the smallest range served through a RangeReader.
const streamRangeMin = 256 << 10

// wantedRange is the byte range [start, end) a GET asks for: the whole
// blob without a Range header, a single "bytes=a-b" or "bytes=a-" range;
// ok is false for anything else (suffix or several ranges, malformed),
// which http.ServeContent then answers by itself.
func wantedRange(h string, size int64) (start, end int64, ok bool) {
	if h == "" {
		return 0, size, true
	}
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	a, b, found := strings.Cut(strings.TrimSpace(spec), "-")
	if !found || a == "" {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil || start < 0 || start >= size {
		return 0, 0, false
	}
	if b == "" {
		return start, size, true
	}
	last, err := strconv.ParseInt(b, 10, 64)
	if err != nil || last < start {
		return 0, 0, false
	}
	return start, min(last, size-1) + 1, true
}

// rangeSeeker is the io.ReadSeeker http.ServeContent reads a range from:
// the first Read after a Seek opens one ReadRange from there to end.
type rangeSeeker struct {
	ctx       context.Context
	rr        blobstore.RangeReader
	size, end int64
	pos       int64
	body      io.ReadCloser
}

func (s *rangeSeeker) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += s.pos
	case io.SeekEnd:
		off += s.size
	default:
		return s.pos, fmt.Errorf("registry: seek whence %d", whence)
	}
	if off < 0 {
		return s.pos, fmt.Errorf("registry: seek to %d", off)
	}
	if off != s.pos {
		s.Close()
		s.pos = off
	}
	return off, nil
}

func (s *rangeSeeker) Read(p []byte) (int, error) {
	if s.body == nil {
		end := s.end
		if s.pos >= end {
			// A read outside the range asked for (ServeContent does not):
			// to the blob's end.
			end = s.size
		}
		if s.pos >= end {
			return 0, io.EOF
		}
		body, err := s.rr.ReadRange(s.ctx, s.pos, end-s.pos)
		if err != nil {
			return 0, err
		}
		s.body = body
	}
	n, err := s.body.Read(p)
	s.pos += int64(n)
	return n, err
}

// writeN writes the n bytes at pos to w from one ReadRange of exactly
// them: a body that writes itself (io.WriterTo) does, else they are
// copied through buf(). Fewer than n bytes is an error.
func (s *rangeSeeker) writeN(w io.Writer, n int64, buf func() []byte) (int64, error) {
	if n <= 0 {
		return 0, nil
	}
	if s.body != nil || s.pos+n > s.size {
		// Not the fresh range writeN opens (ServeContent never does
		// this): read on as Read does.
		return io.CopyBuffer(w, io.LimitReader(s, n), buf())
	}
	body, err := s.rr.ReadRange(s.ctx, s.pos, n)
	if err != nil {
		return 0, err
	}
	s.body = body
	var written int64
	if wt, ok := body.(io.WriterTo); ok {
		written, err = wt.WriteTo(w)
	} else {
		written, err = io.CopyBuffer(w, body, buf())
	}
	s.pos += written
	s.Close()
	if err == nil && written != n {
		err = fmt.Errorf("registry: range of %d bytes at %d ended after %d: %w", n, s.pos-written, written, io.ErrUnexpectedEOF)
	}
	return written, err
}

func (s *rangeSeeker) Close() error {
	if s.body == nil {
		return nil
	}
	err := s.body.Close()
	s.body = nil
	return err
}

// blobFile opens blob d's file when the store keeps it as one (the
// local backend: BlobPath) and it is the size the store says; else nil.
func (s *Server) blobFile(d digest.Digest, size int64) *os.File {
	p, err := s.st.BlobPath(d)
	if err != nil {
		return nil
	}
	f, err := os.Open(p)
	if err != nil {
		return nil
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() || st.Size() != size {
		f.Close()
		return nil
	}
	return f
}

// streamCopyBuf is the copy buffer of a streamed range: a client's 1 MiB
// range goes to the socket in one write, not in io.Copy's 32 KiB pieces
// (32 write system calls, each waking the client's reader).
const streamCopyBuf = 1 << 20

// bulkResponse is the response writer of a streamed range: it takes over
// http.ServeContent's copy of the range (which ends in the writer's
// ReadFrom), so that a range the backend holds in memory (S3's readahead
// chunks) goes from the backend's buffers to the socket in large writes,
// with no copy of ours, and any other in writes of streamCopyBuf bytes.
type bulkResponse struct {
	http.ResponseWriter
	src  *countingReader // ServeContent's content, reading rs
	rs   *rangeSeeker
	bufs *sync.Pool // *[]byte of streamCopyBuf bytes
	buf  *[]byte    // from bufs, once needed
}

func (b *bulkResponse) ReadFrom(r io.Reader) (int64, error) {
	// The bare Writer hides the response's own ReadFrom (32 KiB copies).
	w := struct{ io.Writer }{b.ResponseWriter}
	// ServeContent copies the range as io.CopyN(w, content, length),
	// which hands us our content under an io.LimitedReader: the range is
	// then opened for exactly those bytes, and the backend's body writes
	// them itself (io.WriterTo) if it can. Any other reader is copied.
	if lr, ok := r.(*io.LimitedReader); ok && lr.R == io.Reader(b.src) {
		n, err := b.rs.writeN(w, lr.N, b.buffer)
		lr.N -= n
		b.src.n += n
		return n, err
	}
	return io.CopyBuffer(w, r, b.buffer())
}

func (b *bulkResponse) buffer() []byte {
	if b.buf == nil {
		b.buf = b.bufs.Get().(*[]byte)
	}
	return *b.buf
}

// done returns the copy buffer, if one was taken.
func (b *bulkResponse) done() {
	if b.buf != nil {
		b.bufs.Put(b.buf)
		b.buf = nil
	}
}

// countingResponse counts the body bytes written, keeping the response's
// ReadFrom (which hands a file to sendfile).
type countingResponse struct {
	http.ResponseWriter
	n int64
}

func (c *countingResponse) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingResponse) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	var err error
	if rf, ok := c.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(struct{ io.Writer }{c.ResponseWriter}, r)
	}
	c.n += n
	return n, err
}

func acceptsZstd(h string) bool {
	for _, p := range strings.Split(h, ",") {
		p, q, _ := strings.Cut(p, ";")
		if strings.EqualFold(strings.TrimSpace(p), "zstd") && strings.TrimSpace(q) != "q=0" {
			return true
		}
	}
	return false
}

func ingestRef(id string) string { return "upload-" + id }

func validSessionID(id string) bool {
	if len(id) != 32 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func (s *Server) uploadHeaders(w http.ResponseWriter, name, id string, off int64) {
	w.Header().Set("Location", "/v2/"+name+"/blobs/uploads/"+id)
	w.Header().Set(oci.HeaderUploadUUID, id)
	// The distribution spec's form: "0-<last byte>", and "0-0" for an
	// empty upload too (clients read it as "nothing yet" there).
	w.Header().Set("Range", fmt.Sprintf("0-%d", max(off-1, 0)))
	w.Header().Set(oci.HeaderUploadOffset, strconv.FormatInt(off, 10))
}

func (s *Server) serveUpload(w http.ResponseWriter, r *http.Request, name, id string) {
	if id == "" {
		if r.Method != http.MethodPost {
			methodNotAllowed(w, "POST")
			return
		}
		s.startUpload(w, r, name)
		return
	}
	if !validSessionID(id) {
		writeError(w, http.StatusNotFound, oci.CodeBlobUploadUnknown, "unknown upload", id)
		return
	}
	ref := ingestRef(id)
	off, err := s.st.IngestOffset(ref)
	if err != nil {
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	switch r.Method {
	case http.MethodGet:
		if s.uploadBusy(id) {
			// A request still writing it (one whose client was cut
			// and has not noticed) will add its bytes: the checkpoint
			// is not where a resumed PATCH, which has no Content-Range,
			// would land. Answer as a PATCH would find it: retry.
			storeError(w, fmt.Errorf("%w: upload %s is being written; its offset is not final", blobstore.ErrLocked, id), oci.CodeBlobUploadUnknown)
			return
		}
		s.uploadHeaders(w, name, id, off)
		w.WriteHeader(http.StatusNoContent)
	case http.MethodPatch:
		s.patchUpload(w, r, name, id)
	case http.MethodPut:
		s.finishUpload(w, r, name, id)
	case http.MethodDelete:
		wr, err := s.st.Writer(r.Context(), ref)
		if err != nil {
			storeError(w, err, oci.CodeBlobUploadUnknown)
			return
		}
		if err := wr.Cancel(); err != nil {
			storeError(w, err, oci.CodeBlobUploadUnknown)
			return
		}
		s.dropZeros(id)
		w.WriteHeader(http.StatusNoContent)
	default:
		methodNotAllowed(w, "GET, PATCH, PUT, DELETE")
	}
}

func (s *Server) startUpload(w http.ResponseWriter, r *http.Request, name string) {
	q := r.URL.Query()
	if m := q.Get("mount"); m != "" {
		// Blobs are global in the store: a mount succeeds iff we hold it.
		// The client then pushes a manifest naming the blob without
		// uploading it, so hold it (before looking) long enough for that.
		if d, err := parseDigest(m); err == nil && s.holdMounted(d) {
			w.Header().Set("Location", "/v2/"+name+"/blobs/"+d.String())
			w.Header().Set(oci.HeaderContentDigest, d.String())
			w.WriteHeader(http.StatusCreated)
			return
		}
	}
	if ds := q.Get("digest"); ds != "" {
		d, err := parseDigest(ds)
		if err != nil {
			writeError(w, http.StatusBadRequest, oci.CodeDigestInvalid, err.Error(), nil)
			return
		}
		body, err := s.requestBody(r, r.ContentLength)
		if err != nil {
			writeError(w, http.StatusBadRequest, oci.CodeBlobUploadInvalid, err.Error(), nil)
			return
		}
		size := r.ContentLength
		if r.Header.Get("Content-Encoding") != "" {
			size = -1
		}
		z := &layer.ZeroBlocks{}
		got, n, err := s.st.Put(r.Context(), io.TeeReader(body, z), size, d)
		body.Close()
		s.m.ReceivedBytes.Add(float64(n))
		if err != nil {
			storeError(w, err, oci.CodeBlobUploadUnknown)
			return
		}
		s.keepBlobZeros(got, z, n)
		w.Header().Set("Location", "/v2/"+name+"/blobs/"+got.String())
		w.Header().Set(oci.HeaderContentDigest, got.String())
		w.WriteHeader(http.StatusCreated)
		return
	}
	id := newSessionID()
	wr, err := s.st.Writer(r.Context(), ingestRef(id))
	if err != nil {
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	if err := wr.Close(); err != nil {
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	s.uploadHeaders(w, name, id, 0)
	// The checked upload (oci.ExtCRC32CFrames): crc32c-framed bodies
	// (requestBody) and a completing PUT by size (finishUpload).
	w.Header().Set(oci.HeaderUploadExtensions, oci.ExtCRC32CFrames)
	w.WriteHeader(http.StatusAccepted)
}

// requestBody decodes Content-Encoding (identity, zstd or crc32c frames).
// limit >= 0 bounds the decoded bytes, so a zstd bomb cannot write more
// than the client declared.
func (s *Server) requestBody(r *http.Request, limit int64) (io.ReadCloser, error) {
	switch enc := strings.ToLower(r.Header.Get("Content-Encoding")); enc {
	case crcframe.Encoding:
		// Each frame is checked before any of its bytes is handed on, so
		// the ingest only ever takes bytes that arrived as they were sent.
		fr := crcframe.NewReader(r.Body)
		if limit >= 0 {
			return &strictBody{r: io.LimitReader(fr, limit+1), left: limit}, nil
		}
		return framedBody{fr}, nil
	case "", "identity":
		if limit >= 0 {
			// More than declared fails (oci.ErrTooLarge), never truncated.
			return &strictBody{r: io.LimitReader(r.Body, limit+1), left: limit}, nil
		}
		return r.Body, nil
	case "zstd":
		if limit < 0 {
			return nil, errors.New("a zstd-encoded body needs a Content-Range or Content-Length bounding its decoded size")
		}
		zr, err := zstdDecoder(r.Body)
		if err != nil {
			return nil, err
		}
		return &boundedBody{zr: zr, r: io.LimitReader(zr, limit+1), left: limit}, nil
	default:
		return nil, fmt.Errorf("unsupported Content-Encoding %q", enc)
	}
}

// framedBody is an unbounded crc32c-framed body; it keeps the Reader's
// WriteTo, which hands each verified frame to the ingest from its own
// buffer.
type framedBody struct{ *crcframe.Reader }

func (framedBody) Close() error { return nil }

// bodyError answers a chunk whose body failed, at upload offset before,
// when the failure is the body's encoding (a frame that failed its
// crc32c, a malformed frame); false for any other error.
func bodyError(w http.ResponseWriter, err error, before int64) bool {
	var ce *crcframe.ChecksumError
	switch {
	case errors.As(err, &ce):
		writeError(w, http.StatusBadRequest, oci.CodeChecksumInvalid,
			fmt.Sprintf("upload bytes %d-%d: %v; none of them was accepted, the upload holds the %d bytes before them",
				before+ce.Offset, before+ce.Offset+int64(ce.Length)-1, err, before+ce.Offset), nil)
	case errors.Is(err, crcframe.ErrMalformed):
		writeError(w, http.StatusBadRequest, oci.CodeBlobUploadInvalid, err.Error(), nil)
	default:
		return false
	}
	return true
}

// framed reports whether r's body is in crc32c frames.
func framed(r *http.Request) bool {
	return strings.ToLower(r.Header.Get("Content-Encoding")) == crcframe.Encoding
}

// ingestContext is the context of a chunk's ingest writer: the request's
// values without its cancellation. net/http cancels a request's context
// when a read of its body fails (a cut or stalled client), and the bytes
// the body delivered before, some of them still gathered (copyBody), must
// reach the upload all the same; the handler ends with its body anyway.
func ingestContext(r *http.Request) context.Context {
	return context.WithoutCancel(r.Context())
}

// copyBody copies a chunk's decoded body into the ingest. A framed body's
// small frames are gathered into writes of up to 1 MiB: each ingest write
// costs a syscall and a hash call, so writing frame by frame let a client
// of 1-byte frames (which the encoding allows) keep a core of the store
// busy for ~2 MB/s of wire. Frames of gatherDirect or more (our client
// sends 4 MiB) go through one write each, uncopied. Every frame read
// before an error is written before copyBody returns.
func copyBody(dst io.Writer, body io.Reader, framed bool) error {
	if !framed {
		_, err := io.CopyBuffer(dst, body, make([]byte, 1<<20))
		return err
	}
	g := &gatherWriter{w: dst}
	_, err := io.CopyBuffer(g, body, make([]byte, 1<<20))
	if ferr := g.flush(); ferr != nil {
		err = ferr // the ingest's own failure: it holds less than was read
	}
	return err
}

// gatherDirect is the smallest write gatherWriter passes on as it is.
const gatherDirect = 64 << 10

// gatherWriter gathers writes under gatherDirect bytes into writes of up
// to 1 MiB (the buffer is made at the first small write); a larger write
// goes through as it is, after what was gathered. A failed write of w is
// sticky.
type gatherWriter struct {
	w   io.Writer
	buf []byte
	err error
}

func (g *gatherWriter) Write(p []byte) (int, error) {
	if len(p) >= gatherDirect {
		if err := g.flush(); err != nil {
			return 0, err
		}
		n, err := g.w.Write(p)
		g.err = err
		return n, err
	}
	if g.buf == nil {
		g.buf = make([]byte, 0, 1<<20)
	}
	if len(g.buf)+len(p) > cap(g.buf) {
		if err := g.flush(); err != nil {
			return 0, err
		}
	}
	if g.err != nil {
		return 0, g.err
	}
	g.buf = append(g.buf, p...)
	return len(p), nil
}

// flush writes what was gathered.
func (g *gatherWriter) flush() error {
	if g.err != nil || len(g.buf) == 0 {
		return g.err
	}
	_, g.err = g.w.Write(g.buf)
	g.buf = g.buf[:0]
	return g.err
}

type boundedBody struct {
	zr   *zstd.Decoder
	r    io.Reader
	left int64
}

func (b *boundedBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		return n + int(b.left), fmt.Errorf("%w: decoded body exceeds its declared size", oci.ErrTooLarge)
	}
	return n, err
}

func (b *boundedBody) Close() error { b.zr.Close(); return nil }

// strictBody is an identity body bounded to its declared length: a byte
// more is an error, not silently dropped.
type strictBody struct {
	r    io.Reader
	left int64
}

func (b *strictBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		return n + int(b.left), fmt.Errorf("%w: the body is longer than its declared size", oci.ErrTooLarge)
	}
	return n, err
}

func (b *strictBody) Close() error { return nil }

// errShortBody: a chunk's body ended before the length it declared.
var errShortBody = errors.New("body shorter than declared")

// parseContentRange reads "start-end" (inclusive), optionally "bytes "
// prefixed, and returns the start and the length (end-start+1, 0 for
// "n-(n-1)"). An end of 2^63-1 is refused: its length would overflow.
func parseContentRange(h string) (start, length int64, ok bool) {
	h = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(h), "bytes"))
	h, _, _ = strings.Cut(h, "/")
	a, b, found := strings.Cut(strings.TrimSpace(h), "-")
	if !found {
		return 0, 0, false
	}
	s, err1 := strconv.ParseInt(a, 10, 64)
	e, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || s < 0 || e < s-1 || e == math.MaxInt64 {
		return 0, 0, false
	}
	return s, e - s + 1, true
}

// chunkLimit is the length a chunk declares: its Content-Range (which
// must start at off and, for an identity body, agree with Content-Length),
// else its Content-Length; -1 if neither. A mismatch answers 400 (or 416
// for the start) and returns ok false.
func (s *Server) chunkLimit(w http.ResponseWriter, r *http.Request, name, id string, off int64) (limit int64, ok bool) {
	identity := r.Header.Get("Content-Encoding") == ""
	cr := r.Header.Get("Content-Range")
	if cr == "" {
		if identity && r.ContentLength >= 0 {
			return r.ContentLength, true
		}
		return -1, true
	}
	start, n, valid := parseContentRange(cr)
	if !valid {
		writeError(w, http.StatusBadRequest, oci.CodeBlobUploadInvalid, "bad Content-Range", cr)
		return 0, false
	}
	if start != off {
		s.uploadHeaders(w, name, id, off)
		writeError(w, http.StatusRequestedRangeNotSatisfiable, oci.CodeRangeInvalid,
			fmt.Sprintf("upload is at offset %d, chunk starts at %d", off, start), nil)
		return 0, false
	}
	if identity && r.ContentLength >= 0 && r.ContentLength != n {
		writeError(w, http.StatusBadRequest, oci.CodeBlobUploadInvalid,
			fmt.Sprintf("Content-Length %d does not match the %d bytes of Content-Range %s", r.ContentLength, n, cr), nil)
		return 0, false
	}
	return n, true
}

// writingUpload marks upload id as being written by this request until
// the returned func is called (after the request's Writer is closed).
func (s *Server) writingUpload(id string) (done func()) {
	s.wmu.Lock()
	s.writing[id]++
	s.wmu.Unlock()
	return func() {
		s.wmu.Lock()
		if s.writing[id]--; s.writing[id] <= 0 {
			delete(s.writing, id)
		}
		s.wmu.Unlock()
	}
}

// uploadBusy reports whether a request is writing upload id.
func (s *Server) uploadBusy(id string) bool {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.writing[id] > 0
}

func (s *Server) patchUpload(w http.ResponseWriter, r *http.Request, name, id string) {
	defer s.writingUpload(id)() // runs after wr.Close
	defer s.guardBody(w, r)()
	wr, err := s.st.Writer(ingestContext(r), ingestRef(id))
	if err != nil {
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	defer wr.Close()
	limit, ok := s.chunkLimit(w, r, name, id, wr.Offset())
	if !ok {
		return
	}
	body, err := s.requestBody(r, limit)
	if err != nil {
		writeError(w, http.StatusBadRequest, oci.CodeBlobUploadInvalid, err.Error(), nil)
		return
	}
	defer body.Close()
	before := wr.Offset()
	err = copyBody(recordingWriter{w: wr, z: s.zerosFor(id, before)}, body, framed(r))
	s.m.ReceivedBytes.Add(float64(wr.Offset() - before))
	if err == nil && limit >= 0 && wr.Offset()-before != limit {
		// A body shorter than it declared: what arrived stays, the Range
		// header says where the upload is.
		err = fmt.Errorf("%w: the body has %d bytes, the request declared %d", errShortBody, wr.Offset()-before, limit)
	}
	if errors.Is(err, errShortBody) {
		off := wr.Offset()
		if cerr := wr.Close(); cerr == nil {
			s.uploadHeaders(w, name, id, off)
		}
		writeError(w, http.StatusBadRequest, oci.CodeBlobUploadInvalid, err.Error(), nil)
		return
	}
	if err != nil {
		// What arrived stays in the ingest; Close checkpoints it so the
		// client resumes from the durable offset (GET on the upload).
		if bodyError(w, err, before) {
			return
		}
		if errors.Is(err, oci.ErrTooLarge) {
			wr.Cancel()
			s.dropZeros(id)
			writeError(w, http.StatusBadRequest, oci.CodeSizeInvalid, err.Error(), nil)
			return
		}
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	off := wr.Offset()
	if err := wr.Close(); err != nil {
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	s.uploadHeaders(w, name, id, off)
	w.WriteHeader(http.StatusAccepted)
}

// finishUpload completes an upload: PUT ?digest=<d> (the distribution
// protocol: the store checks the digest), or, in the checked upload,
// PUT ?size=<bytes> without a digest: the store checks the size and
// commits under the digest it computed from the bytes it accepted. Either
// way the blob appears only after the store's own hash and size checks.
func (s *Server) finishUpload(w http.ResponseWriter, r *http.Request, name, id string) {
	defer s.writingUpload(id)()
	defer s.guardBody(w, r)()
	q := r.URL.Query()
	var d digest.Digest
	size := int64(-1)
	if ds, ss := q.Get("digest"), q.Get("size"); ds == "" && ss != "" {
		n, err := strconv.ParseInt(ss, 10, 64)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, oci.CodeSizeInvalid, "PUT ?size= needs a byte count", ss)
			return
		}
		size = n
	} else {
		var err error
		if d, err = parseDigest(ds); err != nil {
			writeError(w, http.StatusBadRequest, oci.CodeDigestInvalid, "PUT needs ?digest= (or, in a checked upload, ?size=): "+err.Error(), nil)
			return
		}
	}
	wr, err := s.st.Writer(ingestContext(r), ingestRef(id))
	if err != nil {
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	limit, ok := s.chunkLimit(w, r, name, id, wr.Offset())
	if !ok {
		wr.Close()
		return
	}
	body, err := s.requestBody(r, limit)
	if err != nil {
		wr.Close()
		writeError(w, http.StatusBadRequest, oci.CodeBlobUploadInvalid, err.Error(), nil)
		return
	}
	before := wr.Offset()
	err = copyBody(recordingWriter{w: wr, z: s.zerosFor(id, before)}, body, framed(r))
	body.Close()
	s.m.ReceivedBytes.Add(float64(wr.Offset() - before))
	if err == nil && limit >= 0 && wr.Offset()-before != limit {
		err = fmt.Errorf("%w: the body has %d bytes, the request declared %d", errShortBody, wr.Offset()-before, limit)
	}
	if err != nil {
		wr.Close()
		if bodyError(w, err, before) {
			return
		}
		if errors.Is(err, errShortBody) || errors.Is(err, oci.ErrTooLarge) {
			writeError(w, http.StatusBadRequest, oci.CodeBlobUploadInvalid, err.Error(), nil)
			return
		}
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	// Commit checks the size and digest asked for ("" = the digest it
	// computed); on a mismatch the ingest is removed, so nothing of it is
	// stored and the client must upload again.
	n := wr.Offset()
	got, err := wr.Commit(r.Context(), size, d)
	if err != nil {
		wr.Close()
		s.dropZeros(id)
		storeError(w, err, oci.CodeBlobUploadUnknown)
		return
	}
	s.committedZeros(id, got, n)
	w.Header().Set("Location", "/v2/"+name+"/blobs/"+got.String())
	w.Header().Set(oci.HeaderContentDigest, got.String())
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
}

// MountHold is how long a blob answered to a cross-repository mount is
// kept from GC: the client's manifest PUT, which records it, follows.
const MountHold = 30 * time.Minute

// holdMounted holds d for MountHold if the store has it.
func (s *Server) holdMounted(d digest.Digest) bool {
	release := s.st.Hold(d)
	if !s.st.Exists(d) {
		release()
		return false
	}
	time.AfterFunc(MountHold, release)
	return true
}

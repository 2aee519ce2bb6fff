// Package registry serves the store on the registry port (8000): the OCI
// distribution API under /v2 (blobs, resumable uploads, manifests, tags)
// and the replication API under /v1 (push, pull, tasks). See
// docs/replication.md.
//
// Beside the standard uploads, every upload session offers the checked
// upload (oci.ExtCRC32CFrames), which our CLI uses to leave the SHA-256 of
// a layer to the store: bodies in crc32c frames, each checked before any
// of its bytes reaches the ingest (requestBody, bodyError), and a
// completing PUT by size, committed under the digest the ingest computed
// (finishUpload). The store hashes every byte it stores either way; it
// never takes a digest on a client's word.
package registry

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/transfer/oci"
	"imagestore/transfer/replicate"
)

// Options configure a Server.
type Options struct {
	Store *blobstore.Store
	// Engine serves /v1/push, /v1/pull and /v1/tasks; nil = /v1 answers 404.
	Engine *replicate.Engine
	// Token, when set, is required on every request: "Authorization:
	// Bearer <token>" or Basic auth with any user and the token as password.
	Token   string
	Metrics *replicate.Metrics
	Logger  *slog.Logger
	// MaxBodyBytes bounds a /v1 request body (default 1 MiB).
	MaxBodyBytes int64
	// BodyReadIdle bounds how long an upload's body (PATCH, PUT) may
	// deliver no byte before the request fails (default 2 min): a client
	// that stalls mid-body, alive or not, neither holds its upload busy
	// nor keeps a connection and its goroutine forever. What arrived stays
	// in the upload; the client resumes from the upload's offset.
	BodyReadIdle time.Duration
}

// Server is the :8000 handler.
type Server struct {
	o   Options
	st  *blobstore.Store
	log *slog.Logger
	m   *replicate.Metrics

	mu      sync.Mutex
	configs map[digest.Digest][]byte        // rendered config blobs, served as blobs
	digests map[digest.Digest]blobstore.Ref // rendered manifest → its image (a hint, checked on use)

	copyBufs sync.Pool // *[]byte of streamCopyBuf bytes (blobs.go)

	zmu         sync.Mutex
	uploadZeros map[string]*uploadZeros             // upload id → its zero-block record (zeros.go)
	blobZeros   map[digest.Digest]*layer.ZeroBlocks // committed blob → its record, until its manifest

	wmu     sync.Mutex
	writing map[string]int // upload id → requests writing it now (writingUpload)
}

// New builds a Server.
func New(o Options) (*Server, error) {
	if o.Store == nil {
		return nil, errors.New("registry: Store is required")
	}
	if o.Metrics == nil {
		o.Metrics = replicate.NewMetrics(nil)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = 1 << 20
	}
	if o.BodyReadIdle <= 0 {
		o.BodyReadIdle = 2 * time.Minute
	}
	s := &Server{o: o, st: o.Store, log: o.Logger, m: o.Metrics, configs: map[digest.Digest][]byte{}, digests: map[digest.Digest]blobstore.Ref{},
		uploadZeros: map[string]*uploadZeros{}, blobZeros: map[digest.Digest]*layer.ZeroBlocks{}, writing: map[string]int{}}
	s.copyBufs.New = func() any { b := make([]byte, streamCopyBuf); return &b }
	return s, nil
}

// maxDigests bounds the manifest digest hints (a miss costs one scan of
// the repository's records, in memory).
const maxDigests = 1 << 16

func (s *Server) rememberDigest(rd *replicate.Rendered) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.digests) >= maxDigests {
		clear(s.digests)
	}
	s.digests[rd.Digest] = rd.Ref
}

func (s *Server) digestRef(d digest.Digest) (blobstore.Ref, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.digests[d]
	return r, ok
}

// maxConfigs bounds the in-memory cache of rendered config blobs.
const maxConfigs = 4096

func (s *Server) rememberConfig(d digest.Digest, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.configs[d]; ok {
		return
	}
	if len(s.configs) >= maxConfigs {
		for k := range s.configs { // drop an arbitrary entry; a miss only costs a re-render
			delete(s.configs, k)
			break
		}
	}
	s.configs[d] = b
}

// forgetConfig drops the config of a deleted image, so a client is not
// told the registry still holds it.
func (s *Server) forgetConfig(d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.configs, d)
}

func (s *Server) config(d digest.Digest) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.configs[d]
	return b, ok
}

// Handler returns the HTTP handler for the registry port.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Basic realm="imagestore"`)
			writeError(w, http.StatusUnauthorized, oci.CodeUnauthorized, "authentication required", nil)
			return
		}
		switch {
		case r.URL.Path == "/v2" || r.URL.Path == "/v2/":
			w.Header().Set(oci.HeaderAPIVersion, "registry/2.0")
			w.Header().Set(oci.HeaderEncodings, "zstd")
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, "{}")
		case r.URL.Path == "/v2/_catalog":
			s.serveCatalog(w, r)
		case strings.HasPrefix(r.URL.Path, "/v2/"):
			s.serveV2(w, r)
		case strings.HasPrefix(r.URL.Path, "/v1/"):
			s.serveV1(w, r)
		default:
			writeError(w, http.StatusNotFound, oci.CodeUnsupported, "no such endpoint", r.URL.Path)
		}
	})
}

func (s *Server) authorized(r *http.Request) bool {
	if s.o.Token == "" {
		return true
	}
	h := r.Header.Get("Authorization")
	var got string
	if t, ok := strings.CutPrefix(h, "Bearer "); ok {
		got = strings.TrimSpace(t)
	} else if _, pw, ok := r.BasicAuth(); ok {
		got = pw
	} else {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(s.o.Token)) == 1
}

func writeError(w http.ResponseWriter, status int, code, msg string, detail any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(oci.ErrorBody{Errors: []oci.ErrorInfo{{Code: code, Message: msg, Detail: detail}}})
}

// storeError maps a store error to an OCI error reply.
func storeError(w http.ResponseWriter, err error, notFoundCode string) {
	switch {
	case errors.Is(err, blobstore.ErrNotFound):
		writeError(w, http.StatusNotFound, notFoundCode, err.Error(), nil)
	case errors.Is(err, blobstore.ErrDigestMismatch):
		writeError(w, http.StatusBadRequest, oci.CodeDigestInvalid, err.Error(), nil)
	case errors.Is(err, blobstore.ErrSizeMismatch):
		writeError(w, http.StatusBadRequest, oci.CodeSizeInvalid, err.Error(), nil)
	case errors.Is(err, blobstore.ErrQuotaExceeded), errors.Is(err, blobstore.ErrNoSpace):
		writeError(w, http.StatusInsufficientStorage, oci.CodeQuotaExceeded, err.Error(), nil)
	case errors.Is(err, blobstore.ErrInvalidName):
		writeError(w, http.StatusBadRequest, oci.CodeNameInvalid, err.Error(), nil)
	case errors.Is(err, blobstore.ErrLocked):
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, oci.CodeBlobUploadInvalid, err.Error(), nil)
	case errors.Is(err, replicate.ErrConflict):
		writeError(w, http.StatusConflict, oci.CodeManifestInvalid, err.Error(), nil)
	case errors.Is(err, replicate.ErrIncomplete):
		writeError(w, http.StatusBadRequest, oci.CodeManifestBlobUnknown, err.Error(), nil)
	case errors.Is(err, oci.ErrManifestInvalid), errors.Is(err, blobstore.ErrParentNotFound), errors.Is(err, blobstore.ErrLoop), errors.Is(err, blobstore.ErrChainTooDeep):
		writeError(w, http.StatusBadRequest, oci.CodeManifestInvalid, err.Error(), nil)
	case errors.Is(err, context.Canceled):
		writeError(w, 499, oci.CodeUnsupported, "request cancelled", nil)
	default:
		writeError(w, http.StatusInternalServerError, oci.CodeUnsupported, err.Error(), nil)
	}
}

// serveV2 routes /v2/<name>/{blobs,manifests,tags}/… A name may hold
// "/" in the distribution grammar, so the route is found from the end
// (the last blobs/manifests/tags segment that makes a whole route). Our
// repositories are image namespaces, one path component
// (blobstore.ValidateName): a grammatical multi-component name is unknown
// to reads (NAME_UNKNOWN) and invalid for writes (NAME_INVALID).
func (s *Server) serveV2(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/v2/"), "/")
	i := routeStart(parts)
	if i < 1 {
		writeError(w, http.StatusNotFound, oci.CodeNameInvalid, "unknown path", r.URL.Path)
		return
	}
	name, rest := strings.Join(parts[:i], "/"), parts[i:]
	if i > 1 {
		if !repoGrammar.MatchString(name) {
			writeError(w, http.StatusBadRequest, oci.CodeNameInvalid, "repository name does not follow the distribution grammar", name)
			return
		}
		msg := "this store's repositories are image namespaces: one path component"
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			writeError(w, http.StatusNotFound, oci.CodeNameUnknown, msg, name)
		} else {
			writeError(w, http.StatusBadRequest, oci.CodeNameInvalid, msg, name)
		}
		return
	}
	if err := blobstore.ValidateName(name); err != nil {
		writeError(w, http.StatusNotFound, oci.CodeNameInvalid, err.Error(), nil)
		return
	}
	switch {
	case rest[0] == "blobs" && rest[1] == "uploads":
		id := ""
		if len(rest) == 3 {
			id = rest[2]
		}
		s.serveUpload(w, r, name, id)
	case rest[0] == "blobs":
		s.serveBlob(w, r, name, rest[1])
	case rest[0] == "manifests":
		s.serveManifest(w, r, name, rest[1])
	default:
		s.serveTags(w, r, name)
	}
}

// repoGrammar is the distribution spec's repository name grammar.
var repoGrammar = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)

// routeStart is the index of the last segment of parts that begins a
// whole route (blobs/<d>, blobs/uploads[/<id>], manifests/<ref>,
// tags/list), or -1.
func routeStart(parts []string) int {
	for i := len(parts) - 2; i >= 1; i-- {
		rest := parts[i:]
		switch {
		case rest[0] == "blobs" && rest[1] == "uploads" && len(rest) <= 3,
			rest[0] == "blobs" && len(rest) == 2,
			rest[0] == "manifests" && len(rest) == 2,
			rest[0] == "tags" && rest[1] == "list" && len(rest) == 2:
			return i
		}
	}
	return -1
}

func methodNotAllowed(w http.ResponseWriter, allow string) {
	w.Header().Set("Allow", allow)
	writeError(w, http.StatusMethodNotAllowed, oci.CodeUnsupported, "method not allowed", nil)
}

func newSessionID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// zstdDecoder bounds a zstd request body: memory by the window, output by limit.
func zstdDecoder(r io.Reader) (*zstd.Decoder, error) {
	return zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(256<<20), zstd.WithDecoderMaxWindow(64<<20))
}

// parseDigest parses a digest the store can hold: sha256 only (a sha512
// digest, valid elsewhere, is DIGEST_INVALID here).
func parseDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil {
		return "", err
	}
	if d.Algorithm() != digest.SHA256 {
		return "", fmt.Errorf("digest %s: only sha256 digests are supported", s)
	}
	return d, nil
}

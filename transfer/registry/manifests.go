package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/oci"
	"imagestore/transfer/replicate"
)

// resolve renders the manifest ref names: a tag (= image id) or a digest
// of one of the repository's manifests. checkBlobs is Render's: GET and
// HEAD offer only chains whose blobs are all present, DELETE finds damaged
// ones too (rendering does not depend on it, so the digest is the same).
func (s *Server) resolve(ctx context.Context, name, ref string, checkBlobs bool) (*replicate.Rendered, error) {
	if strings.Contains(ref, ":") { // tags never hold a colon
		d, err := parseDigest(ref)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errDigestInvalid, err)
		}
		return s.resolveDigest(ctx, name, d, checkBlobs)
	}
	ir := blobstore.Ref{Name: name, ID: ref}
	if err := ir.Validate(); err != nil {
		// A tag we could never have answered is simply unknown.
		return nil, fmt.Errorf("%w: tag %q: %w", blobstore.ErrNotFound, ref, err)
	}
	rd, err := replicate.Render(ctx, s.st, ir, checkBlobs)
	if err == nil {
		s.rememberDigest(rd)
	}
	return rd, err
}

// errDigestInvalid: a manifest reference that is a malformed or
// unsupported digest.
var errDigestInvalid = errors.New("invalid digest")

// resolveDigest finds the image of name whose manifest has digest d. Each
// rendered manifest's digest is remembered (records are immutable), so a
// lookup costs one render of the found chain, not a render of every
// chain in the repository; a miss renders the repository's images from
// one listing, in memory, and remembers them all.
func (s *Server) resolveDigest(ctx context.Context, name string, d digest.Digest, checkBlobs bool) (*replicate.Rendered, error) {
	if ref, ok := s.digestRef(d); ok && ref.Name == name {
		if rd, err := replicate.Render(ctx, s.st, ref, checkBlobs); err == nil && rd.Digest == d {
			return rd, nil
		}
	}
	imgs, err := s.st.ListImages(ctx, name)
	if err != nil {
		return nil, err
	}
	known := make(map[string]blobstore.Image, len(imgs))
	for _, img := range imgs {
		known[img.Ref.String()] = img
	}
	for _, img := range imgs {
		base, ok := chainFrom(ctx, s.st, known, img)
		if !ok {
			continue
		}
		rd, err := replicate.RenderChain(img.Ref, base)
		if err != nil {
			continue
		}
		s.rememberDigest(rd)
		if rd.Digest == d {
			return replicate.Render(ctx, s.st, img.Ref, checkBlobs)
		}
	}
	return nil, fmt.Errorf("%w: no manifest %s in %s", blobstore.ErrNotFound, d, name)
}

// chainFrom is img's chain, base first, from known records (filled from
// the store for parents in other namespaces).
func chainFrom(ctx context.Context, st *blobstore.Store, known map[string]blobstore.Image, img blobstore.Image) ([]blobstore.Image, bool) {
	var top []blobstore.Image
	for cur := img; ; {
		top = append(top, cur)
		if cur.Parent == "" {
			break
		}
		if len(top) > blobstore.MaxChainDepth {
			return nil, false
		}
		p, ok := known[cur.Parent]
		if !ok {
			r, err := blobstore.ParseRef(cur.Parent)
			if err != nil {
				return nil, false
			}
			if p, err = st.GetImage(ctx, r); err != nil {
				return nil, false
			}
			known[cur.Parent] = p
		}
		cur = p
	}
	slices.Reverse(top)
	return top, true
}

func (s *Server) serveManifest(w http.ResponseWriter, r *http.Request, name, ref string) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		rd, err := s.resolve(r.Context(), name, ref, true)
		if err != nil {
			if errors.Is(err, errDigestInvalid) {
				writeError(w, http.StatusBadRequest, oci.CodeDigestInvalid, err.Error(), nil)
				return
			}
			if errors.Is(err, replicate.ErrIncomplete) {
				// A chain with a quarantined or lost blob is not offered.
				writeError(w, http.StatusNotFound, oci.CodeManifestUnknown, err.Error(), nil)
				return
			}
			storeError(w, err, oci.CodeManifestUnknown)
			return
		}
		s.rememberConfig(rd.ConfigD, rd.Config)
		w.Header().Set("Content-Type", oci.MediaTypeManifest)
		w.Header().Set(oci.HeaderContentDigest, rd.Digest.String())
		w.Header().Set("ETag", `"`+rd.Digest.String()+`"`)
		w.Header().Set("Content-Length", strconv.Itoa(len(rd.Manifest)))
		if r.Method == http.MethodGet {
			_, _ = w.Write(rd.Manifest)
		}
	case http.MethodPut:
		s.putManifest(w, r, name, ref)
	case http.MethodDelete:
		s.deleteManifest(w, r, name, ref)
	default:
		methodNotAllowed(w, "GET, HEAD, PUT, DELETE")
	}
}

// deleteManifest deletes the image record the manifest was rendered from
// (the chain's top). Its ancestors stay: they are images in their own
// right. An image that is another's parent is refused, naming the
// children, so no chain is ever cut. Blobs are left to GC, which frees
// the ones no record references once they are older than the commit grace.
func (s *Server) deleteManifest(w http.ResponseWriter, r *http.Request, name, ref string) {
	ctx := r.Context()
	rd, err := s.resolve(ctx, name, ref, false)
	if errors.Is(err, errDigestInvalid) {
		writeError(w, http.StatusBadRequest, oci.CodeDigestInvalid, err.Error(), nil)
		return
	}
	if err != nil {
		storeError(w, err, oci.CodeManifestUnknown)
		return
	}
	if err := s.st.DeleteImage(ctx, rd.Ref); err != nil {
		if errors.Is(err, blobstore.ErrExists) { // the store's "has children"
			s.refuseParent(w, r, rd.Ref, err)
			return
		}
		storeError(w, err, oci.CodeManifestUnknown)
		return
	}
	s.forgetConfig(rd.ConfigD)
	s.log.Info("image deleted", "image", rd.Ref.String(), "manifest", rd.Digest.String())
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusAccepted)
}

// refuseParent answers a DELETE of an image other images are built on.
func (s *Server) refuseParent(w http.ResponseWriter, r *http.Request, ref blobstore.Ref, err error) {
	kids, kerr := s.st.Children(r.Context(), ref)
	if kerr != nil || len(kids) == 0 { // raced with a delete of the children: the store's words will do
		writeError(w, http.StatusConflict, oci.CodeDenied, err.Error(), nil)
		return
	}
	names := make([]string, len(kids))
	for i, k := range kids {
		names[i] = k.String()
	}
	writeError(w, http.StatusConflict, oci.CodeDenied,
		fmt.Sprintf("%s is the parent of %s: delete the children first", ref, strings.Join(names, ", ")),
		map[string][]string{"children": names})
}

// putManifest records the chain a pushed manifest describes. Every layer
// must already be here with its size; records are created parents first
// and the image last (replicate.Apply).
func (s *Server) putManifest(w http.ResponseWriter, r *http.Request, name, ref string) {
	ctx := r.Context()
	if ct := r.Header.Get("Content-Type"); ct != "" && ct != oci.MediaTypeManifest {
		writeError(w, http.StatusBadRequest, oci.CodeManifestInvalid, "only "+oci.MediaTypeManifest+" is accepted", ct)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, oci.MaxManifestSize+1))
	if err != nil {
		writeError(w, http.StatusBadRequest, oci.CodeManifestInvalid, err.Error(), nil)
		return
	}
	md := digest.FromBytes(body)
	tag := ref
	if strings.Contains(ref, ":") {
		d, err := parseDigest(ref)
		if err != nil {
			writeError(w, http.StatusBadRequest, oci.CodeDigestInvalid, err.Error(), nil)
			return
		}
		if d != md {
			writeError(w, http.StatusBadRequest, oci.CodeDigestInvalid, "manifest does not match the digest it was pushed under", nil)
			return
		}
		tag = ""
	}
	m, err := oci.ParseManifest(body)
	if err != nil {
		storeError(w, err, oci.CodeManifestInvalid)
		return
	}
	if m.Config.MediaType != oci.MediaTypeConfig {
		writeError(w, http.StatusBadRequest, oci.CodeManifestInvalid, "not an imagestore image: config media type must be "+oci.MediaTypeConfig, m.Config.MediaType)
		return
	}
	cb, err := replicate.ReadSmallBlob(ctx, s.st, m.Config.Digest, oci.MaxManifestSize)
	if cached, ok := s.config(m.Config.Digest); ok && errors.Is(err, blobstore.ErrNotFound) {
		// We rendered this config and answered a client's HEAD for it from
		// the cache, so the client did not upload it: an image deleted
		// (agent API, GC) after it was served, and now pushed back.
		cb, err = cached, nil
	}
	if err != nil {
		if errors.Is(err, blobstore.ErrNotFound) {
			writeError(w, http.StatusBadRequest, oci.CodeManifestBlobUnknown, "config blob not uploaded", m.Config.Digest)
			return
		}
		storeError(w, err, oci.CodeManifestBlobUnknown)
		return
	}
	cfg, err := replicate.ParseConfig(cb)
	if err != nil {
		storeError(w, err, oci.CodeManifestInvalid)
		return
	}
	if tag == "" {
		// Pushed under a digest: it must be the digest we will serve the
		// records under, checked before anything is recorded.
		if want, err := replicate.RenderChain(cfg.Chain[len(cfg.Chain)-1].Ref, cfg.Chain); err == nil && want.Digest != md {
			writeError(w, http.StatusBadRequest, oci.CodeManifestInvalid,
				fmt.Sprintf("this store serves these records as manifest %s, not %s: push under a tag, or push that manifest", want.Digest, md), nil)
			return
		}
	}
	top, err := replicate.Apply(ctx, s.st, m, cfg, name, tag, s.blobZerosOf)
	if err != nil {
		s.log.Warn("manifest refused", "repository", name, "ref", ref, "err", err)
		storeError(w, err, oci.CodeManifestInvalid)
		return
	}
	layers := make([]digest.Digest, len(m.Layers))
	for i, l := range m.Layers {
		layers[i] = l.Digest
	}
	s.forgetBlobZeros(layers)
	// We serve manifests rendered from the records, so the digest we
	// answer is the rendered one: the one a GET returns. A client that
	// pushed other bytes (another field order, spacing) under a tag gets
	// that digest; one that pushed under a digest must have pushed them.
	rd, err := replicate.Render(ctx, s.st, top, false)
	if err != nil {
		storeError(w, err, oci.CodeManifestInvalid)
		return
	}
	s.rememberDigest(rd)
	if tag == "" && rd.Digest != md {
		writeError(w, http.StatusBadRequest, oci.CodeManifestInvalid,
			fmt.Sprintf("the records are stored, but this store serves them as manifest %s: push under a tag, or push that manifest", rd.Digest), nil)
		return
	}
	s.log.Info("image received", "image", top.String(), "layers", len(m.Layers), "manifest", rd.Digest.String())
	w.Header().Set("Location", "/v2/"+name+"/manifests/"+rd.Digest.String())
	w.Header().Set(oci.HeaderContentDigest, rd.Digest.String())
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
}

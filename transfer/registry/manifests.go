package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
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
	if d, err := digest.Parse(ref); err == nil {
		imgs, err := s.st.ListImages(ctx, name)
		if err != nil {
			return nil, err
		}
		for _, img := range imgs {
			rd, err := replicate.Render(ctx, s.st, img.Ref, checkBlobs)
			if err == nil && rd.Digest == d {
				return rd, nil
			}
		}
		return nil, fmt.Errorf("%w: no manifest %s in %s", blobstore.ErrNotFound, d, name)
	}
	ir := blobstore.Ref{Name: name, ID: ref}
	if err := ir.Validate(); err != nil {
		return nil, err
	}
	return replicate.Render(ctx, s.st, ir, checkBlobs)
}

func (s *Server) serveManifest(w http.ResponseWriter, r *http.Request, name, ref string) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		rd, err := s.resolve(r.Context(), name, ref, true)
		if err != nil {
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
	if d, err := digest.Parse(ref); err == nil {
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
	top, err := replicate.Apply(ctx, s.st, m, cfg, name, tag)
	if err != nil {
		s.log.Warn("manifest refused", "repository", name, "ref", ref, "err", err)
		storeError(w, err, oci.CodeManifestInvalid)
		return
	}
	s.log.Info("image received", "image", top.String(), "layers", len(m.Layers))
	w.Header().Set("Location", "/v2/"+name+"/manifests/"+md.String())
	w.Header().Set(oci.HeaderContentDigest, md.String())
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
}

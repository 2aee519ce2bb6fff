package registry

import (
	"errors"
	"io"
	"net/http"
	"strconv"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/transfer/oci"
	"imagestore/transfer/replicate"
)

// resolve renders the manifest ref names: a tag (= image id) or a digest
// of one of the repository's manifests.
func (s *Server) resolve(r *http.Request, name, ref string) (*replicate.Rendered, error) {
	ctx := r.Context()
	if d, err := digest.Parse(ref); err == nil {
		imgs, err := s.st.ListImages(ctx, name)
		if err != nil {
			return nil, err
		}
		for _, img := range imgs {
			rd, err := replicate.Render(ctx, s.st, img.Ref, true)
			if err == nil && rd.Digest == d {
				return rd, nil
			}
		}
		return nil, blobstore.ErrNotFound
	}
	ir := blobstore.Ref{Name: name, ID: ref}
	if err := ir.Validate(); err != nil {
		return nil, err
	}
	return replicate.Render(ctx, s.st, ir, true)
}

func (s *Server) serveManifest(w http.ResponseWriter, r *http.Request, name, ref string) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		rd, err := s.resolve(r, name, ref)
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
		writeError(w, http.StatusMethodNotAllowed, oci.CodeUnsupported, "images are deleted through the agent API", nil)
	default:
		methodNotAllowed(w, "GET, HEAD, PUT")
	}
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

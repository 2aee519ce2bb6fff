// Package oci is a client for the OCI distribution API as served by
// transfer/registry (and by any conforming registry for the subset used):
// blob HEAD/GET with Range, resumable chunked uploads, manifests and tags,
// with zstd on the wire when both ends agree. See docs/replication.md.
package oci

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/opencontainers/go-digest"

	"imagestore/transfer/crcframe"
)

// Media types.
const (
	MediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	// MediaTypeConfig is the config blob of an imagestore manifest: the
	// image record and its ancestors' records, base first.
	MediaTypeConfig = "application/vnd.imagestore.image.config.v1+json"
	// MediaTypeQcow2Layer is a canonical qcow2 layer; MediaTypeBlobLayer any other blob.
	MediaTypeQcow2Layer = "application/vnd.imagestore.qcow2.layer.v1"
	MediaTypeBlobLayer  = "application/vnd.imagestore.blob.layer.v1"
)

// Headers beyond the OCI spec.
const (
	// HeaderEncodings, on the /v2/ answer, lists the content encodings the
	// server accepts on PATCH and offers on blob GET ("zstd").
	HeaderEncodings     = "Imagestore-Encodings"
	HeaderContentDigest = "Docker-Content-Digest"
	HeaderUploadUUID    = "Docker-Upload-UUID"
	// HeaderUploadOffset is the exact byte count of an upload, beside the
	// spec's Range (whose "0-0" is ambiguous for 0 and 1 bytes).
	HeaderUploadOffset = "Imagestore-Upload-Offset"
	HeaderAPIVersion   = "Docker-Distribution-API-Version"
	// HeaderUploadExtensions, on the 202 that starts an upload session,
	// lists the upload extensions the session takes (ExtCRC32CFrames).
	HeaderUploadExtensions = "Imagestore-Upload-Extensions"
)

// ExtCRC32CFrames is the checked upload (docs/replication.md): PATCH and
// PUT bodies may be crc32c frames (Content-Encoding: crc32c-frames, each
// frame checked before its bytes are accepted), and the completing PUT
// may name the size instead of the digest (?size=<bytes>): the store then
// commits under the digest it computed itself and answers it in
// Docker-Content-Digest. Our client uses it only when a session offers it;
// the standard protocol is unchanged beside it.
const ExtCRC32CFrames = crcframe.Encoding

// MaxManifestSize bounds a manifest or config blob read into memory.
const MaxManifestSize = 8 << 20

// Descriptor names a blob or manifest.
type Descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      digest.Digest     `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Manifest is an OCI image manifest.
type Manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	ArtifactType  string       `json:"artifactType,omitempty"`
	Config        Descriptor   `json:"config"`
	Layers        []Descriptor `json:"layers"`
}

// ParseManifest decodes and sanity-checks untrusted manifest bytes.
func ParseManifest(b []byte) (Manifest, error) {
	if len(b) > MaxManifestSize {
		return Manifest{}, fmt.Errorf("%w: manifest of %d bytes", ErrManifestInvalid, len(b))
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return Manifest{}, fmt.Errorf("%w: %v", ErrManifestInvalid, err)
	}
	if m.SchemaVersion != 2 {
		return Manifest{}, fmt.Errorf("%w: schemaVersion %d", ErrManifestInvalid, m.SchemaVersion)
	}
	if m.MediaType != "" && m.MediaType != MediaTypeManifest {
		return Manifest{}, fmt.Errorf("%w: media type %q", ErrManifestInvalid, m.MediaType)
	}
	check := func(what string, d Descriptor) error {
		if err := d.Digest.Validate(); err != nil {
			return fmt.Errorf("%w: %s digest %q: %v", ErrManifestInvalid, what, d.Digest, err)
		}
		if d.Size < 0 {
			return fmt.Errorf("%w: %s size %d", ErrManifestInvalid, what, d.Size)
		}
		return nil
	}
	if err := check("config", m.Config); err != nil {
		return Manifest{}, err
	}
	for i, l := range m.Layers {
		if err := check(fmt.Sprintf("layer %d", i), l); err != nil {
			return Manifest{}, err
		}
	}
	return m, nil
}

// Error codes of the OCI distribution spec (plus QUOTA_EXCEEDED, ours).
const (
	CodeBlobUnknown         = "BLOB_UNKNOWN"
	CodeBlobUploadInvalid   = "BLOB_UPLOAD_INVALID"
	CodeBlobUploadUnknown   = "BLOB_UPLOAD_UNKNOWN"
	CodeDigestInvalid       = "DIGEST_INVALID"
	CodeManifestBlobUnknown = "MANIFEST_BLOB_UNKNOWN"
	CodeManifestInvalid     = "MANIFEST_INVALID"
	CodeManifestUnknown     = "MANIFEST_UNKNOWN"
	CodeNameInvalid         = "NAME_INVALID"
	CodeNameUnknown         = "NAME_UNKNOWN"
	CodeSizeInvalid         = "SIZE_INVALID"
	CodeUnauthorized        = "UNAUTHORIZED"
	CodeDenied              = "DENIED"
	CodeUnsupported         = "UNSUPPORTED"
	CodeQuotaExceeded       = "QUOTA_EXCEEDED"
	CodeRangeInvalid        = "RANGE_INVALID"
	// CodeChecksumInvalid (ours): a crc32c frame of a checked upload did
	// not match its bytes; nothing of that frame was accepted.
	CodeChecksumInvalid = "CHECKSUM_INVALID"
)

// Sentinels matched with errors.Is against an *Error or a wrapped one.
var (
	ErrNotFound        = errors.New("not found")
	ErrUnauthorized    = errors.New("unauthorized")
	ErrDigestInvalid   = errors.New("digest invalid")
	ErrManifestInvalid = errors.New("manifest invalid")
	ErrQuota           = errors.New("quota exceeded")
	// ErrSourceDigest: the bytes read from the local source do not hash to
	// the digest being pushed; the upload was cancelled, nothing committed.
	ErrSourceDigest = errors.New("source blob does not match its digest")
	// ErrChecksum: the store refused bytes of a checked upload that did
	// not match their crc32c: they were corrupted on the way.
	ErrChecksum = errors.New("upload bytes corrupted in transit (crc32c mismatch)")
	// ErrSourceChanged: a produced blob's bytes differ from what an
	// earlier run of its producer wrote (the source changed during the
	// upload); the upload was cancelled, nothing committed.
	ErrSourceChanged = errors.New("the source changed while it was uploaded")
	// ErrTooLarge: a response decoded to more bytes than declared (zstd bomb guard).
	ErrTooLarge = errors.New("response larger than declared")
)

// ErrorInfo is one entry of an OCI error body.
type ErrorInfo struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// ErrorBody is the OCI error JSON.
type ErrorBody struct {
	Errors []ErrorInfo `json:"errors"`
}

// Error is a non-success reply of a registry.
type Error struct {
	Method, URL string
	Status      int
	Errors      []ErrorInfo
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s: HTTP %d", e.Method, e.URL, e.Status)
	for _, x := range e.Errors {
		fmt.Fprintf(&b, "; %s: %s", x.Code, x.Message)
		if x.Detail != nil {
			fmt.Fprintf(&b, " (%v)", x.Detail)
		}
	}
	return b.String()
}

// Code returns the first error code, or "".
func (e *Error) Code() string {
	if len(e.Errors) == 0 {
		return ""
	}
	return e.Errors[0].Code
}

// Is maps codes and statuses to the package sentinels.
func (e *Error) Is(target error) bool {
	c := e.Code()
	switch target {
	case ErrNotFound:
		return e.Status == http.StatusNotFound || c == CodeBlobUnknown || c == CodeManifestUnknown || c == CodeNameUnknown || c == CodeBlobUploadUnknown
	case ErrUnauthorized:
		return e.Status == http.StatusUnauthorized || e.Status == http.StatusForbidden
	case ErrDigestInvalid:
		return c == CodeDigestInvalid
	case ErrManifestInvalid:
		return c == CodeManifestInvalid || c == CodeManifestBlobUnknown
	case ErrQuota:
		return c == CodeQuotaExceeded || e.Status == http.StatusInsufficientStorage
	case ErrChecksum:
		return c == CodeChecksumInvalid
	}
	return false
}

// Temporary reports whether retrying the same request may succeed.
func (e *Error) Temporary() bool {
	switch e.Status {
	case http.StatusInternalServerError, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout, http.StatusTooManyRequests:
		return true
	}
	return false
}

// ParseError decodes an error reply (untrusted; body bounded by the caller).
func ParseError(method, url string, status int, body []byte) *Error {
	e := &Error{Method: method, URL: url, Status: status}
	var eb ErrorBody
	if json.Unmarshal(body, &eb) == nil {
		e.Errors = eb.Errors
	}
	return e
}

func readError(resp *http.Response) *Error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	u := ""
	if resp.Request != nil && resp.Request.URL != nil {
		u = resp.Request.URL.Redacted()
	}
	m := ""
	if resp.Request != nil {
		m = resp.Request.Method
	}
	return ParseError(m, u, resp.StatusCode, b)
}

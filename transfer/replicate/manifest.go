package replicate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/qcow2"
	"imagestore/transfer/imageconfig"
	"imagestore/transfer/oci"
)

// ConfigVersion tags the config blob layout (transfer/imageconfig).
const ConfigVersion = imageconfig.ConfigVersion

// Config is the config blob of an image's manifest (transfer/imageconfig).
type Config = imageconfig.Config

// Sentinels.
var (
	// ErrIncomplete: a local chain misses a blob (quarantined or lost).
	ErrIncomplete = errors.New("image chain incomplete")
	// ErrConflict: the receiver holds a record of the same name:id with other content.
	ErrConflict = errors.New("image record conflict")
)

// Rendered is an image's manifest and config blob.
type Rendered struct {
	Ref      blobstore.Ref
	Manifest []byte
	Digest   digest.Digest // of Manifest
	Config   []byte
	ConfigD  digest.Digest
	Layers   []oci.Descriptor // base first
	Chain    []blobstore.Image
}

// Render builds the manifest of ref from its records. It is deterministic:
// the same records give the same bytes, so the digest is stable across
// stores. checkBlobs makes a chain with a missing blob fail ErrIncomplete.
func Render(ctx context.Context, st *blobstore.Store, ref blobstore.Ref, checkBlobs bool) (*Rendered, error) {
	chain, err := st.Chain(ctx, ref)
	if err != nil {
		return nil, err
	}
	base := make([]blobstore.Image, len(chain))
	for i, img := range chain {
		base[len(chain)-1-i] = img
		if checkBlobs && !st.Exists(img.Blob) {
			return nil, fmt.Errorf("%w: %s: blob %s of %s is missing", ErrIncomplete, ref, img.Blob, img.Ref)
		}
	}
	return renderChain(ref, base)
}

func layerMediaType(img blobstore.Image) string {
	if img.Format == "qcow2" {
		return oci.MediaTypeQcow2Layer
	}
	return oci.MediaTypeBlobLayer
}

// RenderChain renders ref's manifest from its chain's records, base
// first (what Render reads from the store), for a caller that holds them.
func RenderChain(ref blobstore.Ref, base []blobstore.Image) (*Rendered, error) {
	return renderChain(ref, base)
}

func renderChain(ref blobstore.Ref, base []blobstore.Image) (*Rendered, error) {
	cfg, err := json.Marshal(Config{Imagestore: ConfigVersion, Chain: base})
	if err != nil {
		return nil, err
	}
	r := &Rendered{Ref: ref, Config: cfg, ConfigD: digest.FromBytes(cfg), Chain: base}
	m := oci.Manifest{
		SchemaVersion: 2,
		MediaType:     oci.MediaTypeManifest,
		Config:        oci.Descriptor{MediaType: oci.MediaTypeConfig, Digest: r.ConfigD, Size: int64(len(cfg))},
	}
	for _, img := range base {
		m.Layers = append(m.Layers, oci.Descriptor{MediaType: layerMediaType(img), Digest: img.Blob, Size: img.Size})
	}
	r.Layers = m.Layers
	if r.Manifest, err = json.Marshal(m); err != nil {
		return nil, err
	}
	r.Digest = digest.FromBytes(r.Manifest)
	return r, nil
}

// ParseConfig decodes untrusted config bytes (imageconfig.ParseConfig).
func ParseConfig(b []byte) (Config, error) { return imageconfig.ParseConfig(b) }

// Validate is imageconfig.Validate: manifest and config describe one
// complete chain ending at name:tag (tag "" = any).
func Validate(m oci.Manifest, c Config, name, tag string) (blobstore.Ref, error) {
	return imageconfig.Validate(m, c, name, tag)
}

// ReadSmallBlob reads a local blob of at most max bytes.
func ReadSmallBlob(ctx context.Context, st *blobstore.Store, d digest.Digest, max int64) ([]byte, error) {
	b, err := st.OpenBlob(ctx, d)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	if b.Size() > max {
		return nil, fmt.Errorf("%w: blob %s of %d bytes", oci.ErrManifestInvalid, d, b.Size())
	}
	buf := make([]byte, b.Size())
	if _, err := b.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if digest.FromBytes(buf) != d {
		return nil, fmt.Errorf("%w: blob %s", blobstore.ErrCorrupt, d)
	}
	return buf, nil
}

// Apply records the chain a manifest describes: every layer blob must be
// present with its size, then missing records are created parents first,
// the top one last, so the store never shows an image whose chain is
// incomplete. Existing records must match (ErrConflict otherwise). zeros,
// if not nil, gives for a layer blob the record of its zero blocks made
// while it was uploaded (nil if none), so its check need not read it.
func Apply(ctx context.Context, st *blobstore.Store, m oci.Manifest, c Config, name, tag string, zeros func(digest.Digest) qcow2.ZeroMap) (blobstore.Ref, error) {
	top, err := Validate(m, c, name, tag)
	if err != nil {
		return top, err
	}
	for _, l := range m.Layers {
		info, err := st.Stat(ctx, l.Digest)
		if err != nil {
			return top, fmt.Errorf("%w: layer %s: %w", ErrIncomplete, l.Digest, err)
		}
		if info.Size != l.Size {
			return top, fmt.Errorf("%w: layer %s is %d bytes here, manifest says %d", oci.ErrManifestInvalid, l.Digest, info.Size, l.Size)
		}
	}
	// The config is untrusted: before any record says "qcow2", check that
	// each such blob is one and names exactly its recorded parent, so
	// qemu-img/qemu-nbd opening it in place follow nothing else.
	if err := layer.Check(ctx, st, c.Chain); err != nil {
		return top, fmt.Errorf("%w: %w", oci.ErrManifestInvalid, err)
	}
	// A layer about to be recorded came as bytes from elsewhere: a qcow2
	// must be exactly what our writer makes of its content (qemu opens it
	// in place), anything else must not be a qcow2.
	for _, img := range c.Chain {
		if _, err := st.GetImage(ctx, img.Ref); err == nil {
			continue
		}
		check := layer.CheckFormat(ctx, st, img.Blob, img.Format)
		if img.Format == "qcow2" {
			check = layer.CheckCanonical(ctx, st, img.Blob, zerosOf(zeros, img.Blob))
		}
		if check != nil {
			return top, fmt.Errorf("%w: record %s: %w", oci.ErrManifestInvalid, img.Ref, check)
		}
	}
	for _, img := range c.Chain {
		have, err := st.GetImage(ctx, img.Ref)
		if err == nil {
			if have.Blob != img.Blob || have.Parent != img.Parent {
				return top, fmt.Errorf("%w: %s exists with blob %s parent %q, incoming has blob %s parent %q",
					ErrConflict, img.Ref, have.Blob, have.Parent, img.Blob, img.Parent)
			}
			continue
		}
		if !errors.Is(err, blobstore.ErrNotFound) {
			return top, err
		}
		if err := st.PutImage(ctx, img); err != nil && !errors.Is(err, blobstore.ErrExists) {
			return top, fmt.Errorf("record %s: %w", img.Ref, err)
		}
	}
	return top, nil
}

func zerosOf(zeros func(digest.Digest) qcow2.ZeroMap, d digest.Digest) qcow2.ZeroMap {
	if zeros == nil {
		return nil
	}
	return zeros(d)
}

// Package layer is the one home of the rules for stored qcow2 layers and
// chains, over blobstore and qcow2: how a blob gets into the store and
// becomes an image record (Commit: ingest → verify → hold → record), how a
// stored chain is opened for reading (OpenChain) or held for qemu to read in
// place (HoldChain), and the check every qcow2 layer passes before qemu may
// follow its backing name (Check).
package layer

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
)

// Layer is a committed blob: what Commit hands its Verify hook.
type Layer struct {
	Digest      digest.Digest
	Size        int64 // blob bytes
	VirtualSize int64 // guest bytes (the blob's size for an opaque blob)
}

// Errors, matched with errors.Is; each is wrapped with the detail.
var (
	// ErrInvalid: a stored qcow2 layer's header does not match its record
	// (Check).
	ErrInvalid = errors.New("qcow2 layer does not match its record")
	// ErrNotQcow2: a chain holds an image whose format is not qcow2, so
	// it cannot be read or served as a qcow2 chain.
	ErrNotQcow2 = errors.New("not a qcow2 chain")
	// ErrParent: an untrusted qcow2 does not fit the parent it is to be
	// stored on (a delta without a parent, a non-qcow2 parent, another
	// virtual size).
	ErrParent = errors.New("layer does not fit its parent")
)

// Options configure a Store.
type Options struct {
	Blobs  *blobstore.Store // required
	Logger *slog.Logger     // default: discard
}

// Store commits and opens layers of one blob store. It holds no state of
// its own beyond its options; blob holds live in the blob store.
type Store struct {
	blobs *blobstore.Store
	log   *slog.Logger
}

// New returns the layer view of opts.Blobs.
func New(opts Options) (*Store, error) {
	if opts.Blobs == nil {
		return nil, errors.New("layer: Options.Blobs is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Store{blobs: opts.Blobs, log: opts.Logger}, nil
}

// Blobs is the blob store underneath.
func (s *Store) Blobs() *blobstore.Store { return s.blobs }

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

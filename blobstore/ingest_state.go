package blobstore

import (
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash"
)

// ingestState is the durable checkpoint of an ingest: the data file is
// valid up to Offset and SHA256 is the marshalled hash of exactly those bytes.
type ingestState struct {
	Version int    `json:"version"`
	Offset  int64  `json:"offset"`
	SHA256  []byte `json:"sha256"` // crypto/sha256 MarshalBinary, base64 in JSON
}

// sha256 MarshalBinary layout (stable since Go 1.11): "sha\x03", 8 state
// words, one 64-byte block, then the message length as a big-endian uint64.
const (
	sha256MarshalLen = 4 + 8*4 + 64 + 8
	sha256Magic      = "sha\x03"
)

// parseIngestState decodes and validates a state file. The bytes come from
// disk and may be torn or tampered with, so every field is checked,
// including that the hash state has consumed exactly Offset bytes.
func parseIngestState(b []byte) (ingestState, hash.Hash, error) {
	var st ingestState
	if err := json.Unmarshal(b, &st); err != nil {
		return st, nil, fmt.Errorf("ingest state: %w", err)
	}
	if st.Version != 1 {
		return st, nil, fmt.Errorf("ingest state: unknown version %d", st.Version)
	}
	if st.Offset < 0 {
		return st, nil, fmt.Errorf("ingest state: negative offset %d", st.Offset)
	}
	if len(st.SHA256) != sha256MarshalLen || string(st.SHA256[:4]) != sha256Magic {
		return st, nil, fmt.Errorf("ingest state: malformed sha256 state (%d bytes)", len(st.SHA256))
	}
	if n := binary.BigEndian.Uint64(st.SHA256[sha256MarshalLen-8:]); n != uint64(st.Offset) {
		return st, nil, fmt.Errorf("ingest state: hash covers %d bytes, offset says %d", n, st.Offset)
	}
	h := sha256.New()
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(st.SHA256); err != nil {
		return st, nil, fmt.Errorf("ingest state: sha256: %w", err)
	}
	return st, h, nil
}

func marshalIngestState(off int64, h hash.Hash) ([]byte, error) {
	hb, err := h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return nil, err
	}
	return json.Marshal(ingestState{Version: 1, Offset: off, SHA256: hb})
}

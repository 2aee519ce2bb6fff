package blobstore

import (
	"encoding/json"
	"fmt"
	"hash"
)

// ingestState is the local backend's durable checkpoint of an ingest: the
// data file is valid up to Offset and SHA256 is the marshalled hash of
// exactly those bytes.
type ingestState struct {
	Version int    `json:"version"`
	Offset  int64  `json:"offset"`
	SHA256  []byte `json:"sha256"` // crypto/sha256 MarshalBinary, base64 in JSON
}

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
	h, err := UnmarshalHashState(st.SHA256, st.Offset)
	if err != nil {
		return st, nil, fmt.Errorf("ingest state: %w", err)
	}
	return st, h, nil
}

func marshalIngestState(off int64, h hash.Hash) ([]byte, error) {
	hb, err := MarshalHashState(h)
	if err != nil {
		return nil, err
	}
	return json.Marshal(ingestState{Version: 1, Offset: off, SHA256: hb})
}

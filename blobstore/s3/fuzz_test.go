package s3store

import (
	"crypto/sha256"
	"encoding"
	"encoding/json"
	"strings"
	"testing"
)

// FuzzParseState: a state object comes from a bucket others can write; the
// parser must never panic, and whatever it accepts is self-consistent.
func FuzzParseState(f *testing.F) {
	h := sha256.New()
	h.Write(make([]byte, testPart))
	hb, _ := h.(encoding.BinaryMarshaler).MarshalBinary()
	good, _ := json.Marshal(ingestStateV1{Version: 1, UploadID: "u", Offset: testPart, SHA256: hb,
		Parts: []partInfo{{Number: 1, Size: testPart, ETag: `"x"`}}, Tail: 3, TailSHA256: strings.Repeat("0", 64)})
	f.Add(good)
	f.Add([]byte(`{"version":1,"offset":0,"sha256":null}`))
	f.Add([]byte(`{"version":1,"uploadId":"","offset":5,"parts":[]}`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, hh, err := parseState(b)
		if err != nil {
			return
		}
		var sum int64
		for _, p := range st.Parts {
			sum += p.Size
		}
		if sum != st.Offset || hh == nil || st.Tail < 0 {
			t.Fatalf("accepted an inconsistent state: %+v", st)
		}
	})
}

package blobstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"io"
	"testing"
)

var errEOF = io.EOF

func FuzzParseIngestState(f *testing.F) {
	h := sha256.New()
	h.Write([]byte("hello"))
	good, _ := marshalIngestState(5, h)
	empty, _ := marshalIngestState(0, sha256.New())
	f.Add(good)
	f.Add(empty)
	f.Add([]byte(`{"version":1,"offset":-1,"sha256":""}`))
	f.Add([]byte(`{"version":2}`))
	f.Add(good[:len(good)/2])
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, h, err := parseIngestState(b)
		if err != nil {
			return
		}
		if st.Offset < 0 || h == nil {
			t.Fatalf("accepted bad state %+v", st)
		}
		// A state we accept re-marshals to one we accept with the same offset.
		b2, err := marshalIngestState(st.Offset, h)
		if err != nil {
			t.Fatal(err)
		}
		st2, h2, err := parseIngestState(b2)
		if err != nil || st2.Offset != st.Offset || !bytes.Equal(h2.Sum(nil), h.Sum(nil)) {
			t.Fatalf("round trip: %+v %v", st2, err)
		}
	})
}

func FuzzParseImageRecord(f *testing.F) {
	img := Image{Ref: Ref{Name: "vol", ID: "1"}, Blob: digestOf([]byte("x")), Parent: "vol:0", Size: 1, Format: "qcow2"}
	good, _ := json.Marshal(img)
	f.Add(good)
	f.Add([]byte(`{"name":"../x","id":"1","blobsum":"sha256:00"}`))
	f.Add([]byte(`{"name":"a","id":"b","blobsum":"` + string(img.Blob) + `","parent":"a:b"}`))
	f.Add([]byte(`[]`))
	f.Add(bytes.Repeat([]byte(" "), maxRecordSize+1))
	f.Fuzz(func(t *testing.T, b []byte) {
		img, err := parseImageRecord(b)
		if err != nil {
			return
		}
		if err := validateImage(img); err != nil {
			t.Fatalf("accepted invalid record: %v", err)
		}
		b2, _ := json.Marshal(img)
		img2, err := parseImageRecord(b2)
		if err != nil || !imagesEqual(img, img2) {
			t.Fatalf("round trip: %+v %v", img2, err)
		}
	})
}

func BenchmarkIngest(b *testing.B) {
	s := newStore(b)
	ctx := context.Background()
	const size = 256 << 20
	b.SetBytes(size)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := s.Put(ctx, &patternReader{left: size, n: byte(b.N)}, size, ""); err != nil {
			b.Fatal(err)
		}
	}
}

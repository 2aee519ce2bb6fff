package oci

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestPrefixHasherRewinds replays the resume patterns PushBlob sees: a
// send cut after some bytes, the server durable at 0, at an offset, or at
// the same offset twice in a row.
func TestPrefixHasherRewinds(t *testing.T) {
	data := make([]byte, 1<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	want := digest.FromBytes(data)
	cases := []struct {
		name string
		// each step: rewind to off, then send n bytes (n < 0 = to the end)
		steps [][2]int
	}{
		{"no cut", [][2]int{{0, -1}}},
		{"cut, server at 0", [][2]int{{0, 300 << 10}, {0, -1}}},
		{"cut, server at offset", [][2]int{{0, 300 << 10}, {200 << 10, -1}}},
		{"two cuts at the same offset", [][2]int{{0, 300 << 10}, {100 << 10, 50 << 10}, {100 << 10, -1}}},
		{"server ahead of a rewind", [][2]int{{0, 100 << 10}, {100 << 10, 100 << 10}, {0, -1}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := &prefixHasher{src: bytes.NewReader(data), h: sha256.New()}
			for _, s := range c.steps {
				if err := h.rewind(int64(s[0])); err != nil {
					t.Fatal(err)
				}
				n := s[1]
				if n < 0 {
					n = len(data) - s[0]
				}
				if _, err := io.Copy(h, bytes.NewReader(data[s[0]:s[0]+n])); err != nil {
					t.Fatal(err)
				}
			}
			if got := h.digest(); got != want {
				t.Fatalf("digest %s, want %s", got, want)
			}
		})
	}
}

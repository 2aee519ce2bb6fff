package countio

import (
	"bytes"
	"errors"
	"testing"
)

type shortWriter struct{ max int }

func (s shortWriter) Write(p []byte) (int, error) {
	if len(p) > s.max {
		return s.max, errors.New("short")
	}
	return len(p), nil
}

func TestWriterCountsWhatWasAccepted(t *testing.T) {
	var buf bytes.Buffer
	w := &Writer{W: &buf}
	for _, s := range []string{"abc", "", "defgh"} {
		if _, err := w.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	if w.N != 8 || buf.String() != "abcdefgh" {
		t.Fatalf("N=%d buf=%q", w.N, buf.String())
	}
	sw := &Writer{W: shortWriter{max: 2}}
	if _, err := sw.Write([]byte("xyz")); err == nil || sw.N != 2 {
		t.Fatalf("short write: N=%d err=%v; want 2 and an error", sw.N, err)
	}
}

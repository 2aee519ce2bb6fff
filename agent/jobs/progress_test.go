package jobs

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

type counter struct{ total, done int64 }

func (c *counter) SetTotal(n int64)                { c.total = n }
func (c *counter) Add(n int64)                     { c.done += n }
func (c *counter) SetImage(string, string, string) {}

func TestProgressWrappers(t *testing.T) {
	var c counter
	if _, err := io.Copy(io.Discard, Reader(&c, strings.NewReader("hello"))); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3)
	if _, err := ReaderAt(&c, bytes.NewReader([]byte("abcdef"))).ReadAt(buf, 4); err != io.EOF {
		t.Fatalf("ReadAt past the end: %v, want EOF", err)
	}
	if _, err := Writer(&c).Write([]byte("1234")); err != nil {
		t.Fatal(err)
	}
	if c.done != 5+2+4 {
		t.Fatalf("counted %d bytes, want 11", c.done)
	}
	var _ Progress = Nop{}
}

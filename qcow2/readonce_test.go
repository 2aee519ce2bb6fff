package qcow2

import (
	"bytes"
	"context"
	"sync"
	"testing"
)

// onceReader fails the test when a byte is read twice: a caller that
// checks what it reads (pull -verify hashes each layer's bytes as they are
// read) can only vouch for the first copy.
type onceReader struct {
	t    *testing.T
	r    *bytes.Reader
	mu   sync.Mutex
	seen map[int64]bool
}

func (o *onceReader) ReadAt(p []byte, off int64) (int, error) {
	o.mu.Lock()
	for i := off; i < off+int64(len(p)); i++ {
		if o.seen[i] {
			o.t.Errorf("byte %d read twice (read of %d bytes at %d)", i, len(p), off)
			break
		}
		o.seen[i] = true
	}
	o.mu.Unlock()
	return o.r.ReadAt(p, off)
}

// TestOpenReadsOnce: Open reads no byte of the image twice (it used to
// read the header's first bytes, then the whole first cluster again, and
// parse the second copy).
func TestOpenReadsOnce(t *testing.T) {
	for _, opts := range []WriteOptions{{ClusterBits: 16}, {ClusterBits: 9, BackingFile: "p"}, {ClusterBits: 12, Compress: true}} {
		l := wtGen(7, 256<<10, uint(opts.ClusterBits), opts.BackingFile != "")
		var buf bytes.Buffer
		if _, err := Write(context.Background(), &buf, l.vsize, l.extents, bytes.NewReader(l.src), opts); err != nil {
			t.Fatal(err)
		}
		b := buf.Bytes()
		r := &onceReader{t: t, r: bytes.NewReader(b), seen: map[int64]bool{}}
		if _, err := Open(r, int64(len(b))); err != nil {
			t.Fatal(err)
		}
		if len(r.seen) == 0 {
			t.Fatal("Open read nothing")
		}
	}
}

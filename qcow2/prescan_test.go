package qcow2

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
)

// psCounting counts the bytes read through it.
type psCounting struct {
	r io.ReaderAt
	n atomic.Int64
}

func (c *psCounting) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// psZeroClusters counts the clusters that hold Data but read as all zeros
// in the layer's own view: the clusters AssumeNoZeroData guesses wrong.
func psZeroClusters(l wtLayer, cb uint) int {
	cs := int64(1) << cb
	g := l.guest(0)
	n := 0
	for c := int64(0); c*cs < l.vsize; c++ {
		s, t := c*cs, min((c+1)*cs, l.vsize)
		for _, e := range l.extents {
			if e.Kind == Data && e.Offset < t && e.End() > s {
				if wrIsZero(g[s:t]) {
					n++
				}
				break
			}
		}
	}
	return n
}

// psScrub makes every all-zero data cluster non-zero (one byte of its first
// Data extent), so the layer has none.
func psScrub(l wtLayer, cb uint) {
	cs := int64(1) << cb
	g := l.guest(0)
	for c := int64(0); c*cs < l.vsize; c++ {
		s, t := c*cs, min((c+1)*cs, l.vsize)
		if !wrIsZero(g[s:t]) {
			continue
		}
		for _, e := range l.extents {
			if e.Kind == Data && e.Offset < t && e.End() > s {
				l.src[max(e.Offset, s)] = 1
				break
			}
		}
	}
}

func TestPrescanAssumeNoZeroData(t *testing.T) {
	cases := []struct {
		name    string
		seed    uint64
		vsize   int64
		cb      uint
		aligned bool
		backing string
		scrub   bool // remove all-zero data clusters: the guess holds
	}{
		{"base aligned scrubbed", 1, 4 << 20, 16, true, "", true},
		{"base unaligned scrubbed", 2, 3<<20 + 512, 12, false, "", true},
		{"delta aligned scrubbed", 3, 4 << 20, 16, true, "sha256:parent", true},
		{"delta 4k scrubbed", 4, 2 << 20, 12, true, "parent", true},
		{"base with zero data", 5, 4 << 20, 16, true, "", false},
		{"delta with zero data", 6, 4 << 20, 16, true, "parent", false},
		{"base unaligned with zero data", 7, 2<<20 + 1536, 12, false, "", false},
	}
	ctx := context.Background()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := wtGen(c.seed, c.vsize, c.cb, c.aligned)
			if c.scrub {
				psScrub(l, c.cb)
			}
			zeros := psZeroClusters(l, c.cb)
			if c.scrub != (zeros == 0) {
				t.Fatalf("layer has %d all-zero data clusters; the case wants scrub=%v", zeros, c.scrub)
			}
			opts := WriteOptions{ClusterBits: int(c.cb), BackingFile: c.backing}
			var want bytes.Buffer
			if _, err := Write(ctx, &want, l.vsize, l.extents, bytes.NewReader(l.src), opts); err != nil {
				t.Fatal(err)
			}
			opts.AssumeNoZeroData = true
			src := &psCounting{r: bytes.NewReader(l.src)}
			var got bytes.Buffer
			n, err := Write(ctx, &got, l.vsize, l.extents, src, opts)
			if !c.scrub {
				if !errors.Is(err, ErrZeroData) {
					t.Fatalf("Write = %d, %v; want ErrZeroData", n, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if n != int64(got.Len()) || !bytes.Equal(got.Bytes(), want.Bytes()) {
				t.Fatalf("output differs from the scanned Write (%d vs %d bytes)", got.Len(), want.Len())
			}
			// One pass: every Data byte read exactly once.
			var data int64
			for _, e := range l.extents {
				if e.Kind == Data {
					data += e.Length
				}
			}
			if r := src.n.Load(); r != data {
				t.Fatalf("read %d source bytes, want one pass = %d", r, data)
			}

			// Normalize passes the option through: re-normalizing our own
			// output with and without it gives the same bytes.
			im, err := Open(bytes.NewReader(want.Bytes()), int64(want.Len()))
			if err != nil {
				t.Fatal(err)
			}
			nopts := WriteOptions{BackingFile: c.backing}
			var n1, n2 bytes.Buffer
			if _, err := Normalize(ctx, &n1, im, nopts); err != nil {
				t.Fatal(err)
			}
			nopts.AssumeNoZeroData = true
			if _, err := Normalize(ctx, &n2, im, nopts); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(n1.Bytes(), n2.Bytes()) {
				t.Fatal("Normalize output differs with AssumeNoZeroData")
			}
		})
	}
}

func TestPrescanRejectsCompress(t *testing.T) {
	l := wtGen(9, 1<<20, 16, true)
	_, err := Write(context.Background(), &bytes.Buffer{}, l.vsize, l.extents, bytes.NewReader(l.src),
		WriteOptions{Compress: true, AssumeNoZeroData: true})
	if err == nil || errors.Is(err, ErrZeroData) {
		t.Fatalf("Write with Compress and AssumeNoZeroData = %v, want a usage error", err)
	}
}

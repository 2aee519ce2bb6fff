package layer_test

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"imagestore/layer"
)

// TestZeroBlocks: written in pieces of any size, the record answers every
// whole-block range as the bytes say; a rewind to a durable offset forgets
// what follows it, and one it cannot honour leaves it knowing nothing.
func TestZeroBlocks(t *testing.T) {
	const B = layer.ZeroBlock
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 64*B+100)
	for i := 0; i < 64; i++ {
		if rng.IntN(2) == 0 {
			continue // a zero block
		}
		data[i*B+rng.IntN(B)] = byte(1 + rng.IntN(255)) // one non-zero byte anywhere
	}
	write := func(z *layer.ZeroBlocks, b []byte) {
		for len(b) > 0 {
			k := min(len(b), 1+rng.IntN(3*B))
			z.Write(b[:k])
			b = b[k:]
		}
	}
	check := func(z *layer.ZeroBlocks, b []byte) {
		t.Helper()
		for off := 0; off+B <= len(b); off += B {
			for n := B; off+n <= len(b) && n <= 4*B; n += B {
				zero, known := z.AllZero(int64(off), int64(n))
				if !known || zero != bytes.Equal(b[off:off+n], make([]byte, n)) {
					t.Fatalf("AllZero(%d, %d) = %v, %v", off, n, zero, known)
				}
			}
		}
		if _, known := z.AllZero(int64(len(b)/B*B), B); known {
			t.Fatal("a block not yet complete is known")
		}
		if _, known := z.AllZero(1, B); known {
			t.Fatal("an unaligned range is known")
		}
	}
	var z layer.ZeroBlocks
	write(&z, data)
	if z.Len() != int64(len(data)) {
		t.Fatalf("Len %d, wrote %d", z.Len(), len(data))
	}
	check(&z, data)

	// A resume at an aligned durable offset, with other bytes after it.
	other := bytes.Clone(data)
	for i := 20 * B; i < len(other); i++ {
		other[i] ^= byte(i % 3)
	}
	z.Rewind(20 * B)
	write(&z, other[20*B:])
	check(&z, other)

	// Inside a zero block: the kept part is zeros, still known.
	zb := -1
	for i := 0; i < 64; i++ {
		if bytes.Equal(other[i*B:(i+1)*B], make([]byte, B)) {
			zb = i
			break
		}
	}
	if zb < 0 {
		t.Fatal("no zero block in the test data")
	}
	z.Rewind(int64(zb*B + 100))
	write(&z, other[zb*B+100:])
	check(&z, other)

	// Inside a block with data, or past what it saw: knows nothing.
	nb := -1
	for i := 0; i < 64; i++ {
		if !bytes.Equal(other[i*B:(i+1)*B], make([]byte, B)) {
			nb = i
			break
		}
	}
	for _, off := range []int64{int64(nb*B + 7), z.Len() + 1} {
		var y layer.ZeroBlocks
		write(&y, other)
		y.Rewind(off)
		if _, known := y.AllZero(0, B); known {
			t.Fatalf("after Rewind(%d) the record still answers", off)
		}
	}
}

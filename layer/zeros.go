package layer

import (
	"bytes"
	"sync"
)

// ZeroBlocks records, while a blob's bytes are written in order, which of
// its ZeroBlock-byte blocks are all zeros. CheckCanonical asks it instead
// of reading the stored blob back to learn which data clusters are all
// zeros (the only data its check needs), so a layer checked right after
// its upload is not read again. It implements qcow2.ZeroMap. Memory: one
// bit per block (32 KiB per GiB), up to zeroBlocksMax bytes of blob; past
// that it knows nothing. Safe for concurrent use.
type ZeroBlocks struct {
	mu      sync.Mutex
	bits    []uint64 // bit i set: block i is all zeros
	n       int64    // bytes seen
	partNZ  bool     // the block in progress has a non-zero byte
	invalid bool     // a gap or an unaligned rewind: knows nothing
	zeros   []byte   // ZeroBlock zero bytes to compare with
}

// ZeroBlock is the granularity of ZeroBlocks.
const ZeroBlock = 4096

// zeroBlocksMax bounds a record's memory (32 MiB of bits for 1 TiB).
const zeroBlocksMax = 1 << 40

// Write records p, the next bytes of the blob.
func (z *ZeroBlocks) Write(p []byte) (int, error) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.invalid {
		return len(p), nil
	}
	if z.n+int64(len(p)) > zeroBlocksMax {
		z.invalid, z.bits = true, nil
		return len(p), nil
	}
	if z.zeros == nil {
		z.zeros = make([]byte, ZeroBlock)
	}
	for q := p; len(q) > 0; {
		in := int(z.n % ZeroBlock)
		k := min(len(q), ZeroBlock-in)
		if !z.partNZ && !bytes.Equal(q[:k], z.zeros[:k]) {
			z.partNZ = true
		}
		z.n += int64(k)
		q = q[k:]
		if z.n%ZeroBlock == 0 {
			i := z.n/ZeroBlock - 1
			for int64(len(z.bits))*64 <= i {
				z.bits = append(z.bits, 0)
			}
			if !z.partNZ {
				z.bits[i/64] |= 1 << (i % 64)
			}
			z.partNZ = false
		}
	}
	return len(p), nil
}

// Len is how many bytes have been recorded.
func (z *ZeroBlocks) Len() int64 {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.n
}

// Rewind goes back to offset off (an upload resumed from its durable
// offset): what follows off is forgotten. An offset past what was seen,
// or inside a block not known to be all zeros, leaves it knowing nothing.
func (z *ZeroBlocks) Rewind(off int64) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if off == z.n || z.invalid {
		return
	}
	if off < 0 || off > z.n {
		z.invalid, z.bits = true, nil
		return
	}
	i := off / ZeroBlock
	if off%ZeroBlock != 0 && !z.zero(i) {
		z.invalid, z.bits = true, nil
		return
	}
	// The kept part of block i (if any) is zeros: it is in progress again.
	for j := i; j < (z.n+ZeroBlock-1)/ZeroBlock && j/64 < int64(len(z.bits)); j++ {
		z.bits[j/64] &^= 1 << (j % 64)
	}
	z.n, z.partNZ = off, false
}

func (z *ZeroBlocks) zero(i int64) bool {
	return i/64 < int64(len(z.bits)) && z.bits[i/64]&(1<<(i%64)) != 0
}

// AllZero reports whether bytes [off, off+n) are all zeros; known is false
// when the record cannot tell (not whole blocks, not yet seen, invalid).
func (z *ZeroBlocks) AllZero(off, n int64) (zero, known bool) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.invalid || off < 0 || n <= 0 || off%ZeroBlock != 0 || n%ZeroBlock != 0 || off+n > z.n/ZeroBlock*ZeroBlock {
		return false, false
	}
	for i := off / ZeroBlock; i < (off+n)/ZeroBlock; i++ {
		if !z.zero(i) {
			return false, true
		}
	}
	return true, true
}

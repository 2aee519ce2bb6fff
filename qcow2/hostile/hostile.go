// Package hostile builds the qcow2 files of the hostile corpus: images made
// to cost a reader memory, CPU or disk out of proportion to their size, as
// an attacker with an upload dir, a registry token or a peer would make
// them. Each constructor is the recipe of one file; large ones are
// synthesized on demand by an io.ReaderAt (File), so a 100 MiB hostile file
// costs a test no memory. Tests only: a shipped package never links it.
package hostile

import (
	"bytes"
	"encoding/binary"
	"io"

	"github.com/klauspost/compress/zstd"
)

// File is a synthesized image: Size bytes, read through ReadAt.
type File struct {
	Name string
	Size int64
	// region fills p with the bytes at off (p never crosses a region).
	regions []region
}

type region struct {
	off, n int64
	fill   func(p []byte, off int64) // off relative to the region
}

// ReadAt serves the synthesized bytes; bytes outside every region are zeros.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if off >= f.Size {
		return 0, io.EOF
	}
	n := len(p)
	var eof error
	if int64(n) > f.Size-off {
		n, eof = int(f.Size-off), io.EOF
	}
	p = p[:n]
	clear(p)
	for _, r := range f.regions {
		lo, hi := max(off, r.off), min(off+int64(n), r.off+r.n)
		if lo < hi {
			r.fill(p[lo-off:hi-off], lo-r.off)
		}
	}
	return n, eof
}

// Bytes materializes a (small) File.
func (f *File) Bytes() []byte {
	b := make([]byte, f.Size)
	_, _ = f.ReadAt(b, 0)
	return b
}

// WriteTo streams the file (for tests that need it on disk).
func (f *File) WriteTo(w io.Writer) (int64, error) {
	return io.Copy(w, io.NewSectionReader(f, 0, f.Size))
}

func fixed(b []byte) func(p []byte, off int64) {
	return func(p []byte, off int64) { copy(p, b[off:]) }
}

// header is a v3 header (refcount order 4, header length 112) at offset 0.
func header(cb uint32, vsize uint64, l1Size uint32, l1Off, rtOff uint64, zstdType bool) []byte {
	h := make([]byte, 112)
	be := binary.BigEndian
	be.PutUint32(h[0:], 0x514649fb)
	be.PutUint32(h[4:], 3)
	be.PutUint32(h[20:], cb)
	be.PutUint64(h[24:], vsize)
	be.PutUint32(h[36:], l1Size)
	be.PutUint64(h[40:], l1Off)
	be.PutUint64(h[48:], rtOff)
	be.PutUint32(h[56:], 1) // refcount_table_clusters; its entries stay zero
	be.PutUint32(h[96:], 4)
	be.PutUint32(h[100:], 112)
	if zstdType {
		be.PutUint64(h[72:], 1<<3)
		h[104] = 1
	}
	return h
}

const copied = uint64(1) << 63

// compressedEntry is an L2 entry for a compressed run of n bytes at off.
func compressedEntry(cb uint32, off, n uint64) uint64 {
	x := 62 - (cb - 8)
	end := off + n
	sectors := (end+511)/512 - off/512 - 1
	return 1<<62 | sectors<<x | off
}

// ZstdFrame is one zstd frame holding n bytes of b (qemu's zstd clusters are
// single frames; uniform data gives RLE blocks, a ratio of thousands).
func ZstdFrame(n int, b byte) []byte {
	e, _ := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	defer e.Close()
	return e.EncodeAll(bytes.Repeat([]byte{b}, n), nil)
}

// SharedRun is the metadata bomb: 512-byte clusters, tables L2
// tables (512 bytes, 64 entries each) whose every entry points at the same
// compressed run (one zstd frame of a whole cluster of 0x5a). The virtual
// size is exactly what the tables map. tables = 196608 gives 96 MiB of L2
// tables and 12.6 M entries (the 900 MiB case); 98304 gives 48 MiB.
// qemu never writes a shared compressed run; qemu-img check calls it corrupt.
func SharedRun(tables int) *File {
	const cb, cs = 9, 512
	entries := uint64(cs / 8)
	vsize := uint64(tables) * entries * cs
	l1Clusters := (uint64(tables)*8 + cs - 1) / cs
	l1Off := uint64(cs)
	rtOff := l1Off + l1Clusters*cs
	l2Off := rtOff + cs
	dataOff := l2Off + uint64(tables)*cs
	frame := ZstdFrame(cs, 0x5a)
	l1 := make([]byte, tables*8)
	for i := 0; i < tables; i++ {
		binary.BigEndian.PutUint64(l1[i*8:], copied|(l2Off+uint64(i)*cs))
	}
	l2 := make([]byte, cs)
	e := compressedEntry(cb, dataOff, uint64(len(frame)))
	for j := 0; j < int(entries); j++ {
		binary.BigEndian.PutUint64(l2[j*8:], e)
	}
	return &File{
		Name: "shared-compressed-run",
		Size: int64(dataOff) + cs,
		regions: []region{
			{0, 112, fixed(header(cb, vsize, uint32(tables), l1Off, rtOff, true))},
			{int64(l1Off), int64(len(l1)), fixed(l1)},
			{int64(l2Off), int64(tables) * cs, func(p []byte, off int64) {
				for i := range p {
					p[i] = l2[(off+int64(i))%cs]
				}
			}},
			{int64(dataOff), int64(len(frame)), fixed(frame)},
		},
	}
}

// RatioBomb is a compression bomb that shares nothing: 2 MiB clusters,
// n L2 entries each pointing at its own copy of one zstd frame of 2 MiB of
// 0xa5 (about 70 bytes: RLE blocks), packed back to back as qemu packs
// compressed runs. n = 1024 turns ~70 KiB of file into 2 GiB of guest data.
func RatioBomb(n int) *File {
	const cb, cs = 21, 2 << 20
	frame := ZstdFrame(cs, 0xa5)
	l1Off, rtOff, l2Off, dataOff := uint64(cs), uint64(2*cs), uint64(3*cs), uint64(4*cs)
	vsize := uint64(n) * cs
	l1 := make([]byte, 8)
	binary.BigEndian.PutUint64(l1, copied|l2Off)
	l2 := make([]byte, n*8)
	data := bytes.Repeat(frame, n)
	for i := 0; i < n; i++ {
		off := dataOff + uint64(i*len(frame))
		binary.BigEndian.PutUint64(l2[i*8:], compressedEntry(cb, off, uint64(len(frame))))
	}
	return &File{
		Name: "compression-ratio-bomb",
		Size: int64(dataOff) + int64(len(data)),
		regions: []region{
			{0, 112, fixed(header(cb, vsize, 1, l1Off, rtOff, true))},
			{int64(l1Off), 8, fixed(l1)},
			{int64(l2Off), int64(len(l2)), fixed(l2)},
			{int64(dataOff), int64(len(data)), fixed(data)},
		},
	}
}

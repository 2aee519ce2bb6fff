// Package corpus builds the malicious and broken qcow2 images under
// qcow2/testdata/corpus. Each image starts from one small valid image
// (512-byte clusters, 64 KiB virtual size) with one defect applied, so each
// file exercises exactly one check of the reader.
package corpus

import (
	"bytes"
	"compress/flate"
	"encoding/binary"

	"github.com/klauspost/compress/zstd"
)

// Image is one corpus entry.
type Image struct {
	Name  string
	Bytes []byte
}

// Layout of the base image, in 512-byte clusters.
const (
	CS          = 512
	VirtualSize = 64 << 10
	cHeader     = 0
	cRefTable   = 1
	cRefBlock   = 2
	cL1         = 3
	cL2         = 4
	cData0      = 5
	cData1      = 6
	cSpare      = 7 // appended by withCompressed
	nClusters   = 7
	copied      = 1 << 63
	compressed  = 1 << 62
)

type img []byte

func (b img) u32(off int, v uint32) { binary.BigEndian.PutUint32(b[off:], v) }
func (b img) u64(off int, v uint64) { binary.BigEndian.PutUint64(b[off:], v) }
func (b img) l1(i int, v uint64)    { b.u64(cL1*CS+8*i, v) }
func (b img) l2(i int, v uint64)    { b.u64(cL2*CS+8*i, v) }

// Base returns the valid control image: v3, two data clusters, one zero
// cluster, a refcount table and block accounting for every cluster.
func Base() []byte {
	b := img(make([]byte, nClusters*CS))
	b.u32(0, 0x514649fb)
	b.u32(4, 3)
	b.u32(20, 9)           // cluster_bits
	b.u64(24, VirtualSize) // size
	b.u32(36, 2)           // l1_size: 32 KiB per L2 table
	b.u64(40, cL1*CS)
	b.u64(48, cRefTable*CS)
	b.u32(56, 1)    // refcount_table_clusters
	b.u32(96, 4)    // refcount_order: 16-bit
	b.u32(100, 112) // header_length
	// Header extensions at 112: end marker (already zero).
	b.u64(cRefTable*CS, cRefBlock*CS)
	for c := 0; c < nClusters; c++ {
		binary.BigEndian.PutUint16(b[cRefBlock*CS+2*c:], 1)
	}
	b.l1(0, cL2*CS|copied)
	b.l2(0, cData0*CS|copied)
	b.l2(1, cData1*CS|copied)
	b.l2(2, 1) // zero cluster
	copy(b[cData0*CS:], bytes.Repeat([]byte{0x11}, CS))
	copy(b[cData1*CS:], bytes.Repeat([]byte{0x22}, CS))
	return b
}

// compressedEntry builds an L2 entry for compressed data at off spanning
// sectors additional 512-byte sectors (cluster_bits 9: one sector bit).
func compressedEntry(off, sectors uint64) uint64 {
	return compressed | sectors<<61 | off
}

func deflate(data []byte) []byte {
	var buf bytes.Buffer
	w, _ := flate.NewWriter(&buf, flate.BestCompression)
	w.Write(data)
	w.Close()
	return buf.Bytes()
}

func zstdFrame(data []byte) []byte {
	e, _ := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	defer e.Close()
	return e.EncodeAll(data, nil)
}

// withCompressed puts a compressed stream in the spare cluster mapped at
// guest cluster 3 (growing the file to hold it).
func withCompressed(b img, stream []byte) img {
	if len(b) < cSpare*CS {
		b = append(b, make([]byte, cSpare*CS-len(b))...)
	}
	end := cSpare*CS + len(stream)
	if end > len(b) {
		b = append(b, make([]byte, end-len(b))...)
	}
	copy(b[cSpare*CS:], stream)
	binary.BigEndian.PutUint16(b[cRefBlock*CS+2*cSpare:], 1)
	sectors := uint64((len(stream)+511)/512 - 1)
	b.l2(3, compressedEntry(cSpare*CS, sectors))
	return b
}

func zstdHeader(b img) img {
	b.u64(72, 1<<3) // incompatible: compression type
	b[104] = 1      // zstd
	return b
}

// withExtension writes one header extension at 112 (then the end marker).
func withExtension(b img, typ uint32, data []byte) img {
	b.u32(112, typ)
	b.u32(116, uint32(len(data)))
	copy(b[120:], data)
	return b
}

func withBacking(b img, name string) img {
	off := 256
	b.u64(8, uint64(off))
	b.u32(16, uint32(len(name)))
	copy(b[off:], name)
	return withExtension(b, 0xe2792aca, []byte("qcow2"))
}

// All returns every corpus image, valid controls first. It is one long
// table on purpose: each entry is a line or two naming one hostile header,
// and reading them together is how a reviewer sees what is covered.
func All() []Image {
	var out []Image
	add := func(name string, f func(b img) img) {
		out = append(out, Image{Name: name, Bytes: f(Base())})
	}
	id := func(b img) img { return b }
	add("valid", id)
	add("valid-v2", func(b img) img {
		b.u32(4, 2)
		b.l2(2, 0) // no zero flag in v2
		clear(b[72:112])
		return b
	})
	add("valid-zlib", func(b img) img { return withCompressed(b, deflate(bytes.Repeat([]byte{0x33}, CS))) })
	add("valid-zstd", func(b img) img { return withCompressed(zstdHeader(b), zstdFrame(bytes.Repeat([]byte{0x44}, CS))) })
	add("backing-etc-passwd", func(b img) img { return withBacking(b, "../../etc/passwd") })
	add("backing-etc-shadow", func(b img) img { return withBacking(b, "/etc/shadow") })

	// Header.
	add("not-qcow2", func(b img) img { return img(bytes.Repeat([]byte("not an image "), 40)) })
	add("empty", func(b img) img { return b[:0] })
	add("truncated-header", func(b img) img { return b[:50] })
	add("truncated-v3-header", func(b img) img { return b[:90] })
	add("raw-looks-like-qcow2", func(b img) img {
		r := img(bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef, 0x01, 0x10, 0x00, 0x7f}, 512))
		r.u32(0, 0x514649fb)
		r.u32(4, 3)
		r.u32(20, 16)
		return r
	})
	add("version-1", func(b img) img { b.u32(4, 1); return b })
	add("version-4", func(b img) img { b.u32(4, 4); return b })
	add("cluster-bits-8", func(b img) img { b.u32(20, 8); return b })
	add("cluster-bits-22", func(b img) img { b.u32(20, 22); return b })
	add("header-length-beyond-cluster", func(b img) img { b.u32(100, 1024); return b })
	add("header-length-unaligned", func(b img) img { b.u32(100, 105); return b })
	add("ext-beyond-cluster", func(b img) img { return withExtension(b, 0x12345678, make([]byte, 16)) }) // patched below
	add("feature-table-bad-length", func(b img) img { return withExtension(b, 0x6803f857, make([]byte, 40)) })
	add("virtual-size-absurd", func(b img) img { b.u64(24, 1<<63-1); return b })
	add("too-many-snapshots", func(b img) img { b.u32(60, 1<<20); return b })
	add("refcount-order-7", func(b img) img { b.u32(96, 7); return b })
	add("backing-name-too-long", func(b img) img { b.u64(8, 256); b.u32(16, 1024); return b })
	add("backing-name-outside-cluster", func(b img) img { b.u64(8, 500); b.u32(16, 100); return b })
	add("backing-name-in-header", func(b img) img { b.u64(8, 16); b.u32(16, 8); return b })

	// Features.
	add("encryption-aes", func(b img) img { b.u32(32, 1); return b })
	add("encryption-luks", func(b img) img {
		b.u32(32, 2)
		return withExtension(b, 0x0537be77, make([]byte, 16))
	})
	add("encryption-extension", func(b img) img { return withExtension(b, 0x0537be77, make([]byte, 16)) })
	add("data-file-bit", func(b img) img { b.u64(72, 1<<2); return b })
	add("data-file-extension", func(b img) img { return withExtension(b, 0x44415441, []byte("/dev/sda")) })
	add("unknown-incompatible-bit", func(b img) img {
		b.u64(72, 1<<5)
		name := make([]byte, 48)
		name[1] = 5
		copy(name[2:], "evil feature")
		return withExtension(b, 0x6803f857, name)
	})
	add("extended-l2-bit", func(b img) img { b.u64(72, 1<<4); return b })
	add("dirty-bit", func(b img) img { b.u64(72, 1<<0); return b })
	add("corrupt-bit", func(b img) img { b.u64(72, 1<<1); return b })
	add("compression-type-without-bit", func(b img) img { b[104] = 1; return b })
	add("compression-bit-with-zlib", func(b img) img { b.u64(72, 1<<3); return b })
	add("compression-type-unknown", func(b img) img { b.u64(72, 1<<3); b[104] = 7; return b })

	// L1 and refcount table placement.
	add("l1-size-2^32-1", func(b img) img { b.u32(36, 1<<32-1); return b })
	add("l1-too-small", func(b img) img { b.u32(36, 1); return b })
	add("l1-past-eof", func(b img) img { b.u64(40, 64*CS); return b })
	add("l1-unaligned", func(b img) img { b.u64(40, cL1*CS+8); return b })
	add("l1-at-header", func(b img) img { b.u64(40, 0); return b })
	add("refcount-table-too-large", func(b img) img { b.u32(56, 1<<20); return b })
	add("refcount-table-past-eof", func(b img) img { b.u64(48, 64*CS); return b })
	add("refcount-table-unaligned", func(b img) img { b.u64(48, cRefTable*CS+8); return b })
	add("refcount-table-empty", func(b img) img { b.u32(56, 0); return b })
	add("refcount-block-past-eof", func(b img) img { b.u64(cRefTable*CS, 64*CS); return b })
	add("refcount-block-aliases-l2", func(b img) img { b.u64(cRefTable*CS, cL2*CS); return b })

	// L1/L2 entries.
	add("l2-table-past-eof", func(b img) img { b.l1(0, 64*CS|copied); return b })
	add("l1-entry-low-bits", func(b img) img { b.l1(0, cL2*CS+8|copied); return b })
	add("l2-table-offset-2^56", func(b img) img { b.l1(0, 1<<56|copied); return b })
	add("l1-reserved-bits", func(b img) img { b.l1(0, cL2*CS|copied|1<<57); return b })
	add("l2-table-twice", func(b img) img { b.l1(1, cL2*CS|copied); return b })
	add("l2-table-is-l1", func(b img) img { b.l1(0, cL1*CS|copied); return b })
	add("data-past-eof", func(b img) img { b.l2(0, 64*CS|copied); return b })
	add("l2-entry-low-bits", func(b img) img { b.l2(0, cData0*CS+64|copied); return b })
	add("l2-reserved-bits", func(b img) img { b.l2(0, cData0*CS|copied|1<<60); return b })
	add("alias-data-data", func(b img) img { b.l2(1, cData0*CS|copied); return b })
	add("alias-data-l1", func(b img) img { b.l2(1, cL1*CS|copied); return b })
	add("alias-data-reftable", func(b img) img { b.l2(5, cRefTable*CS|copied); return b })
	add("alias-zero-alloc-data", func(b img) img { b.l2(2, cData0*CS|1); return b })

	// Compressed clusters.
	add("compressed-past-eof", func(b img) img { b.l2(3, compressedEntry(64*CS, 1)); return b })
	add("data-offset-huge", func(b img) img { b.l2(0, 0x00fffffffffffe00|copied); return b })
	add("compressed-run-past-eof", func(b img) img {
		b = withCompressed(b, deflate(bytes.Repeat([]byte{0x33}, CS)))
		b.l2(3, compressedEntry(uint64(len(b)-8), 1))
		return b
	})
	add("compressed-offset-2^56", func(b img) img { b.l2(3, compressedEntry(1<<56+cSpare*CS, 0)); return b })
	add("compressed-aliases-l1", func(b img) img { b.l2(3, compressedEntry(cL1*CS+100, 0)); return b })
	add("compressed-bomb-zlib", func(b img) img { return withCompressed(b, deflate(make([]byte, 256<<10))) })
	add("compressed-bomb-zstd", func(b img) img { return withCompressed(zstdHeader(b), zstdFrame(make([]byte, 256<<10))) })
	add("compressed-run-shared", func(b img) img {
		b = withCompressed(b, deflate(bytes.Repeat([]byte{0x33}, CS)))
		b.l2(4, compressedEntry(cSpare*CS, 0)) // a second entry on the same run
		return b
	})
	add("compressed-short-zlib", func(b img) img { return withCompressed(b, deflate(make([]byte, 100))) })
	add("compressed-garbage", func(b img) img { return withCompressed(b, bytes.Repeat([]byte{0xff, 0x00, 0x13}, 100)) })
	add("compressed-garbage-zstd", func(b img) img {
		return withCompressed(zstdHeader(b), bytes.Repeat([]byte{0xfd, 0x2f, 0xb5, 0x28}, 50))
	})

	// ext-beyond-cluster: claim more bytes than the header cluster holds.
	for i := range out {
		if out[i].Name == "ext-beyond-cluster" {
			img(out[i].Bytes).u32(116, 4096)
		}
	}
	return out
}

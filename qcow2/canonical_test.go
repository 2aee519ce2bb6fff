package qcow2

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// ccOpts are the options a layer's header implies (what the store checks
// a pushed layer against).
func ccOpts(im *Image) WriteOptions {
	cb := 0
	for cs := im.ClusterSize(); cs > 1; cs >>= 1 {
		cb++
	}
	return WriteOptions{ClusterBits: cb, BackingFile: im.BackingFile(),
		Compress: im.Info().FormatSpecific.Data.CompressionType == "zstd"}
}

// ccVerdicts returns CheckNormalized's verdict on b and the reference one
// (re-encode with Normalize and compare bytes); ok is false when b does
// not even open.
func ccVerdicts(t testing.TB, b []byte) (got, want, ok bool) {
	im, err := Open(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		return false, false, false
	}
	opts := ccOpts(im)
	var buf bytes.Buffer
	_, werr := Normalize(context.Background(), &buf, im, opts)
	want = werr == nil && bytes.Equal(buf.Bytes(), b)
	cerr := CheckNormalized(context.Background(), im, bytes.NewReader(b), int64(len(b)), opts, nil)
	if cerr != nil && !errors.Is(cerr, ErrNotNormalized) && werr == nil {
		t.Fatalf("CheckNormalized failed without ErrNotNormalized: %v", cerr)
	}
	// With a record of which blocks are zeros, the same verdict.
	zerr := CheckNormalized(context.Background(), im, bytes.NewReader(b), int64(len(b)), opts, ccZeros(b))
	if (zerr == nil) != (cerr == nil) {
		t.Fatalf("CheckNormalized without a zero map: %v; with one: %v", cerr, zerr)
	}
	return cerr == nil, want, true
}

// ccZeros is a ZeroMap of b that knows 4 KiB-aligned blocks only, as the
// store's record of an upload does.
type ccZeros []byte

func (b ccZeros) AllZero(off, n int64) (bool, bool) {
	if off%4096 != 0 || n%4096 != 0 || off+n > int64(len(b)) {
		return false, false
	}
	return wrIsZero(b[off : off+n]), true
}

// TestCheckNormalizedAgreesWithReencode: on our writer's layers (base and
// delta, plain and zstd, several cluster sizes) and on mutations of them
// (a byte flipped in the metadata or the data, a data cluster zeroed in
// place, a cluster appended or cut), CheckNormalized accepts exactly what
// re-encoding reproduces byte for byte.
func TestCheckNormalizedAgreesWithReencode(t *testing.T) {
	type variant struct {
		cb   uint
		opts WriteOptions
	}
	variants := []variant{
		{16, WriteOptions{}},
		{16, WriteOptions{BackingFile: "../ab/abcdef"}},
		{16, WriteOptions{Compress: true}},
		{12, WriteOptions{BackingFile: "p", Compress: true}},
		{9, WriteOptions{}},
		{12, WriteOptions{BackingFile: "p"}},
	}
	accepted, refused, otherFrames, cutFrames := 0, 0, 0, 0
	for vi, v := range variants {
		for seed := uint64(1); seed <= 3; seed++ {
			vsize := int64(512<<10) + 512*int64(seed%2) // a partial last cluster in some bases
			if v.opts.BackingFile != "" {
				vsize = 512 << 10
			}
			l := wtGen(seed+uint64(vi)*100, vsize, v.cb, v.opts.BackingFile != "")
			opts := v.opts
			opts.ClusterBits = int(v.cb)
			var canon bytes.Buffer
			if _, err := Write(context.Background(), &canon, l.vsize, l.extents, bytes.NewReader(l.src), opts); err != nil {
				t.Fatal(err)
			}
			c := canon.Bytes()
			if got, want, ok := ccVerdicts(t, c); !ok || !got || !want {
				t.Fatalf("variant %d seed %d: our own layer: check %v, re-encode %v, opens %v", vi, seed, got, want, ok)
			}
			im, err := Open(bytes.NewReader(c), int64(len(c)))
			if err != nil {
				t.Fatal(err)
			}
			cs := int64(1) << v.cb
			rng := rand.New(rand.NewPCG(seed, uint64(vi)))
			var muts [][]byte
			flip := func(off int64) {
				m := bytes.Clone(c)
				m[off] ^= byte(1 + rng.IntN(255))
				muts = append(muts, m)
			}
			// The first clusters (the metadata) at a random byte each, random
			// bytes anywhere, and the last cluster's last byte (past the
			// virtual size when the last guest cluster is partial).
			for off := int64(0); off < min(int64(len(c)), 24*cs); off += cs {
				flip(off + rng.Int64N(cs))
			}
			for range 24 {
				flip(rng.Int64N(int64(len(c))))
			}
			flip(int64(len(c)) - 1)
			// A stored data cluster zeroed in place (its L2 entry kept).
			ext, err := im.Extents()
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range ext {
				if e.Kind != Data {
					continue
				}
				host := int64(im.entry(e.Offset>>v.cb) & offsetMask)
				if host == 0 || im.entry(e.Offset>>v.cb)&entryCompressed != 0 {
					continue
				}
				m := bytes.Clone(c)
				clear(m[host : host+cs])
				muts = append(muts, m)
				// Only the first probe's worth zeroed: still canonical.
				m = bytes.Clone(c)
				clear(m[host : host+min(cs, canonProbe)])
				muts = append(muts, m)
				break
			}
			// A compressed cluster whose frame is another valid zstd frame of
			// the same content (another level), padded with zeros to the
			// length of ours: it decodes to the same guest bytes, but it is
			// not the frame our writer makes.
			for _, e := range ext {
				en := im.entry(e.Offset >> v.cb)
				if e.Kind != Data || en&entryCompressed == 0 {
					continue
				}
				off, n := im.compressedRange(en)
				ours, other := ccFrames(t, im, e.Offset, zstd.SpeedBetterCompression)
				if bytes.Equal(ours, other) || uint64(len(other)) > n || len(other) > len(ours) {
					continue
				}
				m := bytes.Clone(c)
				copy(m[off:], other)
				clear(m[off+uint64(len(other)) : off+uint64(len(ours))])
				if got, want, ok := ccVerdicts(t, m); !ok || got || want {
					t.Fatalf("variant %d seed %d: another frame of the same content: opens %v, check %v, re-encode %v; want refused", vi, seed, ok, got, want)
				}
				otherFrames++
				break
			}
			// The same for the frame stored last, with the file cut right
			// after the shorter frame: reading as many bytes as our frame
			// has would run past the end of the file.
			var lastOff, lastN uint64
			var lastGuest int64 = -1
			for _, e := range ext {
				for g := e.Offset; e.Kind == Data && g < e.End(); g += cs {
					if en := im.entry(g >> v.cb); en&entryCompressed != 0 {
						if off, n := im.compressedRange(en); lastGuest < 0 || off > lastOff {
							lastOff, lastN, lastGuest = off, n, g
						}
					}
				}
			}
			if lastGuest >= 0 {
				ours, other := ccFrames(t, im, lastGuest, zstd.SpeedBestCompression)
				if len(other) < len(ours) && uint64(len(ours)) <= lastN && lastOff+uint64(len(ours)) <= uint64(len(c)) {
					m := append(bytes.Clone(c[:lastOff]), other...)
					if got, _, ok := ccVerdicts(t, m); ok && got {
						t.Fatalf("variant %d seed %d: a shorter last frame, file cut after it: accepted", vi, seed)
					}
					cutFrames++
				}
			}
			muts = append(muts, append(bytes.Clone(c), make([]byte, cs)...), c[:len(c)-int(cs)])
			for i, m := range muts {
				got, want, ok := ccVerdicts(t, m)
				if !ok {
					continue
				}
				if got != want {
					t.Fatalf("variant %d seed %d mutation %d: CheckNormalized accepts=%v, re-encoding reproduces=%v", vi, seed, i, got, want)
				}
				if got {
					accepted++
				} else {
					refused++
				}
			}
		}
	}
	// Data flips keep a layer canonical, metadata flips do not: both kinds
	// must have been seen for the comparison to mean anything.
	if accepted == 0 || refused == 0 {
		t.Fatalf("mutations accepted %d, refused %d: want some of each", accepted, refused)
	}
	if otherFrames == 0 || cutFrames == 0 {
		t.Fatalf("compressed layers given another frame of a cluster's content: %d, with the file cut after it: %d; want some of each (the reuse of stored frames went untested)", otherFrames, cutFrames)
	}
	t.Logf("mutations: %d still canonical, %d refused", accepted, refused)
}

// FuzzCheckNormalized: on any bytes that open, CheckNormalized and
// re-encoding agree.
func FuzzCheckNormalized(f *testing.F) {
	for i, opts := range []WriteOptions{{ClusterBits: 12}, {ClusterBits: 12, BackingFile: "p"}, {ClusterBits: 12, Compress: true}} {
		l := wtGen(uint64(i+1), 256<<10, 12, opts.BackingFile != "")
		var buf bytes.Buffer
		if _, err := Write(context.Background(), &buf, l.vsize, l.extents, bytes.NewReader(l.src), opts); err != nil {
			f.Fatal(err)
		}
		f.Add(buf.Bytes())
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		got, want, ok := ccVerdicts(t, b)
		if ok && got != want {
			t.Fatalf("CheckNormalized accepts=%v, re-encoding reproduces=%v", got, want)
		}
	})
}

// ccEncodeAt is a zstd encoder at level l, as our writer's but for the level.
func ccEncodeAt(t testing.TB, l zstd.EncoderLevel) *zstd.Encoder {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(l),
		zstd.WithEncoderCRC(false), zstd.WithLowerEncoderMem(true))
	if err != nil {
		t.Fatal(err)
	}
	return enc
}

// ccFrames returns our writer's zstd frame of the guest cluster at off and
// the frame zstd makes of the same content at level l.
func ccFrames(t testing.TB, im *Image, off int64, l zstd.EncoderLevel) (ours, other []byte) {
	content := make([]byte, im.ClusterSize())
	// A last cluster past the virtual size reads short (io.EOF): the
	// writer encodes it padded with zeros.
	if _, err := im.ReadAt(content, off); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return ccEncodeAt(t, zstd.SpeedFastest).EncodeAll(content, nil), ccEncodeAt(t, l).EncodeAll(content, nil)
}

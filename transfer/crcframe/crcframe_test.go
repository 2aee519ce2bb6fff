package crcframe_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"imagestore/transfer/crcframe"
)

func randBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, 7))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// encode frames data the way a client does: Writes of write bytes, each
// cut into frames of at most frame bytes.
func encode(t testing.TB, data []byte, write, frame int) []byte {
	t.Helper()
	var body bytes.Buffer
	w := crcframe.NewWriter(&body, frame)
	for off := 0; off < len(data); off += write {
		if n, err := w.Write(data[off:min(off+write, len(data))]); err != nil || n != min(write, len(data)-off) {
			t.Fatalf("write: %d, %v", n, err)
		}
	}
	return body.Bytes()
}

// decodeBoth decodes body with Read (small reads) and with WriteTo, and
// requires both to give the same bytes and the same error.
func decodeBoth(t testing.TB, body []byte) ([]byte, error) {
	t.Helper()
	var viaRead bytes.Buffer
	r := crcframe.NewReader(iotest.HalfReader(bytes.NewReader(body)))
	buf := make([]byte, 1000)
	var rerr error
	for {
		n, err := r.Read(buf)
		viaRead.Write(buf[:n])
		if err != nil {
			if err != io.EOF {
				rerr = err
			}
			break
		}
	}
	var viaWriteTo bytes.Buffer
	n, werr := crcframe.NewReader(bytes.NewReader(body)).WriteTo(&viaWriteTo)
	if n != int64(viaWriteTo.Len()) {
		t.Fatalf("WriteTo returned %d, wrote %d", n, viaWriteTo.Len())
	}
	if !bytes.Equal(viaRead.Bytes(), viaWriteTo.Bytes()) || (rerr == nil) != (werr == nil) ||
		(rerr != nil && rerr.Error() != werr.Error()) {
		t.Fatalf("Read gave %d bytes, %v; WriteTo %d bytes, %v", viaRead.Len(), rerr, viaWriteTo.Len(), werr)
	}
	return viaWriteTo.Bytes(), werr
}

func TestRoundTrip(t *testing.T) {
	data := randBytes(5<<20+123, 1)
	for _, tc := range []struct {
		name         string
		n            int
		write, frame int
	}{
		{"empty", 0, 1 << 20, 1 << 20},
		{"one byte", 1, 1 << 20, 1 << 20},
		{"1 MiB frames from 4 MiB writes", len(data), 4 << 20, 1 << 20},
		{"small writes", 300 << 10, 4093, 1 << 20},
		{"frames of one byte", 3000, 1000, 1},
		{"frame size clamped to MaxFrame", len(data), len(data), 64 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := encode(t, data[:tc.n], tc.write, tc.frame)
			got, err := decodeBoth(t, body)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data[:tc.n]) {
				t.Fatalf("decoded %d bytes, not the %d sent", len(got), tc.n)
			}
		})
	}
}

// TestDamage: a flipped bit anywhere in a frame, a bad length, or a body
// that ends inside a frame hands out none of that frame's bytes, only the
// frames before it.
func TestDamage(t *testing.T) {
	data := randBytes(3<<20, 2)
	body := encode(t, data, 1<<20, 1<<20) // three frames of 1 MiB
	frame := crcframe.HeaderSize + 1<<20
	for _, tc := range []struct {
		name   string
		damage func([]byte) []byte
		good   int // whole frames handed out
		want   error
	}{
		{"data byte of frame 2", func(b []byte) []byte { b[frame+crcframe.HeaderSize+12345] ^= 0x10; return b }, 1, crcframe.ErrChecksum},
		{"last byte of frame 3", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }, 2, crcframe.ErrChecksum},
		{"crc of frame 1", func(b []byte) []byte { b[5] ^= 0x80; return b }, 0, crcframe.ErrChecksum},
		{"length 0", func(b []byte) []byte { copy(b[frame:], []byte{0, 0, 0, 0}); return b }, 1, crcframe.ErrMalformed},
		{"length over MaxFrame", func(b []byte) []byte { copy(b[frame:], []byte{0, 0x40, 0, 1}); return b }, 1, crcframe.ErrMalformed},
		{"length shorter", func(b []byte) []byte { b[frame+1] = 0x0f; return b }, 1, crcframe.ErrChecksum},
		{"cut inside data", func(b []byte) []byte { return b[:2*frame+100] }, 2, io.ErrUnexpectedEOF},
		{"cut inside a header", func(b []byte) []byte { return b[:frame+3] }, 1, io.ErrUnexpectedEOF},
		{"cut at a frame boundary", func(b []byte) []byte { return b[:2*frame] }, 2, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := decodeBoth(t, tc.damage(bytes.Clone(body)))
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if !bytes.Equal(got, data[:tc.good<<20]) {
				t.Fatalf("handed out %d bytes, want the %d of the frames before the damage", len(got), tc.good<<20)
			}
			var ce *crcframe.ChecksumError
			if errors.Is(tc.want, crcframe.ErrChecksum) && (!errors.As(err, &ce) || ce.Offset != int64(tc.good)<<20) {
				t.Fatalf("checksum error %v does not name the frame at %d", err, tc.good<<20)
			}
		})
	}
}

type failingWriter struct{ left int }

func (f *failingWriter) Write(p []byte) (int, error) {
	if len(p) > f.left {
		n := f.left
		f.left = 0
		return n, errors.New("disk full")
	}
	f.left -= len(p)
	return len(p), nil
}

// TestWriteToStopsOnWriteError: the writer's error comes back, with the
// bytes it took, and the Reader stays failed.
func TestWriteToStopsOnWriteError(t *testing.T) {
	data := randBytes(6<<20, 3)
	r := crcframe.NewReader(bytes.NewReader(encode(t, data, 1<<20, 1<<20)))
	n, err := r.WriteTo(&failingWriter{left: 2<<20 + 10})
	if err == nil || err.Error() != "disk full" || n != 2<<20+10 {
		t.Fatalf("WriteTo = %d, %v", n, err)
	}
	if k, err := r.Read(make([]byte, 10)); k != 0 || err == nil {
		t.Fatalf("Read after the failure = %d, %v", k, err)
	}
}

func FuzzReader(f *testing.F) {
	f.Add(encode(f, randBytes(3000, 4), 1000, 700))
	f.Add([]byte{0, 0, 0, 1, 0, 0, 0, 0, 'x'})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, body []byte) {
		got, err := decodeBoth(t, body)
		if len(got) > len(body) {
			t.Fatalf("decoded %d bytes from %d", len(got), len(body))
		}
		// What comes out is exactly the data of the whole, checked frames
		// before the first bad one (by a decoder written from the format
		// alone), and a body with a bad one is an error.
		want, clean := referenceDecode(body)
		if !bytes.Equal(got, want) {
			t.Fatalf("handed out %d bytes, the frames before the first bad one hold %d", len(got), len(want))
		}
		if clean != (err == nil) {
			t.Fatalf("err %v, but the body is clean: %v", err, clean)
		}
		if err == nil {
			// A body that decodes cleanly is frames of the bytes it gave:
			// re-encoding them frame by frame gives it back.
			var again bytes.Buffer
			rest := got
			for off := 0; off < len(body); {
				n := int(uint32(body[off])<<24 | uint32(body[off+1])<<16 | uint32(body[off+2])<<8 | uint32(body[off+3]))
				h := crcframe.Header(rest[:n])
				again.Write(h[:])
				again.Write(rest[:n])
				rest, off = rest[n:], off+crcframe.HeaderSize+n
			}
			if !bytes.Equal(again.Bytes(), body) {
				t.Fatal("a clean decode is not the frames of its bytes")
			}
		}
	})
}

// referenceDecode is the data of body's frames up to the first that is
// not whole and valid, and whether every frame was.
func referenceDecode(body []byte) (data []byte, clean bool) {
	tab := crc32.MakeTable(crc32.Castagnoli)
	for len(body) > 0 {
		if len(body) < crcframe.HeaderSize {
			return data, false
		}
		n := binary.BigEndian.Uint32(body[:4])
		if n == 0 || n > crcframe.MaxFrame || int64(len(body)-crcframe.HeaderSize) < int64(n) {
			return data, false
		}
		frame := body[crcframe.HeaderSize : crcframe.HeaderSize+int(n)]
		if crc32.Checksum(frame, tab) != binary.BigEndian.Uint32(body[4:8]) {
			return data, false
		}
		data = append(data, frame...)
		body = body[crcframe.HeaderSize+int(n):]
	}
	return data, true
}

// TestCombine: the CRC-32C of two pieces combined is that of the whole,
// for every split, and WriteSum answers the CRC-32C of what it wrote.
func TestCombine(t *testing.T) {
	data := randBytes(200000, 5)
	for _, split := range []int{0, 1, 7, 4096, 65536, 100001, 199999, 200000} {
		a, b := data[:split], data[split:]
		if got, want := crcframe.Combine(crcframe.Checksum(a), crcframe.Checksum(b), int64(len(b))), crcframe.Checksum(data); got != want {
			t.Fatalf("split at %d: combined %08x, whole %08x", split, got, want)
		}
	}
	w := crcframe.NewWriter(io.Discard, 3000)
	for _, n := range []int{1, 2999, 3000, 3001, 100000} {
		if sum, err := w.WriteSum(data[:n]); err != nil || sum != crcframe.Checksum(data[:n]) {
			t.Fatalf("WriteSum of %d bytes: %08x (%v), their CRC-32C %08x", n, sum, err, crcframe.Checksum(data[:n]))
		}
	}
}

// TestClaimCostsNoMemory: a frame header claims its length before any of
// the data arrives; the Reader's buffer grows with the data that does
// arrive, so a client that sends large headers and little or nothing
// after them holds no more of the receiver's memory than it sent.
func TestClaimCostsNoMemory(t *testing.T) {
	for _, tc := range []struct {
		name     string
		claim    uint32
		sent     int
		maxAlloc uint64
	}{
		{"MaxFrame claimed, 100 bytes sent", crcframe.MaxFrame, 100, 256 << 10},
		{"1 MiB claimed, 1000 bytes sent", 1 << 20, 1000, 256 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := make([]byte, crcframe.HeaderSize+tc.sent)
			binary.BigEndian.PutUint32(body, tc.claim)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := crcframe.NewReader(bytes.NewReader(body)).WriteTo(io.Discard)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, crcframe.ErrMalformed) {
				t.Fatalf("err %v, want ErrMalformed", err)
			}
			if got := after.TotalAlloc - before.TotalAlloc; got > tc.maxAlloc {
				t.Fatalf("a claim of %d bytes with %d sent allocated %d bytes, want at most %d", tc.claim, tc.sent, got, tc.maxAlloc)
			}
		})
	}
}

// signalReader closes reached once a Read has gone past at bytes.
type signalReader struct {
	r       io.Reader
	pos, at int64
	reached chan struct{}
	once    sync.Once
}

func (s *signalReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if s.pos += int64(n); s.pos > s.at {
		s.once.Do(func() { close(s.reached) })
	}
	return n, err
}

// holdingWriter holds its first Write until reached is closed (or a
// timeout), and checks that the bytes it was given did not change
// meanwhile.
type holdingWriter struct {
	t       *testing.T
	reached chan struct{}
	out     bytes.Buffer
	writes  int
}

func (h *holdingWriter) Write(p []byte) (int, error) {
	h.writes++
	if h.writes == 1 {
		before := bytes.Clone(p)
		select {
		case <-h.reached:
		case <-time.After(10 * time.Second):
			h.t.Error("the next frame was not read while the first was being written")
		}
		if !bytes.Equal(before, p) {
			h.t.Error("the frame changed while its Write ran")
		}
	}
	return h.out.Write(p)
}

// TestWriteToReadsAhead: WriteTo reads the next frame while w takes the
// current one, never into the buffer w holds, and w gets every byte in
// order.
func TestWriteToReadsAhead(t *testing.T) {
	data := randBytes(4<<20, 5)
	// Past the first frame's data and into the second's.
	src := &signalReader{r: bytes.NewReader(encode(t, data, 1<<20, 1<<20)), at: 2*crcframe.HeaderSize + 1<<20, reached: make(chan struct{})}
	w := &holdingWriter{t: t, reached: src.reached}
	n, err := crcframe.NewReader(src).WriteTo(w)
	if err != nil || n != int64(len(data)) || !bytes.Equal(w.out.Bytes(), data) {
		t.Fatalf("WriteTo = %d, %v; %d bytes out, equal %v", n, err, w.out.Len(), bytes.Equal(w.out.Bytes(), data))
	}
	if w.writes != 4 {
		t.Fatalf("%d writes, want one per frame (4)", w.writes)
	}
}

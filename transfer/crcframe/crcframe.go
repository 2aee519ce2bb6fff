// Package crcframe is the body encoding of a checked upload (the
// registry's "crc32c-frames" extension, docs/replication.md): the bytes
// cut into frames, each carrying its length and its CRC-32C (Castagnoli),
// so that the receiver checks every frame before it accepts any of its
// bytes. It is what lets our client leave the SHA-256 of an upload to the
// store: the store hashes what it accepted, and the frames are the
// end-to-end check that what it accepted is what the client sent.
//
// A frame is an 8-byte header, the data's length (1..MaxFrame) and its
// CRC-32C, both big-endian uint32, followed by the data. A body is zero or
// more frames; it ends at a frame boundary.
package crcframe

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sync"
)

// Encoding is the Content-Encoding token of a framed body.
const Encoding = "crc32c-frames"

const (
	// HeaderSize is a frame header's length.
	HeaderSize = 8
	// MaxFrame bounds one frame's data: what a Reader holds in memory
	// (twice, with the frame read ahead).
	MaxFrame = 4 << 20
)

// ErrChecksum: a frame's data does not match its CRC-32C; the bytes were
// corrupted between the sender and us.
var ErrChecksum = errors.New("crc32c mismatch: bytes corrupted in transit")

// ErrMalformed: a frame header is invalid (a length of 0 or over
// MaxFrame), or the body ends inside a frame.
var ErrMalformed = errors.New("malformed crc32c frame")

// ChecksumError is a frame that failed its check.
type ChecksumError struct {
	Offset int64  // the frame's first data byte in the decoded body
	Length int    // its data length
	Sent   uint32 // the CRC-32C its header carried
	Got    uint32 // the CRC-32C of the data that arrived
}

func (e *ChecksumError) Error() string {
	return fmt.Sprintf("frame of %d bytes at body offset %d: crc32c sent %08x, received bytes have %08x: %v",
		e.Length, e.Offset, e.Sent, e.Got, ErrChecksum)
}

func (e *ChecksumError) Unwrap() error { return ErrChecksum }

// Checksum is the CRC-32C of p.
func Checksum(p []byte) uint32 { return Update(0, p) }

// Update is crc extended by p.
func Update(crc uint32, p []byte) uint32 {
	return crc32.Update(crc, crc32.MakeTable(crc32.Castagnoli), p)
}

// Header is the frame header of data p (1..MaxFrame bytes).
func Header(p []byte) [HeaderSize]byte {
	var h [HeaderSize]byte
	binary.BigEndian.PutUint32(h[:4], uint32(len(p)))
	binary.BigEndian.PutUint32(h[4:], Checksum(p))
	return h
}

// Reader decodes a framed body: Read and WriteTo hand out a frame's bytes
// only after the whole frame arrived and matched its CRC-32C. It ends with
// io.EOF at a frame boundary; a body that ends inside a frame is
// ErrMalformed (wrapping io.ErrUnexpectedEOF), a failed check a
// *ChecksumError. Errors are sticky.
type Reader struct {
	r   io.Reader
	buf []byte // the current frame's verified data ...
	pos int    // ... of which buf[pos:] is not yet handed out
	off int64  // decoded bytes of the frames read so far
	err error
}

// NewReader decodes r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) {
	if r.pos == len(r.buf) {
		if r.err != nil {
			return 0, r.err
		}
		var err error
		if r.buf, err = r.next(r.buf); err != nil {
			r.buf, r.err = r.buf[:0], err
			return 0, err
		}
		r.pos = 0
	}
	n := copy(p, r.buf[r.pos:])
	r.pos += n
	return n, nil
}

// next reads and checks the next frame into buf (grown as needed).
func (r *Reader) next(buf []byte) ([]byte, error) {
	var h [HeaderSize]byte
	switch k, err := io.ReadFull(r.r, h[:]); {
	case err == nil:
	case err == io.EOF:
		return buf[:0], io.EOF
	case err == io.ErrUnexpectedEOF && k > 0:
		return buf[:0], fmt.Errorf("%w: the body ends inside a frame header at offset %d: %w", ErrMalformed, r.off, io.ErrUnexpectedEOF)
	default:
		return buf[:0], err // the body's own error (a cut connection)
	}
	n := binary.BigEndian.Uint32(h[:4])
	if n == 0 || n > MaxFrame {
		return buf[:0], fmt.Errorf("%w: frame length %d at offset %d (1..%d)", ErrMalformed, n, r.off, MaxFrame)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n, max(int(n), 1<<20))
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r.r, buf); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			err = fmt.Errorf("%w: the body ends inside the frame at offset %d: %w", ErrMalformed, r.off, io.ErrUnexpectedEOF)
		}
		return buf[:0], err
	}
	if got, sent := Checksum(buf), binary.BigEndian.Uint32(h[4:]); got != sent {
		return buf[:0], &ChecksumError{Offset: r.off, Length: int(n), Sent: sent, Got: got}
	}
	r.off += int64(n)
	return buf, nil
}

// WriteTo writes the verified frames to w, each with one Write, while the
// next frame is read and checked (two frame buffers): the receive of the
// body overlaps what w does with the bytes. It returns the bytes w took
// and the first error, w's or the body's; it reads at most one frame past
// a failed Write (at most two).
func (r *Reader) WriteTo(w io.Writer) (int64, error) {
	var n int64
	if r.pos < len(r.buf) { // left over from Read
		k, err := w.Write(r.buf[r.pos:])
		r.pos += k
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	if r.err != nil {
		if r.err == io.EOF {
			return n, nil
		}
		return n, r.err
	}
	type frame struct {
		b   []byte
		err error
	}
	full := make(chan frame, 1)
	free := make(chan []byte, 2)
	free <- r.buf[:0]
	free <- nil
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(full)
		for {
			var b []byte
			select {
			case <-stop:
				return
			default:
			}
			select {
			case b = <-free:
			case <-stop:
				return
			}
			b, err := r.next(b)
			full <- frame{b, err}
			if err != nil {
				return
			}
		}
	}()
	var werr error
	for f := range full {
		if f.err != nil {
			r.err = f.err
			break
		}
		k, err := w.Write(f.b)
		n += int64(k)
		if err != nil {
			werr = err
			break
		}
		free <- f.b
	}
	close(stop)
	for f := range full { // the frame read ahead past a failed Write
		if f.err != nil && r.err == nil {
			r.err = f.err
		}
	}
	wg.Wait()
	r.buf, r.pos = r.buf[:0], 0
	if werr != nil {
		if r.err == nil {
			r.err = werr
		}
		return n, werr
	}
	if r.err == io.EOF {
		return n, nil
	}
	return n, r.err
}

// Writer encodes a framed body: each Write goes out as frames of at most
// its frame size, each a header Write and a data Write straight from the
// caller's slice (no copy).
type Writer struct {
	w    io.Writer
	size int
}

// NewWriter frames into w with frames of at most size bytes (clamped to
// 1..MaxFrame).
func NewWriter(w io.Writer, size int) *Writer {
	return &Writer{w: w, size: min(max(size, 1), MaxFrame)}
}

// Write implements io.Writer.
func (f *Writer) Write(p []byte) (int, error) {
	var n int
	for len(p) > 0 {
		q := p[:min(len(p), f.size)]
		h := Header(q)
		if _, err := f.w.Write(h[:]); err != nil {
			return n, err
		}
		k, err := f.w.Write(q)
		n += k
		if err != nil {
			return n, err
		}
		p = p[len(q):]
	}
	return n, nil
}

// Offset is the number of decoded bytes in the frames read and checked so
// far (handed out or not).
func (r *Reader) Offset() int64 { return r.off }

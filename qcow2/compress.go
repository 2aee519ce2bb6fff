package qcow2

import (
	"bytes"
	"compress/flate"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
)

// decompressor holds one decoder of each kind, and the buffer for the
// compressed bytes, reused by one read at a time (Image.inflate) for cluster
// after cluster: a compressed image is read cluster by cluster and each
// fresh decoder would cost more than the cluster it decodes.
type decompressor struct {
	flate io.ReadCloser // implements flate.Resetter
	zstd  *zstd.Decoder
	src   []byte
}

// cluster inflates one compressed cluster into dst (exactly one
// cluster long). QEMU stores raw deflate (no zlib header) or a zstd stream.
// The output is bounded by dst: a stream that would produce more than one
// cluster is a bomb and fails, as does one that produces less.
func (dc *decompressor) cluster(dst, src []byte, ctype uint8) error {
	br := bytes.NewReader(src)
	var r io.Reader
	switch ctype {
	case compressionZlib:
		if dc.flate == nil {
			dc.flate = flate.NewReader(br)
		} else if err := dc.flate.(flate.Resetter).Reset(br, nil); err != nil {
			return err
		}
		r = dc.flate
	case compressionZstd:
		// Compressed runs are packed back to back, so the bytes after this
		// cluster's frame are the next cluster's frame: only the first
		// frame's declared size can reveal a bomb.
		var fh zstd.Header
		if err := fh.Decode(src); err != nil {
			return fmt.Errorf("zstd frame header: %w", err)
		}
		if fh.HasFCS && fh.FrameContentSize > uint64(len(dst)) {
			return fmt.Errorf("zstd frame declares %d bytes, more than one cluster (%d bytes)", fh.FrameContentSize, len(dst))
		}
		if dc.zstd == nil {
			var err error
			// Concurrency 1 decodes synchronously (no goroutines to leak); the
			// window cap keeps a hostile frame from reserving large buffers.
			dc.zstd, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1),
				zstd.WithDecoderMaxWindow(8<<20), zstd.WithDecoderMaxMemory(64<<20),
				zstd.WithDecoderLowmem(true))
			if err != nil {
				return err
			}
		}
		if err := dc.zstd.Reset(br); err != nil {
			return err
		}
		defer func() { _ = dc.zstd.Reset(nil) }()
		r = dc.zstd
	default:
		return unsupported("compression type %d", ctype)
	}
	n, err := io.ReadFull(r, dst)
	if err != nil {
		return fmt.Errorf("%d of %d bytes: %w", n, len(dst), err)
	}
	if ctype != compressionZlib {
		return nil
	}
	// A deflate stream ends with its final block; more output is a bomb.
	var one [1]byte
	if m, _ := r.Read(one[:]); m > 0 {
		return fmt.Errorf("stream inflates to more than one cluster (%d bytes)", len(dst))
	}
	return nil
}

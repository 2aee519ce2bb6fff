package registry

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"imagestore/transfer/crcframe"
)

// countingWriter counts the Writes the ingest would see (and, like the
// ingest, has no ReadFrom).
type countingWriter struct {
	buf    bytes.Buffer
	writes int
	fail   int // > 0: the write that takes the total past fail bytes fails
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.writes++
	if c.fail > 0 && c.buf.Len()+len(p) > c.fail {
		return 0, errors.New("quota exceeded")
	}
	return c.buf.Write(p)
}

// TestCopyBodyGathersFrames: a framed body of tiny frames reaches the
// ingest in few large writes (each ingest write is a syscall and a hash
// call, so one per frame let a client spend a core of the store for
// ~2 MB/s of wire), large frames still go through one write each
// (uncopied), a frame that fails its check still leaves every frame
// before it written, and the ingest's own failure is the error.
func TestCopyBodyGathersFrames(t *testing.T) {
	data := make([]byte, 3<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	encode := func(b []byte, size int) []byte {
		var out bytes.Buffer
		if _, err := crcframe.NewWriter(&out, size).Write(b); err != nil {
			t.Fatal(err)
		}
		return out.Bytes()
	}
	for _, tc := range []struct {
		name      string
		data      []byte
		frame     int
		limit     int64 // >= 0: a Content-Range bounds the body (strictBody)
		corruptAt int   // > 0: flip a byte of the encoded body here
		maxWrites int
		fail      int // > 0: the ingest fails past this many bytes
		wantErr   error
		wantBytes int
	}{
		{"one-byte frames", data[:64<<10], 1, -1, 0, 1, 0, nil, 64 << 10},
		{"one-byte frames, Content-Range", data[:64<<10], 1, 64 << 10, 0, 1, 0, nil, 64 << 10},
		{"16-byte frames", data, 16, -1, 0, 3, 0, nil, len(data)},
		{"1 MiB frames", data, 1 << 20, -1, 0, 3, 0, nil, len(data)},
		{"64 KiB frames", data, 64 << 10, -1, 0, 48, 0, nil, len(data)},
		{"bad frame after small ones", data[:64<<10], 64, -1, 100*(8+64) + 8 + 3, 1, 0, crcframe.ErrChecksum, 100 * 64},
		{"ingest fails", data, 16, -1, 0, 2, 1 << 20, errQuota, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := encode(tc.data, tc.frame)
			if tc.corruptAt > 0 {
				body[tc.corruptAt] ^= 1
			}
			fr := crcframe.NewReader(bytes.NewReader(body))
			var src io.Reader = framedBody{fr}
			if tc.limit >= 0 {
				src = &strictBody{r: io.LimitReader(fr, tc.limit+1), left: tc.limit}
			}
			dst := countingWriter{fail: tc.fail}
			err := copyBody(&dst, src, true)
			if tc.wantErr == errQuota && (err == nil || err.Error() != "quota exceeded") || tc.wantErr != errQuota && !errors.Is(err, tc.wantErr) {
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if !bytes.Equal(dst.buf.Bytes(), tc.data[:tc.wantBytes]) {
				t.Fatalf("the ingest got %d bytes, want the first %d", dst.buf.Len(), tc.wantBytes)
			}
			if dst.writes > tc.maxWrites {
				t.Fatalf("%d bytes in %d ingest writes, want at most %d", dst.buf.Len(), dst.writes, tc.maxWrites)
			}
			if tc.frame >= gatherDirect && dst.writes != (len(tc.data)+tc.frame-1)/tc.frame {
				t.Fatalf("%d frames of %d bytes in %d ingest writes, want one each", (len(tc.data)+tc.frame-1)/tc.frame, tc.frame, dst.writes)
			}
		})
	}
}

// errQuota marks the row whose ingest fails.
var errQuota = errors.New("the ingest's failure")

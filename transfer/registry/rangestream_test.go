package registry_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/blobstore/blobstoretest"
	"imagestore/transfer/registry"
)

// rangeBackend gives its blobs a RangeReader (as S3's have) over the
// wrapped backend's ReadAt, and records the size of every Read of a range
// body; with writerTo its bodies are also io.WriterTo (as S3's readahead
// ones are), and record the size of each Write they make.
type rangeBackend struct {
	blobstore.Backend
	mu       sync.Mutex
	writerTo bool
	reads    []int
	writes   []int
}

func (b *rangeBackend) OpenBlob(ctx context.Context, d digest.Digest) (blobstore.Blob, error) {
	bl, err := b.Backend.OpenBlob(ctx, d)
	if err != nil {
		return nil, err
	}
	return rangeBlob{Blob: bl, b: b}, nil
}

type rangeBlob struct {
	blobstore.Blob
	b *rangeBackend
}

func (r rangeBlob) ReadRange(_ context.Context, off, n int64) (io.ReadCloser, error) {
	n = min(n, r.Size()-off)
	body := readSizes{io.NewSectionReader(r.Blob, off, n), r.b}
	r.b.mu.Lock()
	defer r.b.mu.Unlock()
	if r.b.writerTo {
		return writerToBody{body}, nil
	}
	return io.NopCloser(body), nil
}

// writerToBody writes its range to w in writes of up to 4 MiB from its
// own buffer.
type writerToBody struct{ readSizes }

func (b writerToBody) WriteTo(w io.Writer) (int64, error) {
	buf := make([]byte, 4<<20)
	var done int64
	for {
		n, err := b.r.Read(buf)
		if n > 0 {
			b.b.mu.Lock()
			b.b.writes = append(b.b.writes, n)
			b.b.mu.Unlock()
			k, werr := w.Write(buf[:n])
			done += int64(k)
			if werr != nil {
				return done, werr
			}
		}
		if err == io.EOF {
			return done, nil
		}
		if err != nil {
			return done, err
		}
	}
}

func (writerToBody) Close() error { return nil }

type readSizes struct {
	r io.Reader
	b *rangeBackend
}

func (s readSizes) Read(p []byte) (int, error) {
	s.b.mu.Lock()
	s.b.reads = append(s.b.reads, len(p))
	s.b.mu.Unlock()
	return s.r.Read(p)
}

// TestStreamedRanges: on a backend whose blobs stream ranges, a range GET
// of 256 KiB or more is served from ReadRange with the right bytes and
// headers, and the registry reads a client's 1 MiB range in one piece (a
// buffer of 1 MiB, not io.Copy's 32 KiB), so it goes out in one write; a
// body that writes itself (io.WriterTo) is opened for exactly the range
// and writes it all, never read through the registry's buffer.
func TestStreamedRanges(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	local, err := blobstore.NewLocal(blobstore.LocalOptions{Root: dir})
	if err != nil {
		t.Fatal(err)
	}
	be := &rangeBackend{Backend: blobstoretest.NoPaths(local)}
	st, err := blobstore.Open(ctx, blobstore.Options{Root: dir, Backend: be})
	if err != nil {
		t.Fatal(err)
	}
	data := randBytes(t, 5<<20+123)
	d, _, err := st.Put(ctx, bytes.NewReader(data), int64(len(data)), "")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := registry.New(registry.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()
	for _, tc := range []struct {
		name       string
		start, end int64 // [start, end)
		streamed   bool
		maxRead    int  // the largest Read of the range body (not a WriterTo's)
		writerTo   bool // the body is an io.WriterTo
	}{
		{"1 MiB", 1 << 20, 2 << 20, true, 1 << 20, false},
		{"1 MiB unaligned", 3<<20 + 77, 4<<20 + 77, true, 1 << 20, false},
		{"to the end", 4 << 20, int64(len(data)), true, 1 << 20, false},
		{"small: ReadAt", 100, 100 + 4096, false, 0, false},
		{"WriterTo: 1 MiB", 1 << 20, 2 << 20, true, 0, true},
		{"WriterTo: 3 MiB unaligned", 77, 3<<20 + 77, true, 0, true},
		{"WriterTo: to the end", 1<<20 + 5, int64(len(data)), true, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			be.mu.Lock()
			be.reads, be.writes, be.writerTo = nil, nil, tc.writerTo
			be.mu.Unlock()
			req, _ := http.NewRequest(http.MethodGet, hs.URL+"/v2/vol/blobs/"+d.String(), nil)
			req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", tc.start, tc.end-1))
			resp, err := hs.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusPartialContent {
				t.Fatalf("status %d, %v", resp.StatusCode, err)
			}
			if want := fmt.Sprintf("bytes %d-%d/%d", tc.start, tc.end-1, len(data)); resp.Header.Get("Content-Range") != want {
				t.Fatalf("Content-Range %q, want %q", resp.Header.Get("Content-Range"), want)
			}
			if !bytes.Equal(got, data[tc.start:tc.end]) {
				t.Fatalf("range %d-%d: wrong bytes (%d of them)", tc.start, tc.end, len(got))
			}
			be.mu.Lock()
			reads, writes := be.reads, be.writes
			be.mu.Unlock()
			if tc.writerTo {
				// The body wrote the whole range itself (from its 4 MiB
				// buffer); the registry never read it.
				sum := 0
				for _, n := range writes {
					sum += n
				}
				if len(writes) == 0 || int64(sum) != tc.end-tc.start || len(reads) != 0 {
					t.Fatalf("range %d-%d: body writes %v, reads %v; want it written whole by its WriteTo, never read", tc.start, tc.end, writes, reads)
				}
				return
			}
			largest := 0
			for _, n := range reads {
				largest = max(largest, n)
			}
			if tc.streamed != (len(reads) > 0) || largest != tc.maxRead {
				t.Fatalf("range body reads %v: streamed %v, largest %d; want streamed %v, largest %d", reads, len(reads) > 0, largest, tc.streamed, tc.maxRead)
			}
		})
	}
}

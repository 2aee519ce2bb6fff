package blobstoretest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/blobstore"

	"github.com/opencontainers/go-digest"
)

func testCommit(t *testing.T, e *env) {
	data := content(1, 100_000)
	good := digestOf(data)
	cases := []struct {
		name     string
		size     int64
		expected digest.Digest
		wantErr  error
		removed  bool // ingest gone after the failure
	}{
		{"exact", int64(len(data)), good, nil, true},
		{"unknown size", -1, good, nil, true},
		{"no expected digest", int64(len(data)), "", nil, true},
		{"digest mismatch", int64(len(data)), digestOf([]byte("other")), blobstore.ErrDigestMismatch, true},
		{"size too small", int64(len(data)) - 1, good, blobstore.ErrSizeMismatch, true},
		{"size too large", int64(len(data)) + 1, good, blobstore.ErrSizeMismatch, true},
		{"malformed digest", int64(len(data)), "sha256:../../etc/passwd", blobstore.ErrInvalidName, false},
		{"unsupported algorithm", int64(len(data)), digest.Digest("sha512:" + strings.Repeat("a", 128)), blobstore.ErrInvalidName, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := e.sub(t).open(t)
			ctx := context.Background()
			w, err := s.Writer(ctx, "ref1")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(data); err != nil {
				t.Fatal(err)
			}
			d, err := w.Commit(ctx, tc.size, tc.expected)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Commit err = %v, want %v", err, tc.wantErr)
			}
			_, offErr := s.IngestOffset("ref1")
			if gone := errors.Is(offErr, blobstore.ErrNotFound); gone != tc.removed {
				t.Fatalf("ingest removed = %v, want %v (%v)", gone, tc.removed, offErr)
			}
			if tc.wantErr != nil {
				if n := countBlobs(t, s); n != 0 {
					t.Fatalf("%d blobs after failed commit", n)
				}
				if !tc.removed {
					w.Cancel()
				}
				if c, _ := s.Capacity(); c.Used != 0 {
					t.Fatalf("Used = %d after failed commit, want 0", c.Used)
				}
				return
			}
			if d != good {
				t.Fatalf("digest %s, want %s", d, good)
			}
			if !bytes.Equal(readBlob(t, s, d), data) {
				t.Fatal("blob content differs")
			}
			if c, _ := s.Capacity(); c.Used != int64(len(data)) || c.Blobs != 1 {
				t.Fatalf("capacity %+v", c)
			}
			if !w.Creation().Created() || w.Creation().Digest != d {
				t.Fatalf("Creation %+v after a commit of new bytes", w.Creation())
			}
		})
	}
}

func testDuplicateConcurrentIngest(t *testing.T, e *env) {
	s := e.open(t)
	data := content(2, 3<<20)
	want := digestOf(data)
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	ds := make([]digest.Digest, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ds[i], _, errs[i] = s.Put(context.Background(), bytesReader(data), int64(len(data)), want)
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil || ds[i] != want {
			t.Fatalf("put %d: %s, %v", i, ds[i], errs[i])
		}
	}
	if c := countBlobs(t, s); c != 1 {
		t.Fatalf("%d blobs, want 1", c)
	}
	c, _ := s.Capacity()
	if c.Used != int64(len(data)) || c.Blobs != 1 {
		t.Fatalf("capacity %+v, want used %d", c, len(data))
	}
	// A restart counts the same: no ingest bytes were left behind.
	c2, _ := e.open(t).Capacity()
	if c2.Used != int64(len(data)) || c2.Blobs != 1 {
		t.Fatalf("capacity after reopen %+v, want used %d", c2, len(data))
	}
}

// testResume cuts an ingest at many offsets with Close, optionally
// restarts the store, and checks that the next Writer resumes exactly at
// the durable offset IngestOffset reports (never past what was written)
// and that the committed digest is right.
func testResume(t *testing.T, e *env) {
	data := content(3, 3<<20+12345)
	want := digestOf(data)
	for _, at := range []int{0, 1, 4095, 1 << 20, 1<<20 + 17, 2<<20 + 4096, len(data) - 1, len(data)} {
		for _, reopen := range []bool{false, true} {
			t.Run(fmt.Sprintf("at=%d/reopen=%v", at, reopen), func(t *testing.T) {
				e := e.sub(t)
				s := e.open(t)
				ctx := context.Background()
				w, err := s.Writer(ctx, "vol-1")
				if err != nil {
					t.Fatal(err)
				}
				// Odd-sized writes so checkpoints fall mid-write.
				for off := 0; off < at; {
					n := min(100_003, at-off)
					if _, err := w.Write(data[off : off+n]); err != nil {
						t.Fatal(err)
					}
					off += n
				}
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
				if reopen {
					s = e.open(t)
				}
				off, err := s.IngestOffset("vol-1")
				if err != nil || off < 0 || off > int64(at) {
					t.Fatalf("IngestOffset = %d, %v; want in [0, %d]", off, err, at)
				}
				w, err = s.Writer(ctx, "vol-1")
				if err != nil {
					t.Fatal(err)
				}
				if w.Offset() != off {
					t.Fatalf("resumed at %d, IngestOffset said %d", w.Offset(), off)
				}
				if c, _ := s.Capacity(); c.Used != off {
					t.Fatalf("Used = %d with a resumed ingest at %d", c.Used, off)
				}
				if _, err := w.Write(data[w.Offset():]); err != nil {
					t.Fatal(err)
				}
				d, err := w.Commit(ctx, int64(len(data)), want)
				if err != nil {
					t.Fatalf("Commit after resume: %v", err)
				}
				if d != want || !bytes.Equal(readBlob(t, s, d), data) {
					t.Fatalf("digest %s, or content differs", d)
				}
				if c, _ := s.Capacity(); c.Used != int64(len(data)) {
					t.Fatalf("Used = %d, want %d", c.Used, len(data))
				}
			})
		}
	}
}

// testEmptyIngest: an ingest opened and closed with nothing written is
// there to resume, at 0 (the registry opens one per upload session before
// the first byte arrives, and checks it with IngestOffset), and a later
// Writer fills and commits it.
func testEmptyIngest(t *testing.T, e *env) {
	s := e.open(t)
	ctx := context.Background()
	w, err := s.Writer(ctx, "empty")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if off, err := s.IngestOffset("empty"); off != 0 || err != nil {
		t.Fatalf("IngestOffset of an empty ingest = %d, %v; want 0, nil", off, err)
	}
	w, err = s.Writer(ctx, "empty")
	if err != nil {
		t.Fatal(err)
	}
	if w.Offset() != 0 {
		t.Fatalf("resumed an empty ingest at %d", w.Offset())
	}
	data := content(9, 5000)
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	d, err := w.Commit(ctx, int64(len(data)), digestOf(data))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readBlob(t, s, d), data) {
		t.Fatal("blob content differs")
	}
}

func testCancel(t *testing.T, e *env) {
	s := e.open(t)
	ctx := context.Background()
	w, err := s.Writer(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(content(5, 1000)); err != nil {
		t.Fatal(err)
	}
	if err := w.Cancel(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.IngestOffset("c"); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("IngestOffset after cancel: %v", err)
	}
	if _, err := w.Write([]byte("x")); err == nil {
		t.Fatal("write after cancel succeeded")
	}
	if c, _ := s.Capacity(); c.Used != 0 {
		t.Fatalf("Used = %d", c.Used)
	}
	if c, _ := e.open(t).Capacity(); c.Used != 0 {
		t.Fatalf("Used = %d after a restart", c.Used)
	}
}

type failingReader struct{}

func (failingReader) Read([]byte) (int, error) { return 0, errors.New("must not be read") }

func testQuota(t *testing.T, e *env) {
	ctx := context.Background()
	s := e.open(t, func(o *blobstore.Options) { o.Quota = 1 << 30 })
	if err := s.SetQuota(10_000); err != nil {
		t.Fatal(err)
	}
	mustPut(t, s, content(6, 6000))
	cases := []struct {
		name string
		run  func() error
	}{
		{"write past quota", func() error {
			w, err := s.Writer(ctx, "q")
			if err != nil {
				return err
			}
			defer w.Cancel()
			if _, err := w.Write(content(7, 3000)); err != nil {
				return fmt.Errorf("first write should fit: %w", err)
			}
			n, err := w.Write(content(8, 2000))
			if n != 0 || w.Offset() != 3000 {
				return fmt.Errorf("wrote %d (offset %d) despite quota", n, w.Offset())
			}
			return err
		}},
		{"put of known size fails before reading", func() error {
			_, _, err := s.Put(ctx, failingReader{}, 5000, "")
			return err
		}},
		{"put of unknown size", func() error {
			_, _, err := s.Put(ctx, bytesReader(content(9, 5000)), -1, "")
			return err
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.run(); !errors.Is(err, blobstore.ErrQuotaExceeded) {
				t.Fatalf("err = %v, want ErrQuotaExceeded", err)
			}
			if c, _ := s.Capacity(); c.Used != 6000 {
				t.Fatalf("Used = %d, want 6000", c.Used)
			}
		})
	}
	// Persisted, and overrides Options.Quota.
	s2 := e.open(t, func(o *blobstore.Options) { o.Quota = 1 << 30 })
	if c, _ := s2.Capacity(); c.Quota != 10_000 || c.Used != 6000 {
		t.Fatalf("after reopen: %+v", c)
	}
	if err := s2.SetQuota(-1); err == nil {
		t.Fatal("negative quota accepted")
	}
	if err := s2.SetQuota(20_000); err != nil {
		t.Fatal(err)
	}
	if c, _ := e.open(t).Capacity(); c.Quota != 20_000 {
		t.Fatalf("second SetQuota not persisted: %+v", c)
	}
}

// testExpiredIngests: with an expiry shorter than any pause, GC and Open
// remove every closed ingest but never one a Writer of the store holds;
// with the default expiry a closed ingest survives both.
func testExpiredIngests(t *testing.T, e *env) {
	ctx := context.Background()
	long := e.open(t)
	w, err := long.Writer(ctx, "kept")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(content(10, 100))
	w.Close()
	if _, err := long.GC(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.open(t).IngestOffset("kept"); err != nil {
		t.Fatalf("fresh ingest gone after GC and Open: %v", err)
	}
	long.Close()

	s := e.open(t, func(o *blobstore.Options) { o.IngestExpiry = time.Nanosecond })
	if _, err := s.IngestOffset("kept"); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("expired ingest survived Open: %v", err)
	}
	for _, r := range []string{"old", "busy"} {
		w, err := s.Writer(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(content(11, 100))
		w.Close()
	}
	busy, err := s.Writer(ctx, "busy")
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.GC(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.IngestsRemoved != 1 {
		t.Fatalf("removed %d ingests, want 1", res.IngestsRemoved)
	}
	if _, err := s.IngestOffset("old"); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("expired ingest survived GC: %v", err)
	}
	if c, _ := s.Capacity(); c.Used != busy.Offset() {
		t.Fatalf("Used = %d, want the busy ingest's %d", c.Used, busy.Offset())
	}
	data := content(11, 100)
	if _, err := busy.Write(data[busy.Offset():]); err != nil {
		t.Fatal(err)
	}
	if d, err := busy.Commit(ctx, 100, digestOf(data)); err != nil || !bytes.Equal(readBlob(t, s, d), data) {
		t.Fatalf("the busy ingest does not commit after GC: %v", err)
	}
}

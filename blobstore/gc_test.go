package blobstore

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// age makes a blob or record look written long ago, past CommitGrace.
func age(t *testing.T, s *Store, paths ...string) {
	t.Helper()
	past := time.Now().Add(-time.Hour)
	for _, p := range paths {
		if err := os.Chtimes(p, past, past); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	clear(s.commits)
	s.mu.Unlock()
}

// TestGC checks what GC frees for each keep list over one fixture of
// chains, a held blob and a fresh blob. One function: the table's cases are
// defined by the shared fixture.
func TestGC(t *testing.T) {
	ctx := context.Background()
	type fixture struct {
		s                        *Store
		base, inc, other, orphan digest.Digest
		heldRelease              func()
		held                     digest.Digest
	}
	setup := func(t *testing.T) *fixture {
		s := newStore(t, func(o *Options) { o.CommitGrace = time.Minute })
		f := &fixture{s: s}
		f.base = mustPut(t, s, content(30, 1000))
		f.inc = mustPut(t, s, content(31, 2000))
		f.other = mustPut(t, s, content(32, 4000))
		f.orphan = mustPut(t, s, content(33, 8000))
		f.held = mustPut(t, s, content(34, 16000))
		for _, img := range []Image{
			{Ref: ref("vol:base"), Blob: f.base},
			{Ref: ref("vol:inc"), Blob: f.inc, Parent: "vol:base"},
			{Ref: ref("other:x"), Blob: f.other},
		} {
			if err := s.PutImage(ctx, img); err != nil {
				t.Fatal(err)
			}
		}
		var paths []string
		for _, d := range []digest.Digest{f.base, f.inc, f.other, f.orphan, f.held} {
			p, _ := s.BlobPath(d)
			paths = append(paths, p)
		}
		for _, r := range []string{"vol:base", "vol:inc", "other:x"} {
			paths = append(paths, imageFile(s, ref(r)))
		}
		age(t, s, paths...)
		f.heldRelease = s.Hold(f.held)
		return f
	}
	cases := []struct {
		name       string
		keep       []Ref
		fresh      bool // a new unreferenced blob, inside CommitGrace
		wantFreed  int64
		wantImages int
		survive    func(f *fixture) []digest.Digest
		gone       func(f *fixture) []digest.Digest
	}{
		{name: "keep all records", keep: nil, wantFreed: 8000,
			survive: func(f *fixture) []digest.Digest { return []digest.Digest{f.base, f.inc, f.other, f.held} },
			gone:    func(f *fixture) []digest.Digest { return []digest.Digest{f.orphan} }},
		{name: "keep top keeps its chain", keep: []Ref{ref("vol:inc")}, wantFreed: 12000, wantImages: 1,
			survive: func(f *fixture) []digest.Digest { return []digest.Digest{f.base, f.inc, f.held} },
			gone:    func(f *fixture) []digest.Digest { return []digest.Digest{f.orphan, f.other} }},
		{name: "keep nothing", keep: []Ref{}, wantFreed: 15000, wantImages: 3,
			survive: func(f *fixture) []digest.Digest { return []digest.Digest{f.held} },
			gone:    func(f *fixture) []digest.Digest { return []digest.Digest{f.orphan, f.other, f.base, f.inc} }},
		{name: "unknown keep ref is harmless", keep: []Ref{ref("ghost:1"), ref("other:x")}, wantFreed: 11000, wantImages: 2,
			survive: func(f *fixture) []digest.Digest { return []digest.Digest{f.other, f.held} },
			gone:    func(f *fixture) []digest.Digest { return []digest.Digest{f.base, f.inc} }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := setup(t)
			fresh := mustPut(t, f.s, content(35, 500)) // committed just now
			before, _ := f.s.Capacity()
			res, err := f.s.GC(ctx, tc.keep)
			if err != nil {
				t.Fatal(err)
			}
			if res.BytesFreed != tc.wantFreed || res.ImagesRemoved != tc.wantImages {
				t.Fatalf("GC = %+v, want %d bytes and %d images freed", res, tc.wantFreed, tc.wantImages)
			}
			for _, d := range append(tc.survive(f), fresh) {
				if err := f.s.VerifyBlob(ctx, d); err != nil {
					t.Errorf("blob %s should survive: %v", d, err)
				}
			}
			for _, d := range tc.gone(f) {
				if f.s.Exists(d) {
					t.Errorf("blob %s should be freed", d)
				}
			}
			after, _ := f.s.Capacity()
			if before.Used-after.Used != tc.wantFreed || before.Blobs-after.Blobs != res.BlobsFreed {
				t.Fatalf("accounting: before %+v after %+v", before, after)
			}
			// Once released and aged, the held blob goes too (unless kept).
			f.heldRelease()
			f.heldRelease() // idempotent
			p, _ := f.s.BlobPath(f.held)
			age(t, f.s, p)
			res, _ = f.s.GC(ctx, tc.keep)
			if f.s.Exists(f.held) || res.BytesFreed < 16000 {
				t.Fatalf("released blob not freed: %+v", res)
			}
		})
	}
}

// TestGCRacesIngest runs GC in a loop while ingests stream, resume and
// commit; every committed blob must survive until an image records it.
// One function: the GC loop, the writers and the final audit share one store and one timeline.
func TestGCRacesIngest(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, func(o *Options) { o.CommitGrace = time.Minute })
	localOf(s).checkpointEvery = 64 << 10
	// Old garbage GC is allowed to free meanwhile.
	var garbage []string
	for i := range 20 {
		p, _ := s.BlobPath(mustPut(t, s, content(uint64(100+i), 10_000)))
		garbage = append(garbage, p)
	}
	age(t, s, garbage...)

	stop := make(chan struct{})
	var gcWG sync.WaitGroup
	var gcRuns int
	var gcErr error
	gcWG.Add(1)
	go func() {
		defer gcWG.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := s.GC(ctx, nil); err != nil {
				gcErr = err
				return
			}
			gcRuns++
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 6 {
				data := content(uint64(g*100+i), 300_000+g*1000+i)
				ingestRef := "race-" + string(rune('a'+g))
				w, err := s.Writer(ctx, ingestRef)
				if err != nil {
					errs <- err
					return
				}
				half := len(data) / 2
				w.Write(data[:half])
				w.Close() // cut, then resume
				if w, err = s.Writer(ctx, ingestRef); err != nil {
					errs <- err
					return
				}
				w.Write(data[w.Offset():])
				d, err := w.Commit(ctx, int64(len(data)), digestOf(data))
				if err != nil {
					errs <- err
					return
				}
				img := Image{Ref: Ref{Name: ingestRef, ID: string(rune('0' + i))}, Blob: d}
				if err := s.PutImage(ctx, img); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	gcWG.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if gcErr != nil {
		t.Fatal(gcErr)
	}
	if gcRuns == 0 {
		t.Fatal("GC never ran concurrently")
	}
	// One more pass after the last commit: nothing recorded may go.
	if _, err := s.GC(ctx, nil); err != nil {
		t.Fatal(err)
	}
	imgs, err := s.ListImages(ctx, "")
	if err != nil || len(imgs) != 24 {
		t.Fatalf("%d images, %v", len(imgs), err)
	}
	for _, img := range imgs {
		if err := s.VerifyBlob(ctx, img.Blob); err != nil {
			t.Fatalf("%s: %v", img.Ref, err)
		}
	}
	for _, p := range garbage {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("old garbage %s not freed", filepath.Base(p))
		}
	}
	c, _ := s.Capacity()
	var sum int64
	for _, img := range imgs {
		sum += img.Size
	}
	if c.Used != sum || c.Blobs != 24 {
		t.Fatalf("capacity %+v, want used %d", c, sum)
	}
	t.Logf("%d concurrent GC runs", gcRuns)
}

func TestVerify(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	good := mustPut(t, s, content(40, 50_000))
	bad := mustPut(t, s, content(41, 50_000))
	for _, img := range []Image{
		{Ref: ref("v:base"), Blob: bad},
		{Ref: ref("v:inc"), Blob: good, Parent: "v:base"},
		{Ref: ref("w:solo"), Blob: good},
	} {
		if err := s.PutImage(ctx, img); err != nil {
			t.Fatal(err)
		}
	}
	flip := func(d digest.Digest, off int64) {
		p, _ := s.BlobPath(d)
		os.Chmod(p, 0o644)
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		b := []byte{0}
		f.ReadAt(b, off)
		b[0] ^= 0x01
		f.WriteAt(b, off)
		f.Close()
	}
	flip(bad, 12345)
	if err := s.VerifyBlob(ctx, good); err != nil {
		t.Fatalf("good blob: %v", err)
	}
	rep, err := s.Verify(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Checked != 2 || rep.Bytes != 100_000 || len(rep.Corrupt) != 1 {
		t.Fatalf("report %+v", rep)
	}
	cb := rep.Corrupt[0]
	if cb.Digest != bad || !errors.Is(cb.Err, ErrCorrupt) {
		t.Fatalf("corrupt %+v", cb)
	}
	if len(cb.Images) != 2 || cb.Images[0] != ref("v:base") || cb.Images[1] != ref("v:inc") {
		t.Fatalf("broken images %v, want v:base and v:inc", cb.Images)
	}
	if !strings.Contains(cb.Err.Error(), "v:inc") {
		t.Fatalf("error does not name images: %v", cb.Err)
	}
	if _, err := os.Stat(cb.QuarantinePath); err != nil || filepath.Dir(cb.QuarantinePath) != filepath.Join(s.Root(), dirQuarantine) {
		t.Fatalf("quarantine %q: %v", cb.QuarantinePath, err)
	}
	if s.Exists(bad) {
		t.Fatal("corrupt blob still served")
	}
	if c, _ := s.Capacity(); c.Used != 50_000 || c.Blobs != 1 {
		t.Fatalf("capacity %+v", c)
	}
	// VerifyBlob directly, and a sample run.
	flip(good, 0)
	if err := s.VerifyBlob(ctx, good); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("VerifyBlob flipped: %v", err)
	}
	if err := s.VerifyBlob(ctx, good); !errors.Is(err, ErrNotFound) {
		t.Fatalf("VerifyBlob after quarantine: %v", err)
	}
	mustPut(t, s, content(42, 10))
	mustPut(t, s, content(43, 10))
	if rep, err := s.Verify(ctx, 0.5); err != nil || rep.Checked != 1 || len(rep.Corrupt) != 0 {
		t.Fatalf("sample: %+v %v", rep, err)
	}
	if _, err := s.Verify(ctx, 1.5); err == nil {
		t.Fatal("sample 1.5 accepted")
	}
}

func TestCapacity(t *testing.T) {
	s := newStore(t)
	mustPut(t, s, content(50, 12345))
	d := mustPut(t, s, content(51, 100))
	s.PutImage(context.Background(), Image{Ref: ref("a:b"), Blob: d})
	c, err := s.Capacity()
	if err != nil {
		t.Fatal(err)
	}
	if c.Total <= 0 || c.Free <= 0 || c.Free > c.Total || c.Used != 12445 || c.Blobs != 2 || c.Images != 1 || c.Quota != 0 {
		t.Fatalf("capacity %+v", c)
	}
}

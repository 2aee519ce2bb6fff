package blobstoretest

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/blobstore"

	"github.com/opencontainers/go-digest"
)

// testGC checks what GC frees for each keep list over one fixture of
// chains and a held blob, all older than CommitGrace (1 ns).
func testGC(t *testing.T, e *env) {
	ctx := context.Background()
	type fixture struct {
		s                        *blobstore.Store
		base, inc, other, orphan digest.Digest
		heldRelease              func()
		held                     digest.Digest
	}
	setup := func(t *testing.T) *fixture {
		s := e.sub(t).open(t, func(o *blobstore.Options) { o.CommitGrace = time.Nanosecond })
		f := &fixture{s: s}
		f.base = mustPut(t, s, content(30, 1000))
		f.inc = mustPut(t, s, content(31, 2000))
		f.other = mustPut(t, s, content(32, 4000))
		f.orphan = mustPut(t, s, content(33, 8000))
		f.held = mustPut(t, s, content(34, 16000))
		for _, img := range []blobstore.Image{
			{Ref: ref("vol:base"), Blob: f.base},
			{Ref: ref("vol:inc"), Blob: f.inc, Parent: "vol:base"},
			{Ref: ref("other:x"), Blob: f.other},
		} {
			if err := s.PutImage(ctx, img); err != nil {
				t.Fatal(err)
			}
		}
		f.heldRelease = s.Hold(f.held)
		return f
	}
	cases := []struct {
		name       string
		keep       []blobstore.Ref
		wantFreed  int64
		wantImages int
		survive    func(f *fixture) []digest.Digest
		gone       func(f *fixture) []digest.Digest
	}{
		{name: "keep all records", keep: nil, wantFreed: 8000,
			survive: func(f *fixture) []digest.Digest { return []digest.Digest{f.base, f.inc, f.other, f.held} },
			gone:    func(f *fixture) []digest.Digest { return []digest.Digest{f.orphan} }},
		{name: "keep top keeps its chain", keep: []blobstore.Ref{ref("vol:inc")}, wantFreed: 12000, wantImages: 1,
			survive: func(f *fixture) []digest.Digest { return []digest.Digest{f.base, f.inc, f.held} },
			gone:    func(f *fixture) []digest.Digest { return []digest.Digest{f.orphan, f.other} }},
		{name: "keep nothing", keep: []blobstore.Ref{}, wantFreed: 15000, wantImages: 3,
			survive: func(f *fixture) []digest.Digest { return []digest.Digest{f.held} },
			gone:    func(f *fixture) []digest.Digest { return []digest.Digest{f.orphan, f.other, f.base, f.inc} }},
		{name: "unknown keep ref is harmless", keep: []blobstore.Ref{ref("ghost:1"), ref("other:x")}, wantFreed: 11000, wantImages: 2,
			survive: func(f *fixture) []digest.Digest { return []digest.Digest{f.other, f.held} },
			gone:    func(f *fixture) []digest.Digest { return []digest.Digest{f.base, f.inc} }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := setup(t)
			before, _ := f.s.Capacity()
			res, err := f.s.GC(ctx, tc.keep)
			if err != nil {
				t.Fatal(err)
			}
			if res.BytesFreed != tc.wantFreed || res.ImagesRemoved != tc.wantImages {
				t.Fatalf("GC = %+v, want %d bytes and %d images freed", res, tc.wantFreed, tc.wantImages)
			}
			for _, d := range tc.survive(f) {
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
			if before.Used-after.Used != tc.wantFreed || before.Blobs-after.Blobs != res.BlobsFreed || after.Blobs != countBlobs(t, f.s) {
				t.Fatalf("accounting: before %+v after %+v", before, after)
			}
			if imgs, _ := f.s.ListImages(ctx, ""); len(imgs) != 3-tc.wantImages || after.Images != len(imgs) {
				t.Fatalf("%d images left (Capacity says %d), want %d", len(imgs), after.Images, 3-tc.wantImages)
			}
			// Once released, the held blob goes too (unless kept).
			f.heldRelease()
			f.heldRelease() // idempotent
			res, _ = f.s.GC(ctx, tc.keep)
			if f.s.Exists(f.held) || res.BytesFreed < 16000 {
				t.Fatalf("released blob not freed: %+v", res)
			}
		})
	}
}

// testGCGrace: an unrecorded blob and a fresh record survive GC inside
// CommitGrace, by the store's memory and, after a restart, by the blob's
// and record's times; a store with a shorter grace frees them.
func testGCGrace(t *testing.T, e *env) {
	ctx := context.Background()
	hour := func(o *blobstore.Options) { o.CommitGrace = time.Hour }
	s := e.open(t, hour)
	loose := mustPut(t, s, content(36, 700))
	recorded := mustPut(t, s, content(37, 900))
	if err := s.PutImage(ctx, blobstore.Image{Ref: ref("fresh:1"), Blob: recorded}); err != nil {
		t.Fatal(err)
	}
	for i, s := range []*blobstore.Store{s, e.open(t, hour)} {
		res, err := s.GC(ctx, []blobstore.Ref{})
		if err != nil {
			t.Fatal(err)
		}
		if res.BlobsFreed != 0 || res.ImagesRemoved != 0 || !s.Exists(loose) || !s.Exists(recorded) {
			t.Fatalf("store %d: GC inside the grace freed %+v", i, res)
		}
	}
	s = e.open(t, func(o *blobstore.Options) { o.CommitGrace = time.Nanosecond })
	res, err := s.GC(ctx, []blobstore.Ref{})
	if err != nil {
		t.Fatal(err)
	}
	if res.BlobsFreed != 2 || res.BytesFreed != 1600 || res.ImagesRemoved != 1 || s.Exists(loose) || s.Exists(recorded) {
		t.Fatalf("GC past the grace: %+v", res)
	}
	if c, _ := s.Capacity(); c.Used != 0 || c.Blobs != 0 || c.Images != 0 {
		t.Fatalf("capacity %+v after everything was freed", c)
	}
}

// testGCRacesIngest runs GC in a loop while ingests stream, resume and
// commit; every committed blob must survive until an image records it.
func testGCRacesIngest(t *testing.T, e *env) {
	ctx := context.Background()
	s := e.open(t, func(o *blobstore.Options) { o.CommitGrace = time.Minute })
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
				img := blobstore.Image{Ref: blobstore.Ref{Name: ingestRef, ID: string(rune('0' + i))}, Blob: d}
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
	c, _ := s.Capacity()
	var sum int64
	for _, img := range imgs {
		sum += img.Size
	}
	if c.Used != sum || c.Blobs != 24 {
		t.Fatalf("capacity %+v, want used %d", c, sum)
	}
}

// commitBytes stores b through a Writer and returns its Creation.
func commitBytes(t *testing.T, s *blobstore.Store, ref string, b []byte) blobstore.Creation {
	t.Helper()
	ctx := context.Background()
	w, err := s.Writer(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Commit(ctx, int64(len(b)), ""); err != nil {
		t.Fatal(err)
	}
	return w.Creation()
}

// testDiscardNotCreated checks that a Writer whose bytes were already
// stored gets the zero Creation, which discards nothing, that a Creation
// whose blob another commit refreshed discards nothing even once nobody
// holds or records it, and that an unused creation is discarded.
func testDiscardNotCreated(t *testing.T, e *env) {
	ctx := context.Background()
	s := e.open(t, func(o *blobstore.Options) { o.CommitGrace = time.Hour })
	data := content(61, 3000)
	a := commitBytes(t, s, "a", data)
	b := commitBytes(t, s, "b", data)
	if !a.Created() || b.Created() || b != (blobstore.Creation{}) {
		t.Fatalf("Creations %+v, %+v: want the first created, the second zero", a, b)
	}
	for _, c := range []blobstore.Creation{b, a} {
		removed, err := s.Discard(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		if removed {
			t.Fatalf("Discard(%+v) removed the blob", c)
		}
	}
	if !s.Exists(a.Digest) {
		t.Fatal("blob gone")
	}
	c := commitBytes(t, s, "c", content(62, 3000))
	if removed, err := s.Discard(ctx, c); err != nil || !removed || s.Exists(c.Digest) {
		t.Fatalf("Discard of an unused creation: %v, %v", removed, err)
	}
	if got, _ := s.Capacity(); got.Used != 3000 || got.Blobs != 1 {
		t.Fatalf("capacity %+v", got)
	}
}

func testVerify(t *testing.T, e *env) {
	ctx := context.Background()
	s := e.open(t)
	good := mustPut(t, s, content(40, 50_000))
	bad := mustPut(t, s, content(41, 50_000))
	for _, img := range []blobstore.Image{
		{Ref: ref("v:base"), Blob: bad},
		{Ref: ref("v:inc"), Blob: good, Parent: "v:base"},
		{Ref: ref("w:solo"), Blob: good},
	} {
		if err := s.PutImage(ctx, img); err != nil {
			t.Fatal(err)
		}
	}
	e.h.Corrupt(t, e.root, bad, 12345)
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
	if cb.Digest != bad || !errors.Is(cb.Err, blobstore.ErrCorrupt) {
		t.Fatalf("corrupt %+v", cb)
	}
	if len(cb.Images) != 2 || cb.Images[0] != ref("v:base") || cb.Images[1] != ref("v:inc") {
		t.Fatalf("broken images %v, want v:base and v:inc", cb.Images)
	}
	if !strings.Contains(cb.Err.Error(), "v:inc") || cb.QuarantinePath == "" {
		t.Fatalf("error does not name images, or no quarantine: %+v", cb)
	}
	if s.Exists(bad) || countBlobs(t, s) != 1 {
		t.Fatal("corrupt blob still served")
	}
	if c, _ := s.Capacity(); c.Used != 50_000 || c.Blobs != 1 {
		t.Fatalf("capacity %+v", c)
	}
	if c, _ := e.open(t).Capacity(); c.Used != 50_000 || c.Blobs != 1 {
		t.Fatalf("capacity after a restart %+v (quarantine is not counted)", c)
	}
	// VerifyBlob directly, and a sample run.
	e.h.Corrupt(t, e.root, good, 0)
	if err := s.VerifyBlob(ctx, good); !errors.Is(err, blobstore.ErrCorrupt) {
		t.Fatalf("VerifyBlob flipped: %v", err)
	}
	if err := s.VerifyBlob(ctx, good); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("VerifyBlob after quarantine: %v", err)
	}
	// The same bytes can be stored again after their quarantine.
	if d := mustPut(t, s, content(40, 50_000)); d != good || s.VerifyBlob(ctx, d) != nil {
		t.Fatal("re-put of quarantined content")
	}
	mustPut(t, s, content(42, 10))
	if rep, err := s.Verify(ctx, 0.5); err != nil || rep.Checked != 1 || len(rep.Corrupt) != 0 {
		t.Fatalf("sample: %+v %v", rep, err)
	}
	if _, err := s.Verify(ctx, 1.5); err == nil {
		t.Fatal("sample 1.5 accepted")
	}
}

func testCapacity(t *testing.T, e *env) {
	s := e.open(t)
	mustPut(t, s, content(50, 12345))
	d := mustPut(t, s, content(51, 100))
	if err := s.PutImage(context.Background(), blobstore.Image{Ref: ref("a:b"), Blob: d}); err != nil {
		t.Fatal(err)
	}
	for i, s := range []*blobstore.Store{s, e.open(t)} {
		c, err := s.Capacity()
		if err != nil {
			t.Fatal(err)
		}
		if c.Used != 12445 || c.Blobs != 2 || c.Images != 1 || c.Quota != 0 {
			t.Fatalf("store %d: capacity %+v", i, c)
		}
		medium := c.Total > 0 && c.Free > 0 && c.Free <= c.Total
		if c.Unbounded {
			medium = c.Total == 0 && c.Free == 0
		}
		if !medium {
			t.Fatalf("store %d: medium figures %+v", i, c)
		}
	}
}

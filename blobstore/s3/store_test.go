package s3store

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"imagestore/blobstore"

	"github.com/opencontainers/go-digest"
)

// openStore opens a Store on backend b with a local state directory.
func openStore(t testing.TB, b *Backend, grace time.Duration) *blobstore.Store {
	t.Helper()
	s, err := blobstore.Open(t.Context(), blobstore.Options{Root: t.TempDir(), Backend: b, CommitGrace: grace,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func putImage(t testing.TB, s *blobstore.Store, name, id string, data []byte) blobstore.Image {
	t.Helper()
	ctx := t.Context()
	d, n, err := s.Put(ctx, bytes.NewReader(data), int64(len(data)), "")
	if err != nil {
		t.Fatal(err)
	}
	img := blobstore.Image{Ref: blobstore.Ref{Name: name, ID: id}, Blob: d, Size: n, Format: "raw", Created: time.Now().UTC()}
	if err := s.PutImage(ctx, img); err != nil {
		t.Fatal(err)
	}
	return img
}

// TestTwoStoresShareBucket: two agents on one bucket see each other's
// images and blobs, and a delete + GC on one leaves the other's ingest in
// flight alone: it commits afterwards and its image is complete.
func TestTwoStoresShareBucket(t *testing.T) {
	c := rgw.Get(t)
	bucket := c.TestBucket(t)
	ctx := t.Context()
	ba, bb := openBackend(t, c, bucket), openBackend(t, c, bucket)
	a, b := openStore(t, ba, time.Nanosecond), openStore(t, bb, time.Nanosecond)

	x := randBytes(11, 2*testPart+100)
	imgX := putImage(t, a, "vol", "x", x)
	got, err := b.GetImage(ctx, imgX.Ref)
	if err != nil || got.Blob != imgX.Blob {
		t.Fatalf("B's view of A's image: %+v, %v", got, err)
	}
	if imgs, err := b.ListImages(ctx, ""); err != nil || len(imgs) != 1 {
		t.Fatalf("B lists %v, %v", imgs, err)
	}
	bl, err := b.OpenBlob(ctx, imgX.Blob)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, len(x))
	if n, err := bl.ReadAt(p, 0); n != len(x) || (err != nil && err != io.EOF) || !bytes.Equal(p, x) {
		t.Fatalf("B reads A's blob: %d, %v", n, err)
	}
	// An image both put (same record) is fine; a different one is refused.
	if err := b.PutImage(ctx, imgX); err != nil {
		t.Fatalf("identical re-put from B: %v", err)
	}
	other := imgX
	other.Desc = "different"
	if err := b.PutImage(ctx, other); !errors.Is(err, blobstore.ErrExists) {
		t.Fatalf("different record under A's ref from B: %v", err)
	}

	// A ingests new content y and the same content as x, both in flight.
	y := randBytes(12, 2*testPart+7)
	wy, err := a.Writer(ctx, "ingest-y")
	if err != nil {
		t.Fatal(err)
	}
	wx, err := a.Writer(ctx, "ingest-x")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		w    *blobstore.Writer
		data []byte
	}{{wy, y}, {wx, x}} {
		if _, err := w.w.Write(w.data[:len(w.data)-50]); err != nil {
			t.Fatal(err)
		}
	}
	// B deletes x's only image and collects everything unreferenced.
	if err := b.DeleteImage(ctx, imgX.Ref); err != nil {
		t.Fatal(err)
	}
	res, err := b.GC(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.BlobsFreed != 1 {
		t.Fatalf("B's GC freed %d blobs, want x's", res.BlobsFreed)
	}
	// A's ingests survived and commit; x comes back from A's own bytes.
	for _, w := range []struct {
		w    *blobstore.Writer
		data []byte
		name string
	}{{wy, y, "y"}, {wx, x, "x2"}} {
		if _, err := w.w.Write(w.data[len(w.data)-50:]); err != nil {
			t.Fatal(err)
		}
		d, err := w.w.Commit(ctx, int64(len(w.data)), digest.FromBytes(w.data))
		if err != nil {
			t.Fatalf("A's commit after B's GC: %v", err)
		}
		img := blobstore.Image{Ref: blobstore.Ref{Name: "vol", ID: w.name}, Blob: d, Format: "raw", Created: time.Now().UTC()}
		if err := a.PutImage(ctx, img); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(readAll(t, bb, d), w.data) {
			t.Fatalf("blob of %s differs", w.name)
		}
	}
	if rep, err := b.Verify(ctx, 0); err != nil || len(rep.Corrupt) != 0 {
		t.Fatalf("Verify from B: %+v, %v", rep, err)
	}
}

// TestDedupCommitRacesForeignGC: agent B's GC has checked that blob x is
// older than the grace and is about to delete it; agent A commits the same
// content, which finds x present. Without the pins of pins.go, A would only
// renew x and B would then delete it under A's new image. With them, A
// either sees B's intent and waits (then finds x gone and uploads its own
// copy), or B sees A's pin and keeps x. Either way A's image has its blob.
func TestDedupCommitRacesForeignGC(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pinsOff bool
	}{
		{"pins", false},
		{"pins disabled", true}, // shows the test can fail
	} {
		t.Run(tc.name, func(t *testing.T) {
			const grace = time.Second
			c := rgw.Get(t)
			bucket := c.TestBucket(t)
			ctx := t.Context()
			ba, bb := openBackend(t, c, bucket), openBackend(t, c, bucket)
			ba.pinsOff, bb.pinsOff = tc.pinsOff, tc.pinsOff
			a, b := openStore(t, ba, grace), openStore(t, bb, grace)
			data := randBytes(100, 300_000)
			old := putImage(t, b, "vol", "old", data)
			time.Sleep(grace + 1100*time.Millisecond) // x is now older than the grace

			bAtDelete, aDone := make(chan struct{}), make(chan struct{})
			bb.beforeDelete = func(string) {
				close(bAtDelete)
				select { // let A's commit run inside B's window
				case <-aDone:
				case <-time.After(3 * time.Second): // A waits for B: go on
				}
			}
			var aErr error
			go func() {
				defer close(aDone)
				<-bAtDelete
				_, _, aErr = a.Put(ctx, bytes.NewReader(data), int64(len(data)), old.Blob)
			}()
			if err := b.DeleteImage(ctx, old.Ref); err != nil {
				t.Fatal(err)
			}
			res, err := b.GC(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			<-aDone
			if aErr != nil {
				t.Fatalf("A's commit: %v", aErr)
			}
			err = a.PutImage(ctx, blobstore.Image{Ref: blobstore.Ref{Name: "vol", ID: "new"}, Blob: old.Blob, Format: "raw", Created: time.Now().UTC()})
			_, serr := b.Stat(ctx, old.Blob)
			t.Logf("B's GC freed %d blobs; A's PutImage: %v; blob: %v", res.BlobsFreed, err, serr)
			if tc.pinsOff {
				if serr == nil {
					t.Fatal("without pins the race did not lose the blob: the test does not reach the window")
				}
				return
			}
			if err != nil || serr != nil {
				t.Fatalf("A's image after its commit: %v; its blob: %v", err, serr)
			}
			if got := readAll(t, bb, old.Blob); !bytes.Equal(got, data) {
				t.Fatal("blob differs")
			}
		})
	}
}

// TestEmptyIngestResumes: an ingest opened and closed before its first
// byte (the registry's upload session at POST) is there at offset 0, as on
// local disk, and the next Writer fills and commits it.
func TestEmptyIngestResumes(t *testing.T) {
	b, _, _ := newBackend(t)
	s := openStore(t, b, time.Hour)
	ctx := t.Context()
	w, err := s.Writer(ctx, "upload-empty")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if off, err := s.IngestOffset("upload-empty"); off != 0 || err != nil {
		t.Fatalf("IngestOffset = %d, %v; want 0, nil", off, err)
	}
	data := randBytes(7, 3000)
	w, err = s.Writer(ctx, "upload-empty")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	d, err := w.Commit(ctx, int64(len(data)), digest.FromBytes(data))
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, b, d); !bytes.Equal(got, data) {
		t.Fatal("committed blob differs")
	}
}

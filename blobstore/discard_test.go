package blobstore

import (
	"context"
	"testing"
	"time"
)

// commitBytes stores b through a Writer and returns its Creation.
func commitBytes(t *testing.T, s *Store, ref string, b []byte) Creation {
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

// TestDiscard checks that Discard removes a refused operation's blob only
// while nothing else may use it. The races are forced, without sleeps, by
// running the other writer in the window between Discard's listing of the
// records and its unlink (discardListed).
func TestDiscard(t *testing.T) {
	ctx := context.Background()
	data := content(60, 5000)
	tests := []struct {
		name string
		// during runs between Discard's listing and its unlink.
		during func(t *testing.T, s *Store)
		// after runs once Discard returned, before the checks.
		after       func(t *testing.T, s *Store)
		wantRemoved bool
		wantImage   bool
	}{
		{name: "unused", wantRemoved: true},
		{
			// Writer B stores the same bytes (not created), holds the
			// blob, and releases the hold (its record is made right
			// after: PutImage waits for Discard, which holds imgMu).
			name: "second writer committed and released meanwhile",
			during: func(t *testing.T, s *Store) {
				if c := commitBytes(t, s, "b", data); c.Created() {
					t.Fatal("second commit of the same bytes reports it created the blob")
				}
				s.Hold(digestOf(data))()
			},
			after: func(t *testing.T, s *Store) {
				if err := s.PutImage(ctx, Image{Ref: ref("b:1"), Blob: digestOf(data)}); err != nil {
					t.Fatalf("recording B's image: %v", err)
				}
			},
			wantImage: true,
		},
		{
			// A /v2 blob upload whose manifest comes later: no hold,
			// only its commit (CommitGrace) protects the blob.
			name: "upload of the same bytes meanwhile",
			during: func(t *testing.T, s *Store) {
				mustPut(t, s, data)
			},
		},
		{
			name: "record writers wait for the unlink",
			during: func(t *testing.T, s *Store) {
				if s.imgMu.TryLock() {
					s.imgMu.Unlock()
					t.Error("a record could be written between Discard's listing and its unlink")
				}
			},
			wantRemoved: true,
		},
		{
			name: "held",
			during: func(t *testing.T, s *Store) {
				t.Cleanup(s.Hold(digestOf(data)))
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, func(o *Options) { o.CommitGrace = time.Hour })
			own := commitBytes(t, s, "a", data)
			if !own.Created() || own.Digest != digestOf(data) {
				t.Fatalf("first commit: Creation %+v", own)
			}
			ran := false
			s.discardListed = func() {
				ran = true
				if tc.during != nil {
					tc.during(t, s)
				}
			}
			removed, err := s.Discard(ctx, own)
			if err != nil {
				t.Fatal(err)
			}
			if !ran {
				t.Fatal("Discard did not reach its unlink")
			}
			if tc.after != nil {
				tc.after(t, s)
			}
			if removed != tc.wantRemoved {
				t.Errorf("Discard removed = %v, want %v", removed, tc.wantRemoved)
			}
			if got := s.Exists(own.Digest); got == tc.wantRemoved {
				t.Errorf("blob exists = %v after Discard removed = %v", got, removed)
			}
			if c, err := s.Capacity(); err != nil {
				t.Fatal(err)
			} else if want := map[bool]int{true: 0, false: 1}[tc.wantRemoved]; c.Blobs != want || c.Blobs != countBlobs(t, s) {
				t.Errorf("Capacity counts %d blobs, %d on disk, want %d", c.Blobs, countBlobs(t, s), want)
			}
			if tc.wantImage {
				img, err := s.GetImage(ctx, ref("b:1"))
				if err != nil {
					t.Fatal(err)
				}
				b, err := s.OpenBlob(ctx, img.Blob)
				if err != nil {
					t.Fatalf("the recorded image points at nothing: %v", err)
				}
				b.Close()
			}
		})
	}
}

package replicate_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"imagestore/blobstore"
	"imagestore/internal/testwait"
	"imagestore/transfer/registry/registrytest"
	"imagestore/transfer/replicate"
)

// TestReport: what a peer may record here about a task it runs with us.
func TestReport(t *testing.T) {
	n := registrytest.Start(t, registrytest.Options{Engine: &replicate.Options{PeerStale: 200 * time.Millisecond}})
	e := n.Engine
	ok := replicate.Wire{ID: "abc123", Kind: "push", Name: "v", ImageID: "i", Status: replicate.StatusRunning, BytesDone: 5, BytesTotal: 10}
	if err := e.Report(ok, "10.0.0.1"); err != nil {
		t.Fatal(err)
	}
	task, err := e.Task("abc123")
	if err != nil || task.Status != replicate.StatusRunning || task.Role != replicate.RolePeer || task.Addr != "10.0.0.1" || task.BytesDone != 5 {
		t.Fatalf("%+v %v", task, err)
	}

	for _, tc := range []struct {
		name string
		mod  func(*replicate.Wire)
	}{
		{"status not one of the four", func(w *replicate.Wire) { w.Status = "Running" }},
		{"kind", func(w *replicate.Wire) { w.Kind = "copy" }},
		{"id existed", func(w *replicate.Wire) { w.ID = replicate.Existed }},
		{"id with a slash", func(w *replicate.Wire) { w.ID = "../x" }},
		{"bad image name", func(w *replicate.Wire) { w.Name = "a/b" }},
		{"another image under a known id", func(w *replicate.Wire) { w.ImageID = "j" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := ok
			tc.mod(&w)
			if err := e.Report(w, "10.0.0.1"); !errors.Is(err, replicate.ErrBadRequest) {
				t.Fatalf("err = %v, want ErrBadRequest", err)
			}
		})
	}

	// A peer cannot overwrite a task this store runs.
	st := n.Store
	addImage(t, st, blobstore.Ref{Name: "v", ID: "own"}, "", 1024)
	peer := newNode(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	own, err := e.Push(ctx, replicate.Request{Name: "v", ID: "own", Addr: peer.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	clash := ok
	clash.ID = own
	if err := e.Report(clash, "10.0.0.1"); !errors.Is(err, replicate.ErrTaskConflict) {
		t.Fatalf("report over our own task: %v", err)
	}
	// The peer we pushed to knows the id as a peer record.
	if pt, err := peer.Engine.Wait(ctx, own); err != nil || pt.Role != replicate.RolePeer || pt.Status != replicate.StatusSuccess {
		t.Fatalf("peer's record: %+v %v", pt, err)
	}

	// A running peer record not heard of for PeerStale reads as failed.
	testwait.For(t, "the stale peer record to read as failed", func() bool {
		task, _ = e.Task("abc123")
		return task.Status == replicate.StatusFailed
	})
	if !strings.Contains(task.Error, "has not reported") {
		t.Fatalf("stale error: %q", task.Error)
	}
	// A final report closes it; later ones change nothing.
	done := ok
	done.Status = replicate.StatusSuccess
	if err := e.Report(done, "10.0.0.1"); err != nil {
		t.Fatal(err)
	}
	again := ok
	again.Status = replicate.StatusFailed
	if err := e.Report(again, "10.0.0.1"); err != nil {
		t.Fatal(err)
	}
	if task, _ = e.Task("abc123"); task.Status != replicate.StatusSuccess {
		t.Fatalf("finished record changed: %+v", task)
	}
}

// TestPeerRecordSurvivesRestart: a running peer record is the peer's to
// finish, so a restart here does not mark it failed.
func TestPeerRecordSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	st, err := blobstore.Open(context.Background(), blobstore.Options{Root: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	e, err := replicate.New(replicate.Options{Store: st, Dir: dir + "/tasks"})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Report(replicate.Wire{ID: "p1", Kind: "pull", Name: "v", ImageID: "i", Status: replicate.StatusRunning}, "h"); err != nil {
		t.Fatal(err)
	}
	e.Close()
	e, err = replicate.New(replicate.Options{Store: st, Dir: dir + "/tasks"})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if task, err := e.Task("p1"); err != nil || task.Status != replicate.StatusRunning {
		t.Fatalf("%+v %v", task, err)
	}
	if err := e.Report(replicate.Wire{ID: "p1", Kind: "pull", Name: "v", ImageID: "i", Status: replicate.StatusSuccess}, "h"); err != nil {
		t.Fatal(err)
	}
	if task, _ := e.Wait(context.Background(), "p1"); task.Status != replicate.StatusSuccess {
		t.Fatalf("%+v", task)
	}
}

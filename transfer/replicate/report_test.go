package replicate_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

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

	// Only the host that reported a task first may report it again.
	hijack := ok
	hijack.Status = replicate.StatusSuccess
	if err := e.Report(hijack, "10.0.0.2"); !errors.Is(err, replicate.ErrNotReporter) {
		t.Fatalf("report from another host: %v", err)
	}
	if task, _ := e.Task("abc123"); task.Status != replicate.StatusRunning || task.Addr != "10.0.0.1" {
		t.Fatalf("another host's report changed the record: %+v", task)
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
	for _, from := range []string{"10.0.0.1", "127.0.0.1", ""} {
		if err := e.Report(clash, from); !errors.Is(err, replicate.ErrTaskConflict) && from != "" ||
			from == "" && !errors.Is(err, replicate.ErrBadRequest) {
			t.Fatalf("report from %q over our own task: %v", from, err)
		}
	}
	if task, err := e.Task(own); err != nil || task.Role != "" {
		t.Fatalf("our own task after the reports: %+v %v", task, err)
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
	// Nor may another host report over a finished one.
	if err := e.Report(again, "10.0.0.2"); !errors.Is(err, replicate.ErrNotReporter) {
		t.Fatalf("report from another host over a finished record: %v", err)
	}
}

// TestReportBounds: a peer's report keeps at most MaxReportError bytes of
// error text, and the peer records are capped (the oldest heard go first;
// tasks this store runs are never dropped), on disk too.
func TestReportBounds(t *testing.T) {
	const limit = 3
	n := registrytest.Start(t, registrytest.Options{Engine: &replicate.Options{MaxPeerTasks: limit}})
	e := n.Engine

	long := replicate.Wire{ID: "long", Kind: "pull", Name: "v", ImageID: "i", Status: replicate.StatusFailed, Error: strings.Repeat("é", 1<<20)}
	if err := e.Report(long, "h"); err != nil {
		t.Fatal(err)
	}
	task, err := e.Task("long")
	if err != nil || len(task.Error) > replicate.MaxReportError+16 || !strings.HasPrefix(task.Error, "éé") || !utf8.ValidString(task.Error) {
		t.Fatalf("error text kept: %d bytes, valid UTF-8 %v, %v", len(task.Error), utf8.ValidString(task.Error), err)
	}
	if fi, err := os.Stat(filepath.Join(n.Root, "registry", "tasks", "long.json")); err != nil || fi.Size() > 2*replicate.MaxReportError {
		t.Fatalf("record on disk: %v %v", fi, err)
	}

	// One task of our own, then more peer records than the limit.
	addImage(t, n.Store, blobstore.Ref{Name: "v", ID: "own"}, "", 1024)
	peer := newNode(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	own, err := e.Push(ctx, replicate.Request{Name: "v", ID: "own", Addr: peer.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{"long"}
	for i := range limit + 2 {
		id := fmt.Sprintf("p%d", i)
		ids = append(ids, id)
		if err := e.Report(replicate.Wire{ID: id, Kind: "push", Name: "v", ImageID: "i", Status: replicate.StatusRunning}, "h"); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Report(replicate.Wire{ID: "last", Kind: "push", Name: "v", ImageID: "i", Status: replicate.StatusRunning}, "h"); err != nil {
		t.Fatal(err)
	}
	// Reports in order: long p0 p1 p2 p3 p4 last. Kept: the newest three.
	want := map[string]bool{"long": false, "p0": false, "p1": false, "p2": false, "p3": true, "p4": true, "last": true}
	for id, kept := range want {
		_, err := e.Task(id)
		_, ferr := os.Stat(filepath.Join(n.Root, "registry", "tasks", id+".json"))
		if kept != (err == nil) || kept != (ferr == nil) {
			t.Errorf("record %s: kept %v, want %v (task: %v, file: %v)", id, err == nil, kept, err, ferr)
		}
	}
	if task, err := e.Task(own); err != nil || task.Role != "" {
		t.Fatalf("our own task was dropped: %+v %v", task, err)
	}
}

// TestPeerRecordsCappedAtStart: records left on disk beyond MaxPeerTasks
// (a lower limit than before) are dropped at start, the oldest heard first.
func TestPeerRecordsCappedAtStart(t *testing.T) {
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
	for _, id := range []string{"a", "b", "c"} {
		if err := e.Report(replicate.Wire{ID: id, Kind: "pull", Name: "v", ImageID: "i", Status: replicate.StatusRunning}, "h"); err != nil {
			t.Fatal(err)
		}
	}
	e.Close()
	e, err = replicate.New(replicate.Options{Store: st, Dir: dir + "/tasks", MaxPeerTasks: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for id, kept := range map[string]bool{"a": false, "b": true, "c": true} {
		_, err := e.Task(id)
		_, ferr := os.Stat(filepath.Join(dir, "tasks", id+".json"))
		if kept != (err == nil) || kept != (ferr == nil) {
			t.Errorf("record %s: kept %v, want %v (task: %v, file: %v)", id, err == nil, kept, err, ferr)
		}
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

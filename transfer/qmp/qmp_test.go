package qmp_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"imagestore/transfer/livebackup/vmtest"
	"imagestore/transfer/qmp"
)

func dial(t *testing.T, v *vmtest.VM) *qmp.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, v.QMPPath(), qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func startVM(t *testing.T) *vmtest.VM {
	qdir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(qdir) })
	return vmtest.Start(t, "vm", qdir, vmtest.DiskSpec{Node: "d0", Device: "vd0", Size: 16 << 20})
}

func TestClientAgainstQEMU(t *testing.T) {
	t.Parallel()
	v := startVM(t)
	c := dial(t, v)
	ctx := context.Background()

	// QEMU runs as we do here.
	if uid, gid, err := c.PeerCred(); err != nil || uid != os.Geteuid() || gid != os.Getegid() {
		t.Fatalf("PeerCred %d:%d %v, want %d:%d", uid, gid, err, os.Geteuid(), os.Getegid())
	}

	// A reply far over 64 KiB on one line.
	var schema []json.RawMessage
	if err := c.Execute(ctx, "query-qmp-schema", nil, &schema); err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(schema)
	if len(raw) < 64<<10 || len(schema) < 100 {
		t.Fatalf("schema of %d bytes, %d entries", len(raw), len(schema))
	}
	// Replies matched by id under concurrent use.
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				var st struct{ Status string }
				if err := c.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "prelaunch" {
					errs <- errors.Join(err, errors.New("status "+st.Status))
				}
				return
			}
			var nodes []struct {
				NodeName string `json:"node-name"`
			}
			if err := c.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil || len(nodes) != 2 {
				errs <- errors.Join(err, errors.New("nodes"))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// A typed error.
	err := c.Execute(ctx, "block-job-cancel", map[string]any{"device": "nope"}, nil)
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Class != "DeviceNotActive" {
		t.Fatalf("cancel of no job: %v", err)
	}
	// An event that arrived before anyone waited is still found.
	before := c.LastSeq()
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ev, err := c.WaitEvent(wctx, before, func(e qmp.Event) bool { return e.Name == "RESUME" })
	if err != nil || ev.Seq <= before {
		t.Fatalf("RESUME event: %+v %v", ev, err)
	}
	// HMP works through the same client.
	if out, err := qmp.HMP(ctx, c, "info status"); err != nil || out == "" {
		t.Fatalf("HMP: %q %v", out, err)
	}
	// QEMU leaves: commands and waits fail instead of hanging.
	v.Kill()
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("after QEMU died: %v", err)
	}
	if _, err := c.WaitEvent(ctx, c.LastSeq(), func(qmp.Event) bool { return false }); !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("wait after QEMU died: %v", err)
	}
}

func TestSecondClientWaitsForGreeting(t *testing.T) {
	t.Parallel()
	v := startVM(t)
	_ = dial(t, v)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if _, err := qmp.Dial(ctx, v.QMPPath(), qmp.Options{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second client: %v", err)
	}
	if _, err := qmp.Dial(context.Background(), filepath.Join(t.TempDir(), "none.qmp"), qmp.Options{}); err == nil {
		t.Fatal("dialled a socket that does not exist")
	}
}

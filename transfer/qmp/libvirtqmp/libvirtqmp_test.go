package libvirtqmp_test

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"imagestore/qcow2/qemutest"
	"imagestore/transfer/qmp"
	"imagestore/transfer/qmp/libvirtqmp"
	"imagestore/transfer/qmp/libvirtqmp/libvirttest"
)

func TestMonitorThroughLibvirt(t *testing.T) {
	d := libvirttest.StartDaemon(t)
	dom := d.StartDomain("lvqmp-test", 64<<20, 64<<20)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// A second monitor of the same domain: libvirt multiplexes.
	m, err := libvirtqmp.Dial(ctx, libvirtqmp.Options{Socket: d.Socket, Domain: dom.Name})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var st struct {
		Status string `json:"status"`
	}
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "prelaunch" {
		t.Fatalf("query-status: %+v %v", st, err)
	}

	// QMP errors come back typed.
	err = m.Execute(ctx, "block-dirty-bitmap-add", map[string]any{"node": "no-such-node", "name": "b"}, nil)
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Class != "GenericError" {
		t.Fatalf("bad node: %v", err)
	}

	// A guest write marks a bitmap added through the passthrough.
	if err := m.Execute(ctx, "block-dirty-bitmap-add", map[string]any{"node": "libvirt-2-format", "name": "b0"}, nil); err != nil {
		t.Fatal(err)
	}
	dom.Write(0, 1<<20, 64<<10, 0x5a)
	var nodes []struct {
		NodeName string `json:"node-name"`
		Bitmaps  []struct {
			Name  string `json:"name"`
			Count int64  `json:"count"`
		} `json:"dirty-bitmaps"`
	}
	if err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		t.Fatal(err)
	}
	count := int64(-1)
	for _, n := range nodes {
		for _, b := range n.Bitmaps {
			if n.NodeName == "libvirt-2-format" && b.Name == "b0" {
				count = b.Count
			}
		}
	}
	if count != 64<<10 {
		t.Fatalf("bitmap b0 counts %d, want the 64 KiB written: %+v", count, nodes)
	}

	// Job events (what the backup engine waits for) arrive through the
	// monitor event callbacks, data included.
	tgt := filepath.Join(t.TempDir(), "t.qcow2")
	qemutest.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", tgt, strconv.Itoa(64<<20))
	if err := m.Execute(ctx, "blockdev-add", map[string]any{"driver": "qcow2", "node-name": "tgt",
		"file": map[string]any{"driver": "file", "filename": tgt}}, nil); err != nil {
		t.Fatal(err)
	}
	after := m.LastSeq()
	if err := m.Execute(ctx, "blockdev-backup", map[string]any{"device": "libvirt-2-format", "target": "tgt",
		"sync": "full", "job-id": "j0", "auto-dismiss": false}, nil); err != nil {
		t.Fatal(err)
	}
	ev, err := m.WaitEvent(ctx, after, func(e qmp.Event) bool {
		return e.Name == "JOB_STATUS_CHANGE" && strings.Contains(string(e.Data), `"concluded"`)
	})
	if err != nil || !strings.Contains(string(ev.Data), `"j0"`) || ev.Stamp.Seconds == 0 {
		t.Fatalf("JOB_STATUS_CHANGE concluded: %+v %v", ev, err)
	}
	if err := m.Execute(ctx, "job-dismiss", map[string]any{"id": "j0"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Execute(ctx, "blockdev-del", map[string]any{"node-name": "tgt"}, nil); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", tgt).CombinedOutput(); err != nil || strings.Contains(string(out), "failed") {
		t.Fatalf("the backup lacks the write: %v %s", err, out)
	}

	if _, err := libvirtqmp.Dial(ctx, libvirtqmp.Options{Socket: d.Socket, Domain: "no-such-domain"}); !errors.Is(err, libvirtqmp.ErrNoDomain) {
		t.Fatalf("unknown domain: %v", err)
	}
	if _, err := libvirtqmp.Dial(ctx, libvirtqmp.Options{Socket: d.Dir + "/nothing-here", Domain: dom.Name}); err == nil {
		t.Fatal("dialled a socket that does not exist")
	}
}

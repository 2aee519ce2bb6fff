package agent

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"imagestore/blobstore"
)

// sizeless is the local backend reporting no medium size, as a bucket does.
type sizeless struct{ blobstore.Backend }

func (sizeless) Capacity(context.Context) (blobstore.BackendCapacity, error) {
	return blobstore.BackendCapacity{}, nil
}

// TestCapacityOfStoreWithoutSize: a store on a backend without a size (S3)
// reports the quota when one is set, else UnboundedCapacity, less what it
// holds; never 0 free while there is room (the management node would send
// it no backup).
func TestCapacityOfStoreWithoutSize(t *testing.T) {
	root := t.TempDir()
	local, err := blobstore.NewLocal(blobstore.LocalOptions{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	store, err := blobstore.Open(context.Background(), blobstore.Options{Root: root, Backend: sizeless{local}, CommitGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	cfg := testConfig(t)
	cfg.Root = root
	cfg.NBD.PortRange = ""
	a, err := New(cfg, store, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	const n = 4096
	if _, _, err := store.Put(context.Background(), strings.NewReader(strings.Repeat("x", n)), n, ""); err != nil {
		t.Fatal(err)
	}
	if c := a.capacity(); c.TotalSize != UnboundedCapacity || c.FreeSize != UnboundedCapacity-n {
		t.Fatalf("no quota: %+v, want total %d free %d", c, UnboundedCapacity, UnboundedCapacity-n)
	}
	if err := store.SetQuota(1 << 20); err != nil {
		t.Fatal(err)
	}
	if c := a.capacity(); c.TotalSize != 1<<20 || c.FreeSize != 1<<20-n {
		t.Fatalf("quota 1 MiB: %+v, want total %d free %d", c, 1<<20, 1<<20-n)
	}
}

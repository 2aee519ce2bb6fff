package ingest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/qcow2/hostile"
)

// storeEmpty fails unless the store holds no record, no blob and no ingest.
func storeEmpty(t *testing.T, st *blobstore.Store) {
	t.Helper()
	blobs := 0
	if err := st.WalkBlobs(context.Background(), func(blobstore.BlobInfo) error { blobs++; return nil }); err != nil {
		t.Fatal(err)
	}
	ingests, _ := os.ReadDir(filepath.Join(st.Root(), "ingest"))
	imgs, err := st.ListImages(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if blobs != 0 || len(ingests) != 0 || len(imgs) != 0 {
		t.Fatalf("store changed: %d blobs, %d ingests, records %v", blobs, len(ingests), imgs)
	}
}

// TestHostileImports sends the hostile corpus's costly qcow2 files through
// import-backup and the URL import: each is refused with the reader's
// message, within a stated allocation ceiling, the store unchanged.
func TestHostileImports(t *testing.T) {
	cases := []struct {
		label    string
		f        *hostile.File
		want     string
		maxAlloc uint64
	}{
		{"metadata-bomb-96MiB", hostile.SharedRun(196608), "metadata budget", 64 << 20},        // 96 MiB of L2 tables
		{"shared-run-48MiB", hostile.SharedRun(98304), "more than one L2 entry", 4 * 48 << 20}, // 48 MiB of L2 tables
		{"ratio-bomb", hostile.RatioBomb(1024), "decompression budget", 64 << 20},              // 2 GiB from 227 KiB
	}
	for _, tc := range cases {
		for _, how := range []string{"import-backup", "url"} {
			t.Run(tc.label+"-"+how, func(t *testing.T) {
				e := newEnv(t)
				dir, err := e.ups.Alloc(0)
				if err != nil {
					t.Fatal(err)
				}
				p := filepath.Join(dir.Path, "evil.qcow2")
				f, err := os.Create(p)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := tc.f.WriteTo(f); err != nil {
					t.Fatal(err)
				}
				f.Close()
				runtime.GC()
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				start := time.Now()
				ctx := context.Background()
				if how == "url" {
					_, err = e.svc.ImportURL(ctx, URLRequest{Task: "u1", ImgURL: "file://" + p, Name: "img"}, jobs.Nop{})
				} else {
					_, err = e.svc.ImportBackup(ctx, BackupRequest{Task: "b1", ImgURL: p, Name: "vol"}, jobs.Nop{})
				}
				elapsed := time.Since(start)
				runtime.ReadMemStats(&after)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("import = %v, want a refusal about %q", err, tc.want)
				}
				alloc := after.TotalAlloc - before.TotalAlloc
				t.Logf("%v (%v, %d MiB allocated)", err, elapsed, alloc>>20)
				if how == "import-backup" && alloc > tc.maxAlloc {
					t.Errorf("allocated %d bytes, ceiling %d", alloc, tc.maxAlloc)
				}
				storeEmpty(t, e.store)
			})
		}
	}
}

// TestImportNamespaceRule: an import into zsbak on a volume's image is
// refused before anything is stored; a top-mode parent (a base image of
// another namespace) is accepted.
func TestImportNamespaceRule(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	data := []byte("a database dump, not a qcow2")
	base, err := e.svc.ImportBackup(ctx, BackupRequest{Task: "b0", ImgURL: e.upload(t, "base.raw", make([]byte, 4096)), Name: "vol-base"}, jobs.Nop{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.svc.ImportBackup(ctx, BackupRequest{Task: "b1", ImgURL: e.upload(t, "d", data), Parent: base.Ref.String(), InstallPath: "zstore://zsbak/x1"}, jobs.Nop{})
	if !errors.Is(err, layer.ErrNamespace) {
		t.Fatalf("zsbak on vol-base: %v", err)
	}
	if imgs, _ := e.store.ListImages(ctx, "zsbak"); len(imgs) != 0 {
		t.Fatalf("recorded %v", imgs)
	}
}

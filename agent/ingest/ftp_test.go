package ingest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/transfer/ftp/ftptest"
)

// TestImportFTP downloads from a real FTP server (vsftpd): a raw disk is
// stored as it is; an import whose ingest already holds the first bytes
// (a cut earlier attempt) continues with REST and the server sends only
// the rest; a missing file fails without retries.
func TestImportFTP(t *testing.T) {
	e := newEnv(t)
	srv := ftptest.Start(t)
	raw := make([]byte, 3<<20)
	for i := range raw {
		raw[i] = byte(i/4096*7 + 1)
	}
	if err := os.WriteFile(filepath.Join(srv.Dir, "disk.raw"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	img, err := e.svc.ImportURL(ctx, URLRequest{Task: "f1", ImgURL: srv.URL("disk.raw"), Name: "img"}, jobs.Nop{})
	if err != nil {
		t.Fatalf("%v\n%s", err, srv.Log())
	}
	check := func(img blobstore.Image) {
		t.Helper()
		b, err := e.store.OpenBlob(ctx, img.Blob)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		got := make([]byte, len(raw))
		if _, err := b.ReadAt(got, 0); err != nil || !bytes.Equal(got, raw) || img.Format != "raw" || img.VirtualSize != int64(len(raw)) {
			t.Fatalf("stored %+v differs from the FTP file (%v)", img, err)
		}
	}
	check(img)

	// An earlier attempt left 1 MiB + 123 bytes in the ingest.
	const have = 1<<20 + 123
	w, err := e.store.Writer(ctx, "import-f2")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(raw[:have]); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	img, err = e.svc.ImportURL(ctx, URLRequest{Task: "f2", ImgURL: srv.URL("disk.raw"), Name: "img2"}, jobs.Nop{})
	if err != nil {
		t.Fatal(err)
	}
	check(img)
	if log := srv.Log(); !strings.Contains(log, fmt.Sprintf("%d bytes", len(raw)-have)) {
		t.Fatalf("the resumed download did not start at %d:\n%s", have, log)
	}

	waits := len(e.waits)
	if _, err := e.svc.ImportURL(ctx, URLRequest{Task: "f3", ImgURL: srv.URL("missing.raw"), Name: "img3"}, jobs.Nop{}); err == nil || !strings.Contains(err.Error(), "550") || len(e.waits) != waits {
		t.Fatalf("missing file: %v (waits %v)", err, e.waits)
	}
}

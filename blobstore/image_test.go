package blobstore

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func ref(s string) Ref {
	r, err := ParseRef(s)
	if err != nil {
		panic(err)
	}
	return r
}

// TestParseNames feeds path tricks to the parsers of refs, install paths
// and backing names (the store's entry points: blobstoretest's BadNames).
func TestParseNames(t *testing.T) {
	hex := strings.Repeat("ab", 32)
	bad := []string{"", ".", "..", "../x", "a/b", "/abs", "a\x00b", ".hidden", "a b", "a:b", "a\\b", strings.Repeat("n", MaxNameLen+1), "ü"}
	for _, name := range bad {
		for _, r := range []Ref{{Name: name, ID: "x"}, {Name: "x", ID: name}} {
			if _, err := ParseRef(r.Name + ":" + r.ID); !errors.Is(err, ErrInvalidName) {
				t.Errorf("ParseRef(%v): %v", r, err)
			}
			if _, err := ParseInstallPath(InstallPathScheme + r.Name + "/" + r.ID); !errors.Is(err, ErrInvalidName) {
				t.Errorf("ParseInstallPath(%v): %v", r, err)
			}
			// (A "/" only makes more components, each checked alone.)
			if err := ValidateRecordKey("images/" + r.Name + "/" + r.ID); !strings.Contains(name, "/") && !errors.Is(err, ErrInvalidName) {
				t.Errorf("ValidateRecordKey(%v): %v", r, err)
			}
		}
	}
	for _, n := range []string{"", hex, "../" + hex, "../cd/" + hex, "../ab/../" + hex, "../../ab/" + hex, "../ab/" + hex + "/x", "../ab/" + hex[:62]} {
		if _, err := DigestFromBackingName(n); !errors.Is(err, ErrInvalidName) {
			t.Errorf("DigestFromBackingName(%q): %v", n, err)
		}
	}
	for _, p := range []string{"zstore://a", "http://a/b", "zstore://a/b/c", "zstore://../b"} {
		if _, err := ParseInstallPath(p); !errors.Is(err, ErrInvalidName) {
			t.Errorf("ParseInstallPath(%q): %v", p, err)
		}
	}
	if r, err := ParseInstallPath("zstore://vol-1/2024.01_a"); err != nil || r.InstallPath() != "zstore://vol-1/2024.01_a" || r.String() != "vol-1:2024.01_a" {
		t.Errorf("ParseInstallPath good: %v %v", r, err)
	}
	d := digestOf([]byte("x"))
	if got, err := DigestFromBackingName(BackingName(d)); err != nil || got != d {
		t.Fatalf("round trip: %s %v", got, err)
	}
}

// TestLocalLayout checks where the local backend keeps things
// (docs/blobstore.md): read-only blobs by digest, records as JSON files
// whose empty name directory goes with the last one, the quarantine, and
// no ingest directory left after commits.
func TestLocalLayout(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s := openStore(t, root)
	d := mustPut(t, s, content(70, 1000))
	bp := filepath.Join(root, dirBlobs, "sha256", d.Encoded()[:2], d.Encoded())
	if fi, err := os.Stat(bp); err != nil || fi.Mode().Perm() != 0o444 {
		t.Fatalf("blob file %s: %v, %v; want mode 0444", bp, fi, err)
	}
	if p, err := s.BlobPath(d); err != nil || p != bp {
		t.Fatalf("BlobPath = %s, %v; want %s", p, err, bp)
	}
	if err := s.PutImage(ctx, Image{Ref: ref("vol:a"), Blob: d, Created: time.Unix(1, 0)}); err != nil {
		t.Fatal(err)
	}
	rec := filepath.Join(root, dirImages, "vol", "a.json")
	if b, err := os.ReadFile(rec); err != nil || !strings.Contains(string(b), `"blobsum": "`+d.String()) {
		t.Fatalf("record %s: %q, %v", rec, b, err)
	}
	if err := s.DeleteImage(ctx, ref("vol:a")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(rec)); !os.IsNotExist(err) {
		t.Fatalf("empty name dir left: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, dirIngest)); len(ents) != 0 {
		t.Fatalf("%d ingests left after Put", len(ents))
	}
	os.Chmod(bp, 0o644)
	if err := os.WriteFile(bp, content(71, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Verify(ctx, 0)
	if err != nil || len(rep.Corrupt) != 1 {
		t.Fatalf("Verify: %+v, %v", rep, err)
	}
	if q := rep.Corrupt[0].QuarantinePath; q != filepath.Join(root, dirQuarantine, d.Encoded()) {
		t.Fatalf("quarantined to %q", q)
	}
	if _, err := os.Stat(bp); !os.IsNotExist(err) {
		t.Fatalf("corrupt blob still in place: %v", err)
	}
	// A stray temp file of a record is removed at Open.
	tmp := filepath.Join(root, dirImages, "w", ".x.json.tmp-123")
	os.MkdirAll(filepath.Dir(tmp), 0o755)
	os.WriteFile(tmp, nil, 0o600)
	openStore(t, root)
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Fatalf("temp record survived Open: %v", err)
	}
}

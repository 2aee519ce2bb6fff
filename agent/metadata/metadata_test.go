package metadata

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMetadataFile(t *testing.T) {
	root := t.TempDir()
	s, err := New(Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := s.Exists(); ok || err != nil {
		t.Fatalf("exists before generate: %v %v", ok, err)
	}
	if got, err := s.Read(); got != "" || err != nil {
		t.Fatalf("read of no file: %q %v", got, err)
	}
	if err := s.Generate(); err != nil {
		t.Fatal(err)
	}
	if ok, _ := s.Exists(); !ok || s.Path() != filepath.Join(root, FileName) {
		t.Fatalf("generate made no file at %s", s.Path())
	}

	a1 := `{"uuid":"a","name":"one","backupStorageRefs":[{"installPath":"zstore://a/1"}]}`
	b1 := `{"uuid":"b","name":"two","backupStorageRefs":[]}`
	a2 := `{"uuid":"a","name":"one renamed","backupStorageRefs":[{"installPath":"zstore://a/1"}]}`
	c1 := `{"uuid":"c","name":"three"}`
	steps := []struct {
		name string
		data string
		all  bool
		want []string
	}{
		{"all", a1 + "\n" + b1 + "\n", true, []string{a1, b1}},
		{"add one", c1, false, []string{a1, b1, c1}},
		{"replace one by uuid", a2 + "\r\n", false, []string{b1, c1, a2}},
		{"all replaces everything", c1, true, []string{c1}},
	}
	for _, st := range steps {
		if err := s.Dump(st.data, st.all); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		got, _ := s.Read()
		if want := strings.Join(st.want, "\n") + "\n"; got != want {
			t.Fatalf("%s: file\n%s\nwant\n%s", st.name, got, want)
		}
	}
	if err := s.Dump(a1+"\n"+"rest of line for xyz-uuid\n"+b1, false); err != nil {
		t.Fatal(err)
	}
	if n, err := s.DeleteImage("b"); n != 1 || err != nil {
		t.Fatalf("delete b: %d %v", n, err)
	}
	if n, err := s.DeleteImage("xyz-uuid"); n != 1 || err != nil {
		t.Fatalf("delete a non-JSON line by its text: %d %v", n, err)
	}
	if n, err := s.DeleteImage("zzz"); n != 0 || err != nil {
		t.Fatalf("delete of an absent image: %d %v", n, err)
	}
	if got, _ := s.Read(); got != c1+"\n"+a1+"\n" {
		t.Fatalf("after deletes:\n%s", got)
	}
	// Generate keeps existing content.
	if err := s.Generate(); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Read(); got != c1+"\n"+a1+"\n" {
		t.Fatalf("generate clobbered the file:\n%s", got)
	}
	// Atomic writes leave no temp files behind.
	ents, _ := os.ReadDir(root)
	if len(ents) != 1 {
		t.Fatalf("root holds %v", ents)
	}
	if _, err := s.DeleteImage(""); err == nil {
		t.Fatal("delete without a uuid accepted")
	}
}

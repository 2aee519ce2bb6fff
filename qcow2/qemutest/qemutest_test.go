package qemutest

import (
	"path/filepath"
	"testing"
)

func TestHelpersAgainstQemu(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	Create(t, p, 1<<20, "cluster_size=65536")
	IO(t, p, "write -P 0xab 0 64k", "write -z 128k 64k")
	m := Map(t, p)
	want := []Extent{{0, 65536, "data"}, {65536, 65536, "unallocated"}, {131072, 65536, "zero"}, {196608, 1<<20 - 196608, "unallocated"}}
	if len(m) != len(want) {
		t.Fatalf("map = %+v, want %+v", m, want)
	}
	for i := range want {
		if m[i] != want[i] {
			t.Fatalf("map[%d] = %+v, want %+v", i, m[i], want[i])
		}
	}
	Check(t, p)
	Compare(t, p, p)
	if d := ConvertRaw(t, p); d.Validate() != nil {
		t.Fatalf("bad digest %q", d)
	}
	if v := Info(t, p)["virtual-size"]; v != float64(1<<20) {
		t.Fatalf("virtual-size = %v", v)
	}
}

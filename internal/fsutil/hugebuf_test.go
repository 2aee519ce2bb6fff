package fsutil

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"unsafe"
)

// TestHugeBuffer: the buffer is zeroed, 2 MiB-aligned and, where the
// kernel offers transparent huge pages, in a mapping eligible for them; a
// DirectWriter writes it around the page cache and the file holds it.
func TestHugeBuffer(t *testing.T) {
	const n = 4<<20 + 8*DirectAlign // not a multiple of the huge page
	hb := NewHugeBuffer(n)
	b := hb.Bytes()
	if len(b) != n || cap(b) != n {
		t.Fatalf("len %d cap %d, want %d", len(b), cap(b), n)
	}
	addr := uintptr(unsafe.Pointer(&b[0]))
	if addr%hugePage != 0 {
		t.Fatalf("buffer at %#x: not aligned to 2 MiB", addr)
	}
	if !bytes.Equal(b, make([]byte, n)) {
		t.Fatal("a new buffer is not zeroed")
	}
	thp, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	if err != nil {
		t.Fatalf("reading the THP setting: %v", err)
	}
	eligible := smapsField(t, addr, "THPeligible")
	wantEligible := "1"
	if strings.Contains(string(thp), "[never]") {
		wantEligible = "0"
	}
	if eligible != wantEligible {
		t.Fatalf("THPeligible %q for the buffer's mapping with THP %q, want %q", eligible, strings.TrimSpace(string(thp)), wantEligible)
	}

	for i := range b {
		b[i] = byte(i*7 + i/4096)
	}
	f, w := newDirectTemp(t)
	if k, err := w.WriteAt(b, 0); err != nil || k != n {
		t.Fatalf("WriteAt: %d, %v", k, err)
	}
	if w.Direct() != n {
		t.Fatalf("%d bytes written directly, want %d", w.Direct(), n)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, b) {
		t.Fatal("the file does not hold the buffer")
	}
	hb.Free()
	if hb.Bytes() != nil {
		t.Fatal("Bytes after Free is not nil")
	}
	hb.Free() // twice is harmless
}

// smapsField returns a field of the mapping holding addr in
// /proc/self/smaps.
func smapsField(t *testing.T, addr uintptr, field string) string {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if name, ok := strings.CutSuffix(fields[0], ":"); ok {
			if in && name == field && len(fields) > 1 {
				return fields[1]
			}
			continue
		}
		// A mapping's first line: "lo-hi perms offset dev inode [path]".
		var lo, hi uintptr
		if _, err := fmt.Sscanf(fields[0], "%x-%x", &lo, &hi); err != nil {
			t.Fatalf("smaps line %q: %v", sc.Text(), err)
		}
		in = lo <= addr && addr < hi
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	t.Fatalf("no %s for the mapping at %#x in /proc/self/smaps", field, addr)
	return ""
}

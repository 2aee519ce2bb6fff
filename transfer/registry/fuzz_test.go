package registry

import (
	"math"
	"testing"
)

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"0-0", "0-1023", "bytes 5-9/100", "10-9", "9-0", "-1-5", "a-b", "", "0-9223372036854775807", "9223372036854775806-9223372036854775806"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		start, n, ok := parseContentRange(s)
		if ok && (start < 0 || n < 0 || start > math.MaxInt64-n) {
			t.Fatalf("%q accepted as start %d length %d", s, start, n)
		}
	})
}

func FuzzWantedRange(f *testing.F) {
	for _, s := range []string{"", "bytes=0-0", "bytes=0-1023", "bytes=5-", "bytes=-5", "bytes=0-1,5-9", "bytes=9-0", "bytes=a-b", "items=0-5", "bytes=0-9223372036854775807"} {
		f.Add(s, int64(1000))
	}
	f.Fuzz(func(t *testing.T, s string, size int64) {
		if size < 0 {
			return
		}
		start, end, ok := wantedRange(s, size)
		if ok && (start < 0 || end > size || start > end || (s != "" && start >= end)) {
			t.Fatalf("%q of %d accepted as [%d, %d)", s, size, start, end)
		}
	})
}

func TestWantedRange(t *testing.T) {
	for _, c := range []struct {
		h          string
		start, end int64
		ok         bool
	}{
		{"", 0, 100, true},
		{"bytes=0-9", 0, 10, true},
		{"bytes=90-", 90, 100, true},
		{"bytes=90-1000", 90, 100, true},
		{"bytes=99-99", 99, 100, true},
		{"bytes=100-", 0, 0, false}, // past the end: ServeContent answers 416
		{"bytes=-10", 0, 0, false},  // a suffix: ServeContent's
		{"bytes=0-1,5-9", 0, 0, false},
		{"bytes=9-0", 0, 0, false},
		{"bytes=x-9", 0, 0, false},
		{"items=0-9", 0, 0, false},
	} {
		start, end, ok := wantedRange(c.h, 100)
		if ok != c.ok || (ok && (start != c.start || end != c.end)) {
			t.Errorf("wantedRange(%q, 100) = %d, %d, %v; want %d, %d, %v", c.h, start, end, ok, c.start, c.end, c.ok)
		}
	}
}

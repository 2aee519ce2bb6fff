package ingest

import "testing"

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-9/10", "bytes 5-9/*", "bytes 10-9/5", "bytes -1-2/3", "bytes x", "", "bytes 1-2/99999999999999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		start, size, ok := parseContentRange(s)
		if ok && (start < 0 || (size >= 0 && size < start)) {
			t.Fatalf("%q: start %d size %d accepted", s, start, size)
		}
	})
}

func TestParseContentRange(t *testing.T) {
	for _, c := range []struct {
		in          string
		start, size int64
		ok          bool
	}{
		{"bytes 100-199/200", 100, 200, true},
		{"bytes 100-199/*", 100, -1, true},
		{"bytes */200", 0, 0, false},
		{"items 1-2/3", 0, 0, false},
		{"bytes 300-399/200", 0, 0, false},
	} {
		s, n, ok := parseContentRange(c.in)
		if s != c.start || n != c.size || ok != c.ok {
			t.Errorf("%q: %d %d %v, want %d %d %v", c.in, s, n, ok, c.start, c.size, c.ok)
		}
	}
}

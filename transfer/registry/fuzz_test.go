package registry

import "testing"

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"0-0", "0-1023", "bytes 5-9/100", "10-9", "9-0", "-1-5", "a-b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		start, end, ok := parseContentRange(s)
		if ok && (start < 0 || end < start-1) {
			t.Fatalf("%q accepted as %d-%d", s, start, end)
		}
	})
}

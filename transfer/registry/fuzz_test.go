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

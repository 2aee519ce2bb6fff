package api

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"testing"
)

func FuzzInt(f *testing.F) {
	for _, s := range []string{`0`, `42`, `-7`, `"123"`, `1.0E10`, `"1.5e3"`, `null`, `""`, `"`, `true`,
		`{}`, `[]`, `1e400`, `-1e400`, `"NaN"`, `"Infinity"`, `9223372036854775807`, `4611686018427387905.0`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var v Int
		err := v.UnmarshalJSON(b)
		if err != nil {
			if !strings.Contains(err.Error(), "is not a number") && !strings.Contains(err.Error(), "is out of range") {
				t.Fatalf("%q: unclear error %v", b, err)
			}
			return
		}
		// A JSON integer in range comes back unchanged.
		if n, perr := strconv.ParseInt(string(b), 10, 64); perr == nil && Int(n) != v {
			t.Fatalf("%q = %d", b, v)
		}
		if f, perr := strconv.ParseFloat(strings.Trim(string(b), `"`), 64); perr == nil && !math.IsNaN(f) {
			if math.Abs(float64(v)-f) > 1 && math.Abs(float64(v)-f) > math.Abs(f)*1e-9 {
				t.Fatalf("%q = %d, far from %v", b, v, f)
			}
		}
		// Through encoding/json as a request field too.
		var req SetQuotaRequest
		if json.Valid(b) {
			_ = json.Unmarshal(append(append([]byte(`{"maxCapacity":`), b...), '}'), &req)
		}
	})
}

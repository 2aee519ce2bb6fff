package qmp

import "testing"

func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`,
		`{"return": {}, "id": "c1"}`,
		`{"error": {"class": "GenericError", "desc": "x"}, "id": "c2"}`,
		`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "j"}}`,
		`{"id": 5}`, `[]`, `null`, "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decode(b)
		if err != nil {
			return
		}
		if m.QMP == nil && m.Event == "" && m.ID == nil && m.Return == nil && m.Error == nil {
			t.Fatalf("accepted a message of no kind: %q", b)
		}
	})
}

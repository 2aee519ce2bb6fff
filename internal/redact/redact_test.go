package redact

import "testing"

func TestURL(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"http://mgmt:pw@host:8080/cb/path?token=t&x=1#frag", "http://host:8080/cb/path"},
		{"https://host/p?", "https://host/p"},
		{"http://host/%zz", "(unparseable URL)"},
	} {
		if got := URL(tc.in); got != tc.want {
			t.Errorf("URL(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

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

func TestToken(t *testing.T) {
	const tok = "0f9e8d7c6b5a49382716a5b4c3d2e1f0"
	got := Token(tok)
	if got == "" || got == tok || len(got) != len("redacted-")+8 || got[:9] != "redacted-" {
		t.Fatalf("Token(%q) = %q", tok, got)
	}
	if Token(tok) != got {
		t.Fatal("Token is not stable: logs could not tell sessions apart")
	}
	if Token(tok[:31]+"1") == got {
		t.Fatal("two tokens give one fingerprint")
	}
	if Token("") != "" {
		t.Fatalf("Token(\"\") = %q", Token(""))
	}
}

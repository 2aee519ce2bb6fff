package redact

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

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

func TestSecretNeverPrints(t *testing.T) {
	s := Secret("hunter2-very-secret")
	var buf bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&buf, nil))
	logger.Info("x", "key", s, "struct", struct{ K Secret }{s})
	j, err := json.Marshal(struct{ K Secret }{s})
	if err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{fmt.Sprint(s), fmt.Sprintf("%v %s %#v %+v", s, s, s, struct{ K Secret }{s}), string(j), buf.String()} {
		if strings.Contains(out, "hunter2") {
			t.Errorf("secret printed: %s", out)
		}
		if !strings.Contains(out, "<redacted>") && !strings.Contains(out, `\u003credacted\u003e`) {
			t.Errorf("no redaction mark in %s", out)
		}
	}
	if s.Reveal() != "hunter2-very-secret" {
		t.Error("Reveal lost the value")
	}
	if Secret("").String() != "" {
		t.Error("empty secret should print empty")
	}
}

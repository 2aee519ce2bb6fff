// Package redact strips what may be secret from values before they are
// recorded, reported or logged.
package redact

import (
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"net/url"
	"strconv"
)

// URL strips what may be secret from a URL (userinfo, query, fragment)
// for records, replies and logs. An unparseable URL is not echoed at all.
func URL(raw string) string {
	if raw == "" {
		return ""
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparseable URL)"
	}
	u.User = nil
	u.RawQuery, u.ForceQuery = "", false
	u.Fragment, u.RawFragment = "", ""
	return u.String()
}

// Token replaces a secret token (e.g. the one an upload URL holds) with a
// short fingerprint that tells tokens apart in logs but cannot be used in
// their place: "redacted-" and the first 8 hex digits of its SHA-256.
func Token(tok string) string {
	if tok == "" {
		return ""
	}
	h := sha256.Sum256([]byte(tok))
	return "redacted-" + hex.EncodeToString(h[:4])
}

// Secret is a string that never prints: fmt, %#v, JSON, YAML and slog all
// show "<redacted>" (or "" when empty). Call Reveal where the value is needed.
type Secret string

// String redacts the value.
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return "<redacted>"
}

// GoString redacts the value for %#v.
func (s Secret) GoString() string { return s.String() }

// MarshalText redacts the value (JSON, YAML and other text encoders).
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// MarshalJSON redacts the value.
func (s Secret) MarshalJSON() ([]byte, error) { return []byte(strconv.Quote(s.String())), nil }

// MarshalYAML redacts the value, so a dumped config never holds it.
func (s Secret) MarshalYAML() (any, error) { return s.String(), nil }

// LogValue redacts the value in structured logs.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// Reveal returns the secret itself, for the one place that must use it.
func (s Secret) Reveal() string { return string(s) }

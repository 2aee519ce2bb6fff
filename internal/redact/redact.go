// Package redact strips what may be secret from values before they are
// recorded, reported or logged.
package redact

import "net/url"

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

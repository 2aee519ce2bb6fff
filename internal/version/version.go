// Package version reports what the running binary was built from, as the
// Go toolchain stamps it: the main module's version (a release tag, or a
// pseudo-version from the commit), the VCS revision and whether the tree
// had local changes. Packages (make deb) build from a git checkout, so
// every installed binary can say which commit it is.
package version

import (
	"runtime"
	"runtime/debug"
	"strings"
)

// Info is the build's identity.
type Info struct {
	Version   string // "v1.2.3", "v0.0.0-20261207011753-34e3d20abcde", or "devel"
	Revision  string // VCS commit, "" when not built from a checkout
	Time      string // commit time (RFC 3339), "" when unknown
	Modified  bool   // built from a tree with uncommitted changes
	GoVersion string
}

// Get reads the build information of the running binary.
func Get() Info {
	in := Info{Version: "devel", GoVersion: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return in
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		in.Version = v
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Revision = s.Value
		case "vcs.time":
			in.Time = s.Value
		case "vcs.modified":
			in.Modified = s.Value == "true"
		}
	}
	return in
}

// String is one line: version, short revision, dirty mark, Go version.
func (in Info) String() string {
	var b strings.Builder
	b.WriteString(in.Version)
	if in.Revision != "" && !strings.Contains(in.Version, shortRev(in.Revision)) {
		b.WriteString(" (" + shortRev(in.Revision) + ")")
	}
	if in.Modified && !strings.Contains(in.Version, "dirty") {
		b.WriteString(" +dirty")
	}
	b.WriteString(" " + in.GoVersion)
	return b.String()
}

// String is Get().String().
func String() string { return Get().String() }

func shortRev(r string) string {
	if len(r) > 12 {
		return r[:12]
	}
	return r
}

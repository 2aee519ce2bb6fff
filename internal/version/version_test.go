package version

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestStringParts(t *testing.T) {
	cases := []struct {
		in   Info
		want string
	}{
		{Info{Version: "v1.2.3", GoVersion: "go1.26"}, "v1.2.3 go1.26"},
		{Info{Version: "devel", Revision: "34e3d20abcdef0123", Modified: true, GoVersion: "go1.26"}, "devel (34e3d20abcde) +dirty go1.26"},
		{Info{Version: "v0.0.0-20261207011753-34e3d20abcde+dirty", Revision: "34e3d20abcdef0123", Modified: true, GoVersion: "go1.26"}, "v0.0.0-20261207011753-34e3d20abcde+dirty go1.26"},
	}
	for _, c := range cases {
		if got := c.in.String(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.in, got, c.want)
		}
	}
}

// TestStampedFromGit builds a tiny program in a fresh git repository and
// checks that Get reports that commit: the toolchain's VCS stamping is what
// make deb relies on.
func TestStampedFromGit(t *testing.T) {
	git, err := exec.LookPath("git")
	if err != nil {
		t.Fatal("git is needed: ", err)
	}
	src, err := os.ReadFile("version.go")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "version"), 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("version/version.go", string(src))
	write("go.mod", "module example.com/v\n\ngo 1.22\n")
	write("main.go", "package main\n\nimport (\n\t\"fmt\"\n\n\t\"example.com/v/version\"\n)\n\nfunc main() { fmt.Println(version.Get().Revision) }\n")
	runIn := func(name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@t", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@t")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	runIn(git, "init", "-q")
	runIn(git, "add", "-A")
	runIn(git, "commit", "-q", "-m", "x")
	head := runIn(git, "rev-parse", "HEAD")
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatal(err)
	}
	runIn(gobin, "build", "-buildvcs=true", "-o", "prog", ".")
	if got := runIn(filepath.Join(dir, "prog")); got != head {
		t.Fatalf("stamped revision %q, want %q", got, head)
	}
}

package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imagestore/agent/api"
	"imagestore/qcow2/qemutest"
)

// TestImagestoreFace: the imagestore face's own additions, run as the
// built binary (environment, exit codes) against a real agent.
func TestImagestoreFace(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	qemutest.Create(t, img, vsize, "")
	qemutest.IO(t, img, "write -P 0x5a 0 1M")
	env := []string{"IMAGESTORE_URL=" + s.url, "IMAGESTORE_AGENT_URL=" + s.agentURL}
	run := func(line string) (string, string, int) {
		t.Helper()
		return shellRun(t, env, cliBin+" "+line)
	}
	var pushed pushResult
	cases := []struct {
		name  string
		line  string
		code  int
		check func(t *testing.T, stdout, stderr string)
	}{
		{"-version", "-version", 0, func(t *testing.T, stdout, _ string) {
			if !strings.HasPrefix(stdout, "imagestore ") || !strings.Contains(stdout, "go1.") || strings.Count(stdout, "\n") != 1 {
				t.Fatalf("-version: %q", stdout)
			}
		}},
		{"push to $IMAGESTORE_URL", "-quiet push -json -name alpha " + img, 0, func(t *testing.T, stdout, _ string) {
			if err := json.Unmarshal([]byte(stdout), &pushed); err != nil || pushed.Name != "alpha" {
				t.Fatalf("push: %q %v", stdout, err)
			}
		}},
		{"second name", "-quiet push -name beta " + img, 0, nil},
		{"images without -name lists all", "-json images", 0, func(t *testing.T, stdout, _ string) {
			var r api.ListImagesReply
			if err := json.Unmarshal([]byte(stdout), &r); err != nil || len(r.Infos) != 2 {
				t.Fatalf("images: %q %v", stdout, err)
			}
		}},
		{"delete", "delete alpha:" + "{id}", 0, func(t *testing.T, stdout, _ string) {
			if !strings.HasPrefix(stdout, "deleted alpha:") {
				t.Fatalf("delete: %q", stdout)
			}
		}},
		{"deleted image is gone", "info alpha:{id}", 1, nil},
		{"images after delete", "-json images", 0, func(t *testing.T, stdout, _ string) {
			var r api.ListImagesReply
			if err := json.Unmarshal([]byte(stdout), &r); err != nil || len(r.Infos) != 1 || r.Infos[0].Name != "beta" {
				t.Fatalf("images: %q %v", stdout, err)
			}
		}},
		{"bad flag after the verb", "images -nosuch", 2, nil},
		{"bad flag before the verb", "-nosuch images", 2, nil},
		{"unknown verb", "frobnicate", 2, nil},
		{"zstcli-only verb", "list", 2, nil},
		{"missing image", "info alpha:00000000000000000000000000000000", 1, nil},
		{"help", "images -h", 0, nil},
	}
	for _, c := range cases {
		line := strings.ReplaceAll(c.line, "{id}", pushed.ID)
		stdout, stderr, code := run(line)
		if code != c.code {
			t.Fatalf("%s: imagestore %s: exit %d, want %d\nstdout: %s\nstderr: %s", c.name, line, code, c.code, stdout, stderr)
		}
		if code != 0 && strings.TrimSpace(stderr) == "" {
			t.Fatalf("%s: exit %d with nothing on stderr", c.name, code)
		}
		if c.check != nil {
			c.check(t, stdout, stderr)
		}
	}
}

// TestBashCompletion sources the generated script in a real bash and asks
// it to complete verbs and a verb's flags.
func TestBashCompletion(t *testing.T) {
	dir := t.TempDir()
	if err := os.Symlink(cliBin, filepath.Join(dir, "imagestore")); err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(dir, "completion.bash")
	out, err := exec.Command(cliBin, "completion", "bash").Output()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(script, out, 0o644); err != nil {
		t.Fatal(err)
	}
	complete := func(words ...string) []string {
		t.Helper()
		line := `source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _imagestore; printf '%s\n' "${COMPREPLY[@]}"`
		cmd := exec.Command("bash", append([]string{"-c", line, "bash", script}, words...)...)
		cmd.Env = append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"))
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", words, err, b)
		}
		return strings.Fields(string(b))
	}
	if got := complete("imagestore", "pu"); strings.Join(got, " ") != "push pull pullfromhost" {
		t.Fatalf("verbs for pu: %v", got)
	}
	got := strings.Join(complete("imagestore", "pull", "-inst"), " ")
	if got != "-installpath" {
		t.Fatalf("flags of pull for -inst: %q", got)
	}
	if got := strings.Join(complete("imagestore", "-ver"), " "); got != "-version" {
		t.Fatalf("global flags for -ver: %q", got)
	}
}

// TestHelpOfEveryVerb: -h of every verb of both faces exits 0 and prints
// its flags (the flag package renders each default, the wrapped booleans'
// included).
func TestHelpOfEveryVerb(t *testing.T) {
	for _, f := range []face{faceImagestore, faceZstcli} {
		for _, c := range append(commandsOf(f), command{name: ""}) {
			args := []string{"-h"}
			if c.name != "" {
				args = []string{c.name, "-h"}
			}
			out, errs, code := runFace(t, f, args...)
			if code != 0 || out != "" || strings.Contains(errs, "panic") || !strings.Contains(errs, "-json") {
				t.Errorf("%s %v: exit %d, stdout %q, stderr:\n%s", f, args, code, out, errs)
			}
		}
	}
}

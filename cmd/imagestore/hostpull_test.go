package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"imagestore/agent/api"
	"imagestore/qcow2/qemutest"
	"imagestore/transfer/sshtest"
)

// TestPullFromHost drives the real daemon through the CLI: a base and two
// deltas on a real sshd are pulled into the store (on local disk, and on
// S3), and the pulled top equals the host's chain.
func TestPullFromHost(t *testing.T) {
	for _, kind := range storageKinds {
		t.Run(kind, func(t *testing.T) { testPullFromHost(t, kind) })
	}
}

func testPullFromHost(t *testing.T, kind string) {
	s := startStoreOn(t, "tok", kind)
	srv := sshtest.Start(t)
	files := chainFixture(t)
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "id")
	if err := os.WriteFile(keyFile, srv.PrivateKey, 0o600); err != nil {
		t.Fatal(err)
	}
	g := []string{"-agent-url", s.agentURL, "-url", s.url, "-token", s.token, "-quiet"}
	host := func(extra ...string) []string {
		a := append(append([]string{}, g...), "pullfromhost", "-json", "-host", srv.Host, "-port", strconv.Itoa(srv.Port),
			"-user", srv.User, "-fingerprint", srv.Fingerprint)
		return append(a, extra...)
	}

	parent := ""
	for i, f := range files[:3] {
		args := host("-key-file", keyFile, "-path", f, "-parallelism", "3", "-volume-bwlimit", "512M")
		if parent == "" {
			args = append(args, "-name", "hostvol")
		} else {
			args = append(args, "-parent", parent)
		}
		var res pullFromHostResult
		cliJSON(t, &res, args...)
		if res.Name != "hostvol" || res.ID == "" || res.VirtualSize != vsize || res.Format != "qcow2" ||
			res.HostBytesRead <= 0 || !strings.HasPrefix(res.InstallPath, "zstore://hostvol/") {
			t.Fatalf("pullfromhost %d: %+v", i, res)
		}
		parent = res.Name + ":" + res.ID
		dst := filepath.Join(dir, "back.qcow2")
		cliOK(t, append(append([]string{}, g...), "pull", "-installpath", dst, parent)...)
		qemutest.Compare(t, dst, f)
	}

	// Failures are clear, and a password is never echoed.
	pwFile := filepath.Join(dir, "pw")
	const secret = "hunter2-not-printed"
	if err := os.WriteFile(pwFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, other := sshtest.GenKey(t)
	otherFile := filepath.Join(dir, "other")
	if err := os.WriteFile(otherFile, other, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"wrong password", host("-password-file", pwFile, "-path", files[0], "-name", "x"), 1, "refused"},
		{"unknown key", host("-key-file", otherFile, "-path", files[0], "-name", "x"), 1, "refused"},
		{"not qcow2", host("-key-file", keyFile, "-path", pwFile, "-name", "x"), 1, "not a qcow2"},
		{"pinned key differs", append(append([]string{}, g...), "pullfromhost", "-host", srv.Host, "-port", strconv.Itoa(srv.Port),
			"-user", srv.User, "-fingerprint", "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "-key-file", keyFile,
			"-path", files[0], "-name", "x"), 1, "host key"},
		{"no secret", host("-path", files[0], "-name", "x"), 2, "-key-file"},
		{"no name for a base", host("-key-file", keyFile, "-path", files[0]), 2, "-name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(envSSHPassword, "")
			t.Setenv(envSSHKeyFile, "")
			out, errs, code := cli(t, tc.args...)
			if code != tc.code || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d (want %d), stderr %q lacks %q", code, tc.code, errs, tc.want)
			}
			if strings.Contains(out+errs, secret) || strings.Contains(out+errs, "PRIVATE KEY") {
				t.Fatalf("a secret was printed: %s %s", out, errs)
			}
		})
	}
	// Nothing was recorded by the failed pulls.
	var imgs api.ListImagesReply
	cliJSON(t, &imgs, append(append([]string{}, g...), "images", "-json", "-name", "x")...)
	if len(imgs.Infos) != 0 {
		t.Fatalf("failed pulls recorded images: %+v", imgs.Infos)
	}
}

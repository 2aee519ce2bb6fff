package main

import (
	"os/exec"
	"strings"
	"testing"
)

// The CLI starts afresh for every live-backup call, so what its packages
// do at start-up is part of each incremental's fixed cost. It must not
// link the agent's metrics stack (through transfer/replicate): the
// package initialisation of Prometheus and protobuf alone took about
// 4 ms of CPU per start.
func TestCLIDoesNotLinkMetrics(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool to list the dependencies with")
	}
	out, err := exec.Command(gobin, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		for _, bad := range []string{"github.com/prometheus/", "google.golang.org/protobuf/", "imagestore/transfer/replicate"} {
			if strings.HasPrefix(p, bad) {
				t.Errorf("the CLI links %s", p)
			}
		}
	}
}

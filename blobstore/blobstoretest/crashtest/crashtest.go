// Package crashtest is the driver side of the blob stores' crash tests: it
// runs the test binary again as a child that writes until it is killed,
// and SIGKILLs it at a chosen moment. The child is the test binary's own
// TestMain, started when it finds the variables the driver sets; it prints
// "ready" on stdout once it has opened its store.
//
// It imports no blob store, so package blobstore's own tests may use it.
package crashtest

import (
	"bufio"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// KillChild starts os.Args[0] (running no test) with env added to the
// environment, waits up to startTimeout for its "ready" line, lets it run
// for delay, SIGKILLs it, and fails t unless the child died of that signal.
func KillChild(t testing.TB, env []string, startTimeout, delay time.Duration) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		ready <- strings.TrimSpace(line) == "ready"
	}()
	select {
	case ok := <-ready:
		if !ok {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal("child did not start")
		}
	case <-time.After(startTimeout):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("child start timed out")
	}
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	err = cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
		t.Fatalf("child exited on its own: %v", err)
	}
}

package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// detachedEnv marks the detached copy, which runs in the foreground.
const detachedEnv = "IMAGESTORE_DETACHED"

// detach starts this program again with the same arguments in its own
// session, stdin from /dev/null and stdout/stderr appended to logFile, and
// returns once it is started. zstack-ctl starts the store as
// `ps -e | grep zstore || zstore -conf F -logfile L` over SSH and expects
// that command to return; the init script of the ZStack installer starts it
// the same way.
func detach(args []string, logFile string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(logFile), 0o755); err != nil {
		return fmt.Errorf("-logfile: %w", err)
	}
	lf, err := os.OpenFile(logFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("-logfile: %w", err)
	}
	defer lf.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		return err
	}
	defer null.Close()
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), detachedEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	return cmd.Process.Release()
}

package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// sdNotify sends a state ("READY=1", "STOPPING=1", "WATCHDOG=1") to systemd
// over $NOTIFY_SOCKET, the sd_notify(3) datagram protocol. Without the
// variable (not under systemd) it does nothing.
func sdNotify(state string) error {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return nil
	}
	if sock[0] == '@' {
		sock = "\x00" + sock[1:] // abstract namespace
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

// watchdogInterval returns half of $WATCHDOG_USEC when the watchdog is
// enabled for this process, or 0.
func watchdogInterval() time.Duration {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0
	}
	return time.Duration(usec) * time.Microsecond / 2
}

// watchdog pings systemd every interval until ctx ends; healthy gates each
// ping so a wedged daemon gets restarted.
func watchdog(ctx context.Context, every time.Duration, healthy func() bool) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if healthy() {
				_ = sdNotify("WATCHDOG=1")
			}
		}
	}
}

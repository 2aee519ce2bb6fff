// Command ratebench measures how well transfer/ratelimit holds a limit on
// real loopback TCP streams sharing one Limiter: the rate over a window and
// the largest rate seen in any 250 ms window.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"imagestore/transfer/ratelimit"
)

const mib = 1 << 20

type event struct {
	at time.Duration
	n  int
}

func main() {
	window := flag.Duration("window", 10*time.Second, "measurement window per run")
	streamsF := flag.String("streams", "1,4,16", "comma-separated stream counts")
	limitsF := flag.String("limits", "5,20,80", "comma-separated limits in MiB/s")
	mode := flag.String("mode", "read", "read: limit the receiving side (ratelimit.Conn read); write: limit the sending side")
	flag.Parse()
	streams, err1 := ints(*streamsF)
	limits, err2 := ints(*limitsF)
	if err := errors.Join(err1, err2); err != nil || (*mode != "read" && *mode != "write") {
		fmt.Fprintln(os.Stderr, "ratebench: bad flags:", err, *mode)
		os.Exit(2)
	}
	fmt.Printf("mode=%s window=%v (targets: error within ±3%%, max-250ms/limit ≤ 1.25)\n", *mode, *window)
	fmt.Printf("%7s %12s %14s %8s %15s %s\n", "streams", "limit MiB/s", "measured MiB/s", "error %", "max-250ms/limit", "ok")
	fail := false
	for _, s := range streams {
		for _, l := range limits {
			rate, peak, err := run(s, int64(l)*mib, *window, *mode == "write")
			if err != nil {
				slog.Error("run failed", "streams", s, "limit", l, "err", err)
				os.Exit(1)
			}
			errPct := (rate/float64(int64(l)*mib) - 1) * 100
			ratio := peak / float64(int64(l)*mib)
			ok := errPct >= -3 && errPct <= 3 && ratio <= 1.25
			fail = fail || !ok
			fmt.Printf("%7d %12d %14.3f %+8.2f %15.3f %s\n", s, l, rate/mib, errPct, ratio, map[bool]string{true: "yes", false: "NO"}[ok])
		}
	}
	if fail {
		os.Exit(1)
	}
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad number %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// run moves data over `streams` loopback connections through one shared
// limiter for `window`, and returns the mean rate and the peak 250 ms rate
// (bytes/s), counted where the limiter hands bytes to the caller. It is
// one function on purpose: the listener, senders, sampler and teardown
// share one timeline, and reading it top to bottom is what a reviewer of
// the measurement needs.
func run(streams int, limit int64, window time.Duration, writeSide bool) (rate, peak float64, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, 0, err
	}
	defer ln.Close()
	// The far end of each connection is unlimited: it floods (read mode) or
	// drains (write mode).
	var far sync.WaitGroup
	far.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			far.Go(func() {
				defer c.Close()
				if writeSide {
					_, _ = io.Copy(io.Discard, c)
					return
				}
				buf := make([]byte, 256<<10)
				for {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			})
		}
	})
	conns := make([]net.Conn, streams)
	for i := range conns {
		if conns[i], err = net.Dial("tcp", ln.Addr().String()); err != nil {
			return 0, 0, err
		}
	}
	lim := ratelimit.New(limit)
	ctx, cancel := context.WithTimeout(context.Background(), window)
	defer cancel()
	start := time.Now()
	evs := make([][]event, streams)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			defer c.Close()
			_ = c.SetDeadline(start.Add(window)) // unblock a read stuck at the end
			var lc net.Conn
			if writeSide {
				lc = ratelimit.Conn(ctx, c, nil, lim)
			} else {
				lc = ratelimit.Conn(ctx, c, lim, nil)
			}
			buf := make([]byte, 32<<10)
			for {
				var n int
				var err error
				if writeSide {
					n, err = lc.Write(buf)
				} else {
					n, err = lc.Read(buf)
				}
				if at := time.Since(start); n > 0 && at <= window {
					evs[i] = append(evs[i], event{at, n})
				}
				if err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	_ = ln.Close()
	far.Wait()

	var all []event
	var total int64
	for _, e := range evs {
		all = append(all, e...)
		for _, x := range e {
			total += int64(x.n)
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].at < all[j].at })
	const w = 250 * time.Millisecond
	var best, sum int64
	j := 0
	for i := range all {
		for j < len(all) && all[j].at < all[i].at+w {
			sum += int64(all[j].n)
			j++
		}
		best = max(best, sum)
		sum -= int64(all[i].n)
	}
	return float64(total) / window.Seconds(), float64(best) / w.Seconds(), nil
}

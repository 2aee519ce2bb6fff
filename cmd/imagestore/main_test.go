package main

import (
	"strings"
	"sync"
	"testing"
	"time"

	"imagestore/internal/lockedbuf"
)

func TestParseBytes(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		err  bool
	}{
		{"", 0, false},
		{"0", 0, false},
		{"1048576", 1 << 20, false},
		{"10M", 10 << 20, false},
		{"10MiB", 10 << 20, false},
		{"1.5G", 3 << 29, false},
		{"512k", 512 << 10, false},
		{"7b", 7, false},
		{"-1", 0, true},
		{"ten", 0, true},
		{"10x", 0, true},
		{"1e30", 0, true},
	}
	for _, tc := range cases {
		got, err := parseBytes(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("parseBytes(%q) = %d, %v; want %d, err %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func FuzzParseBytes(f *testing.F) {
	for _, s := range []string{"10M", "1.5GiB", "0", "-3", "NaN", "inf", "9223372036854775807"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := parseBytes(s)
		if err == nil && v < 0 {
			t.Fatalf("parseBytes(%q) = %d", s, v)
		}
	})
}

// TestProgress: Add from many goroutines while the reporter draws (the
// race detector checks the sharing); terminal mode redraws with \r and
// ends with a newline, plain mode prints whole lines, -quiet nothing.
func TestProgress(t *testing.T) {
	for _, mode := range []string{"tty", "plain", "quiet"} {
		t.Run(mode, func(t *testing.T) {
			var buf lockedbuf.Buffer
			tty := mode == "tty"
			g := &globals{stderr: &buf, tty: &tty, quiet: mode == "quiet"}
			p := g.newProgress("push", 1000)
			var wg sync.WaitGroup
			for range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range 100 {
						p.Add(1)
					}
				}()
			}
			wg.Wait()
			if tty {
				time.Sleep(250 * time.Millisecond) // at least one redraw (not asserted: timing)
			}
			p.Done()
			p.Done() // idempotent
			out := buf.String()
			switch mode {
			case "quiet":
				if out != "" {
					t.Fatalf("quiet printed %q", out)
				}
			case "tty":
				if !strings.Contains(out, "\r") || !strings.HasSuffix(out, "\n") || !strings.Contains(out, "80.0%") || !strings.Contains(out, "[") {
					t.Fatalf("tty output %q", out)
				}
			case "plain":
				if strings.Contains(out, "\r") || !strings.Contains(out, "push") || !strings.Contains(out, "800 B/1000 B") {
					t.Fatalf("plain output %q", out)
				}
			}
		})
	}
}

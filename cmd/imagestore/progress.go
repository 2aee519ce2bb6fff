package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/term"
)

// progress reports bytes, rate and ETA on stderr: a redrawn bar on a
// terminal, a plain line every few seconds otherwise, nothing with -quiet.
// Add is safe from any goroutine (uploads call it from their senders);
// only the reporter goroutine writes to the output.
type progress struct {
	label string
	total atomic.Int64 // 0 = unknown
	done  atomic.Int64
	start time.Time
	w     io.Writer
	tty   bool

	running bool // a reporter goroutine was started (not -quiet)

	// pct, when set (-progress FILE), gets this phase's share of the whole
	// command: done/total mapped into lo..hi percent.
	pct    *pctFile
	lo, hi int

	stop chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

func (g *globals) newProgress(label string, total int64) *progress {
	return g.newPhase(label, total, 0, 0)
}

// newPhase is newProgress for a phase that is lo..hi percent of the whole
// command in the -progress file (lo == hi: the phase reports nothing there).
func (g *globals) newPhase(label string, total int64, lo, hi int) *progress {
	p := &progress{label: label, start: time.Now(), w: g.stderr, stop: make(chan struct{}), lo: lo, hi: hi}
	if hi > lo {
		p.pct = g.pct
		_ = p.pct.report(lo)
	}
	p.total.Store(total)
	if g.quiet {
		return p
	}
	switch {
	case g.tty != nil:
		p.tty = *g.tty
	default:
		if f, ok := g.stderr.(*os.File); ok {
			p.tty = term.IsTerminal(int(f.Fd()))
		}
	}
	every := 5 * time.Second
	if p.tty {
		every = 200 * time.Millisecond
	}
	p.running = true
	p.wg.Add(1)
	go p.loop(every)
	return p
}

// Add counts n more bytes (negative after a resume rewinds).
func (p *progress) Add(n int64) {
	done := p.done.Add(n)
	if p.pct == nil {
		return
	}
	if total := p.total.Load(); total > 0 && done > 0 {
		_ = p.pct.report(p.lo + int(int64(p.hi-p.lo)*min(done, total)/total))
	}
}

// SetTotal changes the expected total (0 = unknown).
func (p *progress) SetTotal(n int64) { p.total.Store(n) }

func (p *progress) loop(every time.Duration) {
	defer p.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
			p.draw(false)
		}
	}
}

// Done stops the reporter and prints a final line (once).
func (p *progress) Done() {
	p.once.Do(func() {
		close(p.stop)
		p.wg.Wait()
		if p.running {
			p.draw(true)
		}
	})
}

func (p *progress) draw(final bool) {
	done, total := p.done.Load(), p.total.Load()
	el := time.Since(p.start)
	rate := 0.0
	if s := el.Seconds(); s > 0 {
		rate = float64(done) / s
	}
	var b strings.Builder
	b.WriteString(p.label)
	b.WriteString(" ")
	if total > 0 {
		frac := min(max(float64(done)/float64(total), 0), 1)
		if p.tty {
			const width = 30
			n := int(frac * width)
			b.WriteString("[" + strings.Repeat("=", n) + strings.Repeat(" ", width-n) + "] ")
		}
		fmt.Fprintf(&b, "%5.1f%% %s/%s", frac*100, human(done), human(total))
	} else {
		b.WriteString(human(done))
	}
	fmt.Fprintf(&b, " %s/s", human(int64(rate)))
	if total > 0 && !final && rate > 0 && done < total {
		eta := time.Duration(float64(total-done) / rate * float64(time.Second))
		fmt.Fprintf(&b, " ETA %s", eta.Round(time.Second))
	}
	if final {
		fmt.Fprintf(&b, " in %s", el.Round(100*time.Millisecond))
	}
	if p.tty {
		end := ""
		if final {
			end = "\n"
		}
		fmt.Fprintf(p.w, "\r\x1b[K%s%s", b.String(), end)
		return
	}
	fmt.Fprintln(p.w, b.String())
}

func human(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	f := float64(n)
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB"} {
		f /= unit
		if f < unit && f > -unit {
			return fmt.Sprintf("%.1f %s", f, u)
		}
	}
	return fmt.Sprintf("%.1f PiB", f/unit)
}

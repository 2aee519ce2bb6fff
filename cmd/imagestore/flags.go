package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
)

// pyBool wraps a boolean flag so it also takes the values a Python caller
// formats: True/False (strconv already does) and None (an absent value),
// read as false.
type pyBool struct{ flag.Value }

func (b pyBool) IsBoolFlag() bool { return true }

// String also serves the zero pyBool the flag package makes to print defaults.
func (b pyBool) String() string {
	if b.Value == nil {
		return "false"
	}
	return b.Value.String()
}

func (b pyBool) Set(s string) error {
	if s == "None" || s == "none" {
		s = "false"
	}
	return b.Value.Set(s)
}

// pyBools makes every boolean flag of fs a pyBool (idempotent), so verbs
// defined anywhere take -f=None without knowing about it.
func pyBools(fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		if _, done := f.Value.(pyBool); done {
			return
		}
		if bf, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && bf.IsBoolFlag() {
			f.Value = pyBool{f.Value}
		}
	})
}

// stageFlag is -stage A-B: reported percentages are scaled into A..B.
type stageFlag struct {
	set    bool
	lo, hi int
}

func (s *stageFlag) String() string {
	if s == nil || !s.set {
		return ""
	}
	return fmt.Sprintf("%d-%d", s.lo, s.hi)
}

func (s *stageFlag) Set(v string) error {
	a, b, ok := strings.Cut(strings.TrimSpace(v), "-")
	lo, err1 := strconv.Atoi(strings.TrimSpace(a))
	hi, err2 := strconv.Atoi(strings.TrimSpace(b))
	if !ok || err1 != nil || err2 != nil || lo < 0 || hi > 100 || lo > hi {
		return fmt.Errorf("want A-B with 0 <= A <= B <= 100, got %q", v)
	}
	*s = stageFlag{set: true, lo: lo, hi: hi}
	return nil
}

// scale maps p (0..100) into the stage.
func (s stageFlag) scale(p int) int {
	p = min(max(p, 0), 100)
	if !s.set {
		return p
	}
	return s.lo + (s.hi-s.lo)*p/100
}

// pctFile is -progress FILE: integer percentages (digits only), one per
// line, appended whenever the whole-number value rises. The caller tails
// the last line.
type pctFile struct {
	path  string
	stage stageFlag

	mu   sync.Mutex
	last int // last value written (after scaling); -1 before the first
	init bool
}

// report appends p (0..100, before -stage scaling) unless it would not rise.
func (f *pctFile) report(p int) error {
	if f == nil {
		return nil
	}
	v := f.stage.scale(p)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.init && v <= f.last {
		return nil
	}
	fh, err := os.OpenFile(f.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("-progress: %w", err)
	}
	_, err = fmt.Fprintf(fh, "%d\n", v)
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("-progress: %w", err)
	}
	f.init, f.last = true, v
	return nil
}

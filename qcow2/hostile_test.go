package qcow2

import (
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"imagestore/qcow2/hostile"
)

// TestHostileBudgets opens the hostile corpus's costly files (made by
// qcow2/hostile, synthesized on the fly): each is refused by Open with a
// FormatError naming the budget or rule, before the work it would cost,
// with allocations under the stated ceiling.
func TestHostileBudgets(t *testing.T) {
	cases := []struct {
		f        *hostile.File
		want     string // in the error
		maxAlloc uint64 // bytes allocated by Open
	}{
		// 96 MiB of L2 tables: over the metadata budget, refused from the L1
		// table alone (1.5 MiB), no L2 table read.
		{hostile.SharedRun(196608), "metadata budget", 8 << 20},
		// 48 MiB of L2 tables, within the budget: every table is read once
		// (48 MiB), then the shared run is refused.
		{hostile.SharedRun(98304), "more than one L2 entry", 4 * 48 << 20},
		{hostile.SharedRun(1), "more than one L2 entry", 1 << 20},
		// 1024 distinct runs of one 70-byte zstd frame, 2 GiB of output.
		{hostile.RatioBomb(1024), "decompression budget", 16 << 20},
	}
	for _, tc := range cases {
		t.Run(tc.f.Name, func(t *testing.T) {
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			start := time.Now()
			_, err := Open(tc.f, tc.f.Size)
			elapsed := time.Since(start)
			runtime.ReadMemStats(&after)
			var fe *FormatError
			if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open = %v, want a FormatError about %q", err, tc.want)
			}
			t.Logf("%v (%v, %d bytes allocated)", err, elapsed, after.TotalAlloc-before.TotalAlloc)
			if d := after.TotalAlloc - before.TotalAlloc; d > tc.maxAlloc {
				t.Errorf("allocated %d bytes, ceiling %d", d, tc.maxAlloc)
			}
		})
	}
}

// TestBudgetsAdmitWhatTheyState: a bomb just inside the decompression
// floor opens, so the budget is the stated one and not stricter.
func TestBudgetsAdmitWhatTheyState(t *testing.T) {
	f := hostile.RatioBomb(MinDecompressBudget / (2 << 20))
	if _, err := Open(f, f.Size); err != nil {
		t.Fatalf("%d MiB of compressed output (the floor) refused: %v", MinDecompressBudget>>20, err)
	}
	if got := MetadataBudget(1 << 40); got != 1<<40/512 {
		t.Fatalf("MetadataBudget(1 TiB) = %d", got)
	}
}

package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// TestPIDFile: the file holds our pid; removal leaves a file that another
// daemon has rewritten since.
func TestPIDFile(t *testing.T) {
	for _, tc := range []struct {
		name      string
		overwrite string // written after ours; "" = none
		wantGone  bool
	}{
		{"ours", "", true},
		{"another daemon's", "4194304\n", false},
		{"garbage", "zstore\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "run", "zstore.pid")
			if err := writePIDFile(path); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(path)
			if err != nil || string(b) != strconv.Itoa(os.Getpid())+"\n" {
				t.Fatalf("pid file %q, %v; want our pid %d", b, err, os.Getpid())
			}
			if tc.overwrite != "" {
				if err := os.WriteFile(path, []byte(tc.overwrite), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			removePIDFile(path, slog.New(slog.DiscardHandler))
			_, err = os.Stat(path)
			if gone := os.IsNotExist(err); gone != tc.wantGone {
				t.Fatalf("removed: %v, want %v (stat: %v)", gone, tc.wantGone, err)
			}
		})
	}
}

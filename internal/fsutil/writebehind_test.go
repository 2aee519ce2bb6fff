package fsutil

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// Every byte written through a WriteBehind reaches the file, and its
// write-back was started by the time Close returns (the final fsync then
// has nothing left to start), whatever order the writes came in.
func TestWriteBehind(t *testing.T) {
	const piece, n = 1 << 20, 9
	want := make([]byte, piece*n)
	for i := range want {
		want[i] = byte(rand.Uint32())
	}
	for _, tc := range []struct {
		name   string
		window int64
		write  func(w *WriteBehind) error
	}{
		{"Write in order", piece, func(w *WriteBehind) error {
			for i := range n {
				if _, err := w.Write(want[i*piece : (i+1)*piece]); err != nil {
					return err
				}
			}
			return nil
		}},
		{"WriteAt shuffled, from goroutines", 3 * piece, func(w *WriteBehind) error {
			var wg sync.WaitGroup
			errs := make([]error, n)
			for _, i := range rand.Perm(n) {
				wg.Go(func() {
					_, errs[i] = w.WriteAt(want[i*piece:(i+1)*piece], int64(i*piece))
				})
			}
			wg.Wait()
			for _, err := range errs {
				if err != nil {
					return err
				}
			}
			return nil
		}},
		{"window larger than the file", 64 * piece, func(w *WriteBehind) error {
			_, err := w.WriteAt(want, 0)
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "f")
			f, err := os.Create(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			w := NewWriteBehind(f, tc.window)
			if err := tc.write(w); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if got := w.Started(); got != int64(len(want)) {
				t.Errorf("write-back started for %d bytes, want %d", got, len(want))
			}
			if err := w.Close(); err != nil { // twice is harmless
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("file content differs from what was written")
			}
		})
	}
}

// A file the kernel cannot write back by range (a pipe) is written as
// usual; the write-back is simply not started.
func TestWriteBehindUnsupported(t *testing.T) {
	r, wf, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	done := make(chan []byte)
	go func() {
		var b bytes.Buffer
		_, _ = b.ReadFrom(r)
		done <- b.Bytes()
	}()
	w := NewWriteBehind(wf, 4096)
	want := bytes.Repeat([]byte("imagestore"), 10000)
	for i := 0; i < len(want); i += 1000 {
		if _, err := w.Write(want[i : i+1000]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got := w.Started(); got != 0 {
		t.Errorf("write-back started for %d bytes of a pipe", got)
	}
	wf.Close()
	if got := <-done; !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes from the pipe, want %d", len(got), len(want))
	}
}

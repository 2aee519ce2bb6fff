package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// TestConcurrentReadAt: ReadAt is safe for concurrent use, including the
// shared decompressed-cluster cache and the parallel inflation of whole
// compressed clusters.
func TestConcurrentReadAt(t *testing.T) {
	for _, name := range []string{"valid", "valid-zlib", "valid-zstd"} {
		b, err := os.ReadFile(filepath.Join("testdata/corpus", name+".qcow2"))
		if err != nil {
			t.Fatal(err)
		}
		im, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, im.VirtualSize())
		if _, err := im.ReadAt(want, 0); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan string, 8)
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				// Odd goroutines read whole clusters (a compressed one is
				// inflated straight into p, in parallel), even ones read
				// pieces that cut clusters (through the shared cache).
				p, start := make([]byte, 700+g*37), int64(g*13)
				if g%2 == 1 {
					p, start = make([]byte, im.ClusterSize()*int64(1+g/2)), im.ClusterSize()*int64(g/2)
				}
				for off := start; off < im.VirtualSize(); off += int64(len(p)) {
					n, _ := im.ReadAt(p, off)
					if !bytes.Equal(p[:n], want[off:off+int64(n)]) {
						errs <- name
						return
					}
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		for e := range errs {
			t.Fatalf("%s: concurrent reads disagree", e)
		}
	}
}

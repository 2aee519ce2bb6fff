package qcow2

import (
	"io"
	"path/filepath"
	"testing"

	"imagestore/qcow2/qemutest"
)

// BenchmarkReadAt streams the guest view of a 64 MiB fully allocated image
// (64 KiB clusters) and of its zstd-compressed copy.
func BenchmarkReadAt(b *testing.B) {
	const size = 64 << 20
	dir := b.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	qemutest.Create(b, p, size, "")
	qemutest.IO(b, p, "write -P 0x5c 0 64m")
	z := filepath.Join(dir, "z.qcow2")
	qemutest.Convert(b, "-c", "-O", "qcow2", "-o", "compression_type=zstd", p, z)
	for _, path := range []string{p, z} {
		b.Run(filepath.Base(path), func(b *testing.B) {
			im := openFile(b, path)
			buf := make([]byte, 1<<20)
			b.SetBytes(size)
			for b.Loop() {
				if _, err := io.CopyBuffer(io.Discard, io.NewSectionReader(im, 0, size), buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

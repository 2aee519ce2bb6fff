package blobstore

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFullDisk ingests more than fits into an 8 MiB tmpfs and a 16 MiB
// ext4 (a disk's file system: delayed allocation, ENOSPC at write or at
// fsync).
func TestFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: mounting a small file system needs root (running as uid", os.Geteuid(), ")")
	}
	for _, fs := range []string{"tmpfs", "ext4"} {
		t.Run(fs, func(t *testing.T) {
			mnt := filepath.Join(t.TempDir(), "mnt")
			os.Mkdir(mnt, 0o755)
			switch fs {
			case "tmpfs":
				if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=8m"); err != nil {
					t.Fatalf("mount tmpfs: %v", err)
				}
			case "ext4":
				img := filepath.Join(t.TempDir(), "ext4.img")
				if err := os.WriteFile(img, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Truncate(img, 16<<20); err != nil {
					t.Fatal(err)
				}
				if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
					t.Fatalf("mkfs.ext4: %v %s", err, out)
				}
				if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
					t.Fatalf("mount -o loop: %v %s", err, out)
				}
			}
			t.Cleanup(func() {
				if err := unix.Unmount(mnt, 0); err != nil {
					t.Errorf("unmount %s: %v", mnt, err)
				}
			})
			testFullDisk(t, mnt)
		})
	}
}

func testFullDisk(t *testing.T, mnt string) {
	ctx := context.Background()
	s := openStore(t, mnt)
	localOf(s).checkpointEvery = 1 << 20
	keep := mustPut(t, s, content(60, 3<<20))
	cases := []struct {
		name string
		run  func() error
	}{
		{"put", func() error {
			_, _, err := s.Put(ctx, bytesReader(content(61, 16<<20)), -1, "")
			return err
		}},
		{"writer small writes", func() error {
			w, err := s.Writer(ctx, "small")
			if err != nil {
				return err
			}
			defer w.Cancel()
			data := content(62, 16<<20)
			for off := 0; off < len(data); off += 10_000 {
				if _, err := w.Write(data[off:min(off+10_000, len(data))]); err != nil {
					fi, serr := os.Stat(filepath.Join(mnt, dirIngest, "small", ingestData))
					if serr != nil || fi.Size() != w.Offset() {
						t.Errorf("after ENOSPC: offset %d, data file %v %v", w.Offset(), fi.Size(), serr)
					}
					return err
				}
			}
			return nil
		}},
		{"writer 4 MiB writes", func() error {
			w, err := s.Writer(ctx, "large")
			if err != nil {
				return err
			}
			defer w.Cancel()
			data := content(64, 16<<20) // page-aligned: a large allocation
			for off := 0; off < len(data); off += 4 << 20 {
				if _, err := w.Write(data[off : off+4<<20]); err != nil {
					fi, serr := os.Stat(filepath.Join(mnt, dirIngest, "large", ingestData))
					if serr != nil || fi.Size() != w.Offset() {
						t.Errorf("after ENOSPC: offset %d, data file %v %v", w.Offset(), fi.Size(), serr)
					}
					return err
				}
			}
			return nil
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "no space") {
				t.Fatalf("err = %v, want ErrNoSpace", err)
			}
			t.Logf("got: %v", err)
			// Consistent: the old blob verifies, nothing half-written, accounting right.
			if rep, err := s.Verify(ctx, 0); err != nil || rep.Checked != 1 || len(rep.Corrupt) != 0 {
				t.Fatalf("verify: %+v %v", rep, err)
			}
			if err := s.VerifyBlob(ctx, keep); err != nil {
				t.Fatal(err)
			}
			if c, _ := s.Capacity(); c.Used != 3<<20 || c.Blobs != 1 {
				t.Fatalf("capacity %+v", c)
			}
			if ents, _ := os.ReadDir(filepath.Join(mnt, dirIngest)); len(ents) != 0 {
				t.Fatalf("ingest left behind: %v", ents)
			}
			// And the space is usable again.
			d := mustPut(t, s, content(63, 1<<20))
			if err := s.VerifyBlob(ctx, d); err != nil {
				t.Fatal(err)
			}
			p, _ := s.BlobPath(d)
			os.Remove(p)
			s.release(1 << 20)
			s.mu.Lock()
			s.blobs--
			s.mu.Unlock()
		})
	}
	s2 := openStore(t, mnt)
	if c, _ := s2.Capacity(); c.Used != 3<<20 {
		t.Fatalf("after reopen: %+v", c)
	}
}

// TestMemoryFlat: ingest allocates a fixed amount whatever the blob size.
func TestMemoryFlat(t *testing.T) {
	s := newStore(t)
	localOf(s).checkpointEvery = 8 << 20
	ctx := context.Background()
	alloc := func(size int64) uint64 {
		var a, b runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&a)
		if _, n, err := s.Put(ctx, &patternReader{left: size}, size, ""); err != nil || n != size {
			t.Fatalf("put: %d %v", n, err)
		}
		runtime.ReadMemStats(&b)
		return b.TotalAlloc - a.TotalAlloc
	}
	alloc(1 << 20) // warm the buffer pool
	small, big := alloc(8<<20), alloc(128<<20)
	t.Logf("allocated %d bytes for 8 MiB, %d for 128 MiB", small, big)
	if big > 4<<20 {
		t.Fatalf("ingesting 128 MiB allocated %d bytes", big)
	}
}

var pattern = content(99, 64<<10)

// patternReader yields size bytes of a cheap non-constant pattern.
type patternReader struct {
	left int64
	n    byte
}

func (r *patternReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, errEOF
	}
	p = p[:min(int64(len(p)), r.left)]
	for i := 0; i < len(p); i += len(pattern) {
		copy(p[i:], pattern)
		p[i] = r.n // every chunk differs, so no block repeats exactly
		r.n++
	}
	r.left -= int64(len(p))
	return len(p), nil
}

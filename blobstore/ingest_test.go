package blobstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestLocked(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	w, err := s.Writer(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Writer(ctx, "r"); !errors.Is(err, ErrLocked) {
		t.Fatalf("second writer: %v, want ErrLocked", err)
	}
	w.Close()
	w2, err := s.Writer(ctx, "r")
	if err != nil {
		t.Fatalf("after close: %v", err)
	}
	w2.Cancel()
}

// TestResume cuts an ingest at many offsets, cleanly (Close) or not (the
// descriptor just goes away, like a killed process), optionally reopens
// the store, and checks the next Writer resumes at the durable offset and
// the committed digest is right.
func TestResume(t *testing.T) {
	const ckpt = 4096
	data := content(3, 10*ckpt+123)
	want := digestOf(data)
	type cut struct {
		at      int
		clean   bool
		reopen  bool
		garbage bool // bytes past the checkpoint that must be discarded
	}
	var cases []cut
	for _, at := range []int{0, 1, ckpt - 1, ckpt, ckpt + 1, 3*ckpt + 17, 7 * ckpt, len(data) - 1, len(data)} {
		for _, clean := range []bool{true, false} {
			for _, reopen := range []bool{false, true} {
				cases = append(cases, cut{at, clean, reopen, !clean && reopen}) // garbage only from a dead process
			}
		}
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("at=%d/clean=%v/reopen=%v", tc.at, tc.clean, tc.reopen), func(t *testing.T) {
			root := t.TempDir()
			s := openStore(t, root)
			localOf(s).checkpointEvery = ckpt
			ctx := context.Background()
			w, err := s.Writer(ctx, "vol-1")
			if err != nil {
				t.Fatal(err)
			}
			// Odd-sized writes so checkpoints fall mid-write.
			for off := 0; off < tc.at; {
				n := min(1000, tc.at-off)
				if _, err := w.Write(data[off : off+n]); err != nil {
					t.Fatal(err)
				}
				off += n
			}
			wantOff := int64(tc.at)
			if tc.clean {
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				li := w.in.(*localIngest)
				li.waitCheckpoint()
				li.f.Close() // killed: no final checkpoint
				wantOff = li.durable
				if tc.garbage {
					f, _ := os.OpenFile(filepath.Join(root, dirIngest, "vol-1", ingestData), os.O_WRONLY|os.O_APPEND, 0)
					f.Write([]byte("garbage that was never checkpointed"))
					f.Close()
				}
			}
			if tc.reopen {
				s = openStore(t, root)
				localOf(s).checkpointEvery = ckpt
			}
			off, err := s.IngestOffset("vol-1")
			if err != nil || off != wantOff {
				t.Fatalf("IngestOffset = %d, %v; want %d", off, err, wantOff)
			}
			w, err = s.Writer(ctx, "vol-1")
			if err != nil {
				t.Fatal(err)
			}
			if w.Offset() != wantOff {
				t.Fatalf("resumed at %d, want %d", w.Offset(), wantOff)
			}
			if _, err := w.Write(data[w.Offset():]); err != nil {
				t.Fatal(err)
			}
			d, err := w.Commit(ctx, int64(len(data)), want)
			if err != nil {
				t.Fatalf("Commit after resume: %v", err)
			}
			if d != want {
				t.Fatalf("digest %s", d)
			}
			if c, _ := s.Capacity(); c.Used != int64(len(data)) {
				t.Fatalf("Used = %d, want %d", c.Used, len(data))
			}
		})
	}
}

// TestResumeBadState: an unusable checkpoint restarts the ingest from zero
// rather than trusting it.
func TestResumeBadState(t *testing.T) {
	cases := map[string]func(dir string){
		"torn state": func(dir string) {
			os.WriteFile(filepath.Join(dir, ingestStateFile), []byte(`{"version":1,"off`), 0o644)
		},
		"state beyond data":    func(dir string) { os.Truncate(filepath.Join(dir, ingestData), 10) },
		"state without data":   func(dir string) { os.Remove(filepath.Join(dir, ingestData)) },
		"offset/hash disagree": func(dir string) { rewriteState(dir, func(st *ingestState) { st.Offset -= 64 }) },
	}
	for name, damage := range cases {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			s := openStore(t, root)
			localOf(s).checkpointEvery = 1024
			ctx := context.Background()
			data := content(4, 5000)
			w, _ := s.Writer(ctx, "x")
			w.Write(data)
			w.Close()
			damage(filepath.Join(root, dirIngest, "x"))
			s = openStore(t, root)
			w, err := s.Writer(ctx, "x")
			if err != nil {
				t.Fatal(err)
			}
			if w.Offset() != 0 {
				t.Fatalf("resumed at %d from a damaged checkpoint", w.Offset())
			}
			w.Write(data)
			if _, err := w.Commit(ctx, int64(len(data)), digestOf(data)); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func rewriteState(dir string, f func(*ingestState)) {
	b, _ := os.ReadFile(filepath.Join(dir, ingestStateFile))
	st, _, err := parseIngestState(b)
	if err != nil {
		panic(err)
	}
	f(&st)
	b, _ = marshalJSON(st)
	os.WriteFile(filepath.Join(dir, ingestStateFile), b, 0o644)
}

func TestExpiredIngests(t *testing.T) {
	root := t.TempDir()
	s := openStore(t, root)
	ctx := context.Background()
	for _, ref := range []string{"old", "fresh", "busy"} {
		w, _ := s.Writer(ctx, ref)
		w.Write(content(10, 100))
		w.Close()
	}
	busy, _ := s.Writer(ctx, "busy")
	defer busy.Cancel()
	past := time.Now().Add(-48 * time.Hour)
	for _, ref := range []string{"old", "busy"} {
		dir := filepath.Join(root, dirIngest, ref)
		for _, p := range []string{dir, filepath.Join(dir, ingestData), filepath.Join(dir, ingestStateFile)} {
			os.Chtimes(p, past, past)
		}
	}
	res, err := s.GC(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.IngestsRemoved != 1 {
		t.Fatalf("removed %d ingests, want 1", res.IngestsRemoved)
	}
	for ref, want := range map[string]bool{"old": false, "fresh": true, "busy": true} {
		_, err := s.IngestOffset(ref)
		if (err == nil) != want {
			t.Errorf("%s present = %v, want %v", ref, err == nil, want)
		}
	}
	if c, _ := s.Capacity(); c.Used != 200 {
		t.Fatalf("Used = %d, want 200", c.Used)
	}
	// Open cleans too.
	dir := filepath.Join(root, dirIngest, "fresh")
	for _, p := range []string{dir, filepath.Join(dir, ingestData), filepath.Join(dir, ingestStateFile)} {
		os.Chtimes(p, past, past)
	}
	s2 := openStore(t, root)
	if _, err := s2.IngestOffset("fresh"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired ingest survived Open: %v", err)
	}
}

// residentPages counts the page-cache pages of the file at path (mincore).
func residentPages(t *testing.T, path string) (resident, total int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	for _, v := range vec {
		if v&1 != 0 {
			resident++
		}
	}
	return resident, len(vec)
}

// An ingest drops its pages from the page cache once they are durable, so
// a backup stream does not fill the cache (see dropCache).
func TestIngestDropsPageCache(t *testing.T) {
	root := t.TempDir()
	var sfs unix.Statfs_t
	if err := unix.Statfs(root, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Type == unix.TMPFS_MAGIC {
		t.Skip("TMPDIR is a tmpfs, whose pages cannot be dropped; run with TMPDIR on a disk filesystem")
	}
	// Not a multiple of the checkpoint interval: Commit drops the tail.
	data := content(7, 8<<20+512<<10)

	// Control: a file written plainly stays cached, so mincore can see it.
	plain := filepath.Join(root, "plain")
	if err := os.WriteFile(plain, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if res, total := residentPages(t, plain); res < total/2 {
		t.Skipf("control file: %d of %d pages resident right after writing it; this filesystem or memory state cannot show cached pages", res, total)
	}

	s := openStore(t, filepath.Join(root, "store"))
	localOf(s).checkpointEvery = 1 << 20
	w, err := s.Writer(context.Background(), "dropcache")
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 256 << 10 {
		if _, err := w.Write(data[off : off+256<<10]); err != nil {
			t.Fatal(err)
		}
	}
	// Mid-ingest: the checkpoints so far have dropped the first MiB.
	if err := w.in.(*localIngest).waitCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if res, _ := residentPages(t, filepath.Join(w.in.(*localIngest).dir, ingestData)); res > (len(data)-(1<<20))/os.Getpagesize() {
		t.Errorf("mid-ingest: %d pages resident, want the checkpointed MiB dropped", res)
	}
	d, err := w.Commit(context.Background(), int64(len(data)), "")
	if err != nil {
		t.Fatal(err)
	}
	if res, total := residentPages(t, localOf(s).blobPath(d)); res > 1 {
		t.Errorf("committed blob: %d of %d pages still cached, want them dropped", res, total)
	}
	got, err := os.ReadFile(localOf(s).blobPath(d))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("blob content after dropping its pages: equal=%v err=%v", bytes.Equal(got, data), err)
	}
}

// A failed fsync is sticky: Linux reports a writeback error once, and a
// later fsync succeeds although the failed pages never reached the disk.
// So after one, Commit fails, no checkpoint claims the suspect bytes, and a
// new Writer resumes from the last good checkpoint to a correct blob.
func TestIngestSyncFailureIsSticky(t *testing.T) {
	s := newStore(t)
	localOf(s).checkpointEvery = 1 << 20
	var syncs atomic.Int32
	localOf(s).syncFile = func(f *os.File) error {
		if syncs.Add(1) == 2 {
			return syscall.EIO // the second checkpoint's fsync
		}
		return f.Sync()
	}
	data := content(11, 4<<20+4096)
	w, err := s.Writer(context.Background(), "syncfail")
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 256 << 10 {
		if _, err := w.Write(data[off:min(len(data), off+256<<10)]); err != nil && !errors.Is(err, syscall.EIO) {
			t.Fatal(err)
		}
	}
	_, err = w.Commit(context.Background(), int64(len(data)), digestOf(data))
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "not trusted") {
		t.Fatalf("Commit after a failed fsync = %v, want the EIO, saying the data is not trusted", err)
	}
	if n := countBlobs(t, s); n != 0 {
		t.Fatalf("%d blobs after a failed fsync, want none", n)
	}

	// A caller that gives up cancels: the ingest goes, with its quota.
	usedBefore := s.used
	w2, err := s.Writer(context.Background(), "syncfail2")
	if err != nil {
		t.Fatal(err)
	}
	syncs.Store(1) // the next fsync (Commit's) fails
	if _, err := w2.Write(data[:8192]); err != nil {
		t.Fatal(err)
	}
	if _, err := w2.Commit(context.Background(), 8192, ""); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Commit with a failing fsync = %v, want EIO", err)
	}
	if err := w2.Cancel(); err != nil {
		t.Fatalf("Cancel after a failed Commit: %v", err)
	}
	if _, err := os.Stat(localOf(s).ingestDir("syncfail2")); !os.IsNotExist(err) {
		t.Fatalf("ingest still on disk after Cancel of a failed Commit: %v", err)
	}
	if s.used != usedBefore {
		t.Fatalf("used %d after Cancel, want %d as before the ingest", s.used, usedBefore)
	}

	localOf(s).syncFile = (*os.File).Sync
	w, err = s.Writer(context.Background(), "syncfail")
	if err != nil {
		t.Fatal(err)
	}
	if got := w.Offset(); got != 1<<20 {
		t.Fatalf("resumed at %d, want the last good checkpoint %d", got, 1<<20)
	}
	if _, err := w.Write(data[w.Offset():]); err != nil {
		t.Fatal(err)
	}
	d, err := w.Commit(context.Background(), int64(len(data)), digestOf(data))
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(localOf(s).blobPath(d))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("blob after resume: equal=%v err=%v", bytes.Equal(got, data), err)
	}
}

package blobstore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore/blobstoretest/crashtest"
)

const (
	envCrashRoot  = "BLOBSTORE_CRASH_CHILD_ROOT"
	envCrashStart = "BLOBSTORE_CRASH_CHILD_START"
	crashLog      = "committed.log"
)

func TestMain(m *testing.M) {
	if root := os.Getenv(envCrashRoot); root != "" {
		crashChild(root)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// crashContent is what the child ingests under ref c-<i>; the parent
// regenerates it to finish an interrupted ingest.
func crashContent(i int) []byte {
	return content(uint64(i), 1+int(uint64(i)*7919%300_000))
}

// crashChild ingests and commits forever until SIGKILLed. Every third
// ingest is cut (Close) halfway and resumed by a new Writer.
func crashChild(root string) {
	start, _ := strconv.Atoi(os.Getenv(envCrashStart))
	ctx := context.Background()
	s, err := Open(ctx, Options{Root: root, CheckpointEvery: 16 << 10})
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		os.Exit(2)
	}
	logf, err := os.OpenFile(filepath.Join(root, crashLog), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		os.Exit(2)
	}
	fmt.Println("ready")
	for i := start; ; i++ {
		data := crashContent(i)
		ref := fmt.Sprintf("c-%d", i)
		w, err := s.Writer(ctx, ref)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		for off := 0; off < len(data); {
			n := min(7001, len(data)-off)
			if _, err := w.Write(data[off : off+n]); err != nil {
				os.Exit(2)
			}
			off += n
			if i%3 == 0 && off >= len(data)/2 && w.Offset() < int64(len(data)) && off-n < len(data)/2 {
				w.Close()
				if w, err = s.Writer(ctx, ref); err != nil {
					os.Exit(2)
				}
				off = int(w.Offset())
			}
		}
		d, err := w.Commit(ctx, int64(len(data)), digestOf(data))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Fprintln(logf, d)
	}
}

// TestCrash SIGKILLs a child that ingests and commits in a loop, at random
// moments, and checks the store after each kill.
func TestCrash(t *testing.T) {
	const kills = 50
	root := t.TempDir()
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	resumed, committedTotal := 0, 0
	budget := time.Now().Add(40 * time.Second)
	for k := 0; k < kills; k++ {
		if time.Now().After(budget) {
			t.Fatalf("only %d kills in the time budget", k)
		}
		crashtest.KillChild(t, []string{envCrashRoot + "=" + root, envCrashStart + "=" + strconv.Itoa(k*100_000)}, 30*time.Second, time.Duration(rng.IntN(150_000))*time.Microsecond)
		c, r := checkAfterCrash(t, ctx, root)
		committedTotal += c
		resumed += r
	}
	t.Logf("%d kills, %d commits checked, %d interrupted ingests resumed", kills, committedTotal, resumed)
	if committedTotal == 0 {
		t.Fatal("the child never committed anything; the test proved nothing")
	}
}

func checkAfterCrash(t *testing.T, ctx context.Context, root string) (committed, resumed int) {
	t.Helper()
	s, err := Open(ctx, Options{Root: root, CommitGrace: time.Nanosecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("reopen after kill: %v", err)
	}
	defer s.Close()
	// Only complete, well-named blobs are visible.
	base := filepath.Join(root, dirBlobs, "sha256")
	dirs, _ := os.ReadDir(base)
	for _, dd := range dirs {
		ents, _ := os.ReadDir(filepath.Join(base, dd.Name()))
		for _, e := range ents {
			d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
			if validateDigest(d) != nil || e.Name()[:2] != dd.Name() {
				t.Fatalf("stray file in blobs: %s/%s", dd.Name(), e.Name())
			}
		}
	}
	rep, err := s.Verify(ctx, 0)
	if err != nil || len(rep.Corrupt) > 0 {
		t.Fatalf("verify after kill: %+v %v", rep.Corrupt, err)
	}
	b, _ := os.ReadFile(filepath.Join(root, crashLog))
	for _, line := range strings.Fields(string(b)) {
		if !s.Exists(digest.Digest(line)) {
			t.Fatalf("committed blob %s lost", line)
		}
		committed++
	}
	// Finish every interrupted ingest from where it stopped.
	ents, _ := os.ReadDir(filepath.Join(root, dirIngest))
	for _, e := range ents {
		i, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "c-"))
		if err != nil {
			t.Fatalf("unexpected ingest %q", e.Name())
		}
		data := crashContent(i)
		durable, err := s.IngestOffset(e.Name())
		if err != nil {
			t.Fatal(err)
		}
		w, err := s.Writer(ctx, e.Name())
		if err != nil {
			t.Fatal(err)
		}
		if w.Offset() != durable || durable > int64(len(data)) {
			t.Fatalf("resume at %d, durable %d, size %d", w.Offset(), durable, len(data))
		}
		if _, err := w.Write(data[w.Offset():]); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Commit(ctx, int64(len(data)), digestOf(data)); err != nil {
			t.Fatalf("commit of resumed ingest %s (from %d): %v", e.Name(), durable, err)
		}
		resumed++
	}
	// Start the next round small: free everything (no images are recorded).
	if _, err := s.GC(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if n := countBlobs(t, s); n != 0 {
		t.Fatalf("%d blobs left after GC", n)
	}
	if c, _ := s.Capacity(); c.Used != 0 {
		t.Fatalf("Used = %d after emptying the store", c.Used)
	}
	os.Remove(filepath.Join(root, crashLog))
	return committed, resumed
}

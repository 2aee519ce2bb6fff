package s3store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"imagestore/blobstore"
	"imagestore/blobstore/blobstoretest/crashtest"
	"imagestore/internal/redact"

	"github.com/opencontainers/go-digest"
)

// The crash child: env envCrashChild holds its Options as JSON.
const (
	envCrashChild = "S3STORE_CRASH_CHILD"
	envCrashStart = "S3STORE_CRASH_START"
)

const crashWrite = 1<<20 + 7 // the child's Write size

type crashSpec struct {
	Endpoint, Bucket, Prefix, AccessKey, SecretKey string
	Log                                            string // the child's log file
}

// crashContent is what the child ingests under ref c-<i>: a few KiB to
// 20 MiB, so that some ingests are one PutObject and others up to four
// parts, some long enough for the bound on what a resume loses to bind
// (checkAfterCrash), and the parent regenerates it to finish an
// interrupted ingest.
func crashContent(i int) []byte {
	n := 1 + int(uint64(i)*7919%uint64(20<<20))
	if i%4 == 1 {
		n %= 200_000
	}
	return randBytes(uint64(i), n)
}

// crashChild ingests and commits until SIGKILLed. It logs "w <ref> <off>"
// after each Write returned (what it sent) and "c <digest>" after each
// commit. Every third ingest is closed halfway and resumed by a new Writer.
func crashChild(spec string) {
	var sp crashSpec
	if err := json.Unmarshal([]byte(spec), &sp); err != nil {
		os.Exit(2)
	}
	start, _ := strconv.Atoi(os.Getenv(envCrashStart))
	ctx := context.Background()
	b, err := New(ctx, Options{Endpoint: sp.Endpoint, Bucket: sp.Bucket, Prefix: sp.Prefix, PathStyle: true,
		AccessKey: redact.Secret(sp.AccessKey), SecretKey: redact.Secret(sp.SecretKey), PartSize: testPart,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(2)
	}
	logf, err := os.OpenFile(sp.Log, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		os.Exit(2)
	}
	fmt.Println("ready")
	for i := start; ; i++ {
		data := crashContent(i)
		ref := fmt.Sprintf("c-%d", i)
		w, err := b.Writer(ctx, ref)
		if err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		for off := 0; off < len(data); {
			n := min(crashWrite, len(data)-off)
			if _, err := w.Write(data[off : off+n]); err != nil {
				fmt.Fprintln(os.Stderr, "child:", err)
				os.Exit(2)
			}
			off += n
			fmt.Fprintf(logf, "w %s %d\n", ref, off)
			if i%3 == 0 && off >= len(data)/2 && off-n < len(data)/2 && off < len(data) {
				if err := w.Close(); err != nil {
					os.Exit(2)
				}
				if w, err = b.Writer(ctx, ref); err != nil || w.Offset() != int64(off) {
					fmt.Fprintln(os.Stderr, "child: resume after Close:", w.Offset(), off, err)
					os.Exit(2)
				}
			}
		}
		res, err := w.commit(ctx, int64(len(data)), digest.FromBytes(data))
		if err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		fmt.Fprintf(logf, "c %s\n", res.Digest)
	}
}

// TestCrash SIGKILLs a child that ingests and commits into RGW, at random
// moments, ≥ 30 times, and after each kill checks that every visible blob
// is complete and right, every logged commit is there, and every
// interrupted ingest resumes at its durable offset (never beyond what the
// child sent) and commits with the right digest.
func TestCrash(t *testing.T) {
	const kills = 32
	b, c, bucket := newBackend(t)
	ctx := t.Context()
	logPath := filepath.Join(t.TempDir(), "child.log")
	spec, _ := json.Marshal(crashSpec{Endpoint: c.Endpoint, Bucket: bucket, Prefix: "store1",
		AccessKey: c.AccessKey, SecretKey: c.SecretKey, Log: logPath})
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 2))
	var committed, resumed, fresh int
	var resent, kept int64
	for k := range kills {
		crashtest.KillChild(t, []string{envCrashChild + "=" + string(spec), envCrashStart + "=" + strconv.Itoa(k*100_000)}, 2*time.Minute, time.Duration(rng.IntN(1500))*time.Millisecond)
		cm, r, f, rs, kp := checkAfterCrash(t, ctx, b, logPath)
		if k%8 == 7 { // deleted objects hold their space until RGW's GC
			if err := c.GC(ctx); err != nil {
				t.Fatal(err)
			}
		}
		committed, resumed, fresh, resent, kept = committed+cm, resumed+r, fresh+f, resent+rs, kept+kp
	}
	t.Logf("%d kills: %d commits checked, %d interrupted ingests resumed (%d from zero), %d bytes kept by resumes, %d bytes sent again",
		kills, committed, resumed, fresh, kept, resent)
	if committed == 0 || resumed == 0 {
		t.Fatalf("%d commits, %d resumes: the test proved nothing", committed, resumed)
	}
}

func checkAfterCrash(t *testing.T, ctx context.Context, b *Backend, logPath string) (committed, resumed, fresh int, resent, kept int64) {
	t.Helper()
	// Every visible blob is complete and right.
	var blobs []digest.Digest
	if err := b.WalkBlobs(ctx, func(bi blobstore.BlobInfo) error { blobs = append(blobs, bi.Digest); return nil }); err != nil {
		t.Fatal(err)
	}
	for _, d := range blobs {
		h := sha256.New()
		if _, err := b.ReadBlob(ctx, d, h); err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != d.Encoded() {
			t.Fatalf("blob %s holds bytes hashing to %s", d, got)
		}
	}
	if ks := keys(t, b, ""); len(ks) > 0 {
		for _, k := range ks {
			if !strings.HasPrefix(k, "blobs/sha256/") && !strings.HasPrefix(k, "ingest/c-") && !strings.HasPrefix(k, dirPins) {
				t.Fatalf("stray object %s", k)
			}
		}
	}
	raw, _ := os.ReadFile(logPath)
	sent := map[string]int64{}
	for line := range strings.Lines(string(raw)) {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "c":
			if _, err := b.StatBlob(ctx, digest.Digest(f[1])); err != nil {
				t.Fatalf("committed blob %s lost: %v", f[1], err)
			}
			committed++
		case len(f) == 3 && f[0] == "w":
			sent[f[1]], _ = strconv.ParseInt(f[2], 10, 64)
		}
	}
	// Finish every interrupted ingest from its durable offset.
	refs, err := b.ingests(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for ref := range refs {
		i, err := strconv.Atoi(strings.TrimPrefix(ref, "c-"))
		if err != nil {
			t.Fatalf("unexpected ingest %q", ref)
		}
		data := crashContent(i)
		w, err := b.Writer(ctx, ref)
		if err != nil {
			t.Fatal(err)
		}
		off := w.Offset()
		// The child logs a Write after it returned: a part (and its
		// state) may have landed within the Write it was killed in.
		if off > int64(len(data)) || off > sent[ref]+crashWrite {
			t.Fatalf("%s resumes at %d, but the child sent %d of %d", ref, off, sent[ref], len(data))
		}
		// When the child logged a Write, at most PartsInFlight-1 parts
		// were still uploading (the state names every part that had
		// finished) and the part buffer held less than a part: a resume
		// loses less than PartsInFlight parts of what the child logged.
		// Not so once it had logged every byte: it may have died in
		// commit after completing the upload, whose parts are then gone
		// and the ingest starts again from zero.
		if lost := sent[ref] - off; sent[ref] < int64(len(data)) && lost >= defaultPartsInFlight*testPart {
			t.Fatalf("%s resumes at %d, but the child sent %d: %d bytes lost, %d parts of %d or more", ref, off, sent[ref], lost, defaultPartsInFlight, testPart)
		}
		if off == 0 {
			fresh++
		}
		resent += max(0, sent[ref]-off)
		kept += off
		if _, err := w.Write(data[off:]); err != nil {
			t.Fatal(err)
		}
		if _, err := w.commit(ctx, int64(len(data)), digest.FromBytes(data)); err != nil {
			t.Fatalf("commit of resumed ingest %s (from %d): %v", ref, off, err)
		}
		resumed++
	}
	if u := uploads(t, b); len(u) != 0 {
		t.Fatalf("uploads left after finishing every ingest: %v", u)
	}
	// Start the next round empty.
	// (Raw deletes: a resumed ingest of content the child had committed
	// left a pin that DeleteBlob would honour.)
	for _, k := range keys(t, b, "") {
		if err := b.deleteKey(ctx, b.prefix+k); err != nil {
			t.Fatal(err)
		}
	}
	if ks := keys(t, b, ""); len(ks) != 0 {
		t.Fatalf("objects left after emptying: %v", ks)
	}
	os.Remove(logPath)
	return committed, resumed, fresh, resent, kept
}

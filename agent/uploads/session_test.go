package uploads

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

var errFull = errors.New("sink full")

// testSink is a Sink over a buffer with an optional size cap (a fatal error).
type testSink struct {
	buf bytes.Buffer
	max int
}

func (s *testSink) Write(p []byte) (int, error) {
	if s.max > 0 && s.buf.Len()+len(p) > s.max {
		return 0, errFull
	}
	return s.buf.Write(p)
}
func (s *testSink) Offset() int64        { return int64(s.buf.Len()) }
func (s *testSink) Fatal(err error) bool { return errors.Is(err, errFull) }

type countProgress struct{ n atomic.Int64 }

func (p *countProgress) SetTotal(int64)                  {}
func (p *countProgress) Add(n int64)                     { p.n.Add(n) }
func (p *countProgress) SetImage(string, string, string) {}

// receive starts Receive for id and waits until the session is registered.
func receive(t *testing.T, ctx context.Context, u *Uploads, id string, sink Sink, p *countProgress) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- u.Receive(ctx, id, sink, p) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if waiting, _ := u.Receiving(id); waiting {
			return done
		}
		if time.Now().After(deadline) {
			t.Fatal("session not registered")
		}
		time.Sleep(time.Millisecond)
	}
}

func chunk(id, off string, body string, complete bool) Chunk {
	return Chunk{ID: id, Offset: off, Length: int64(len(body)), Complete: complete, Body: strings.NewReader(body)}
}

func TestPutChunks(t *testing.T) {
	u, err := New(Options{Root: filepath.Join(t.TempDir(), "uploads"), MaxChunk: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := u.Put(ctx, chunk("nobody", "0", "x", false)); !errors.Is(err, ErrNoUpload) || !strings.Contains(err.Error(), `no upload import waiting for taskuuid "nobody"`) {
		t.Fatalf("chunk without a session: %v", err)
	}
	sink, p := &testSink{}, &countProgress{}
	done := receive(t, ctx, u, "t1", sink, p)

	res, err := u.Put(ctx, chunk("t1", "0", "hello ", false))
	if err != nil || res.Offset != 6 || res.MaxChunk != 1<<20 || res.Complete {
		t.Fatalf("first chunk: %+v %v", res, err)
	}
	res, err = u.Put(ctx, chunk("t1", "2", "xx", false))
	if !errors.Is(err, ErrChunkConflict) || res.Offset != 6 || !strings.Contains(err.Error(), `Upload-Offset "2": resume from offset 6`) {
		t.Fatalf("stale offset: %+v %v", res, err)
	}
	if _, err := u.Put(ctx, chunk("t1", "", "xx", false)); !errors.Is(err, ErrBadChunk) {
		t.Fatalf("chunk without an offset: %v", err)
	}
	res, err = u.Put(ctx, chunk("t1", "6", "world", true))
	if err != nil || !res.Complete || res.Offset != 11 {
		t.Fatalf("last chunk: %+v %v", res, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Receive: %v", err)
	}
	if sink.buf.String() != "hello world" || p.n.Load() != 11 {
		t.Fatalf("received %q, progress %d", sink.buf.String(), p.n.Load())
	}
	if waiting, _ := u.Receiving("t1"); waiting {
		t.Fatal("session still registered after Receive returned")
	}
	if _, err := u.Put(ctx, chunk("t1", "11", "more", false)); !errors.Is(err, ErrNoUpload) {
		t.Fatalf("chunk after completion: %v", err)
	}
}

// A fatal sink error (a size cap) ends the upload with that error; a
// non-fatal one fails only the chunk.
func TestPutFatalSinkError(t *testing.T) {
	u, err := New(Options{Root: filepath.Join(t.TempDir(), "uploads")})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	done := receive(t, ctx, u, "t2", &testSink{max: 4}, &countProgress{})
	if _, err := u.Put(ctx, Chunk{ID: "t2", Offset: "0", Length: 3, Body: iotestErrReader{}}); err == nil || errors.Is(err, errFull) {
		t.Fatalf("chunk whose body fails: %v", err)
	}
	if waiting, _ := u.Receiving("t2"); !waiting {
		t.Fatal("a failed body ended the session")
	}
	if _, err := u.Put(ctx, chunk("t2", "0", "too long", false)); !errors.Is(err, errFull) {
		t.Fatalf("chunk over the cap: %v", err)
	}
	if err := <-done; !errors.Is(err, errFull) {
		t.Fatalf("Receive: %v, want the sink's fatal error", err)
	}
}

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("client went away") }

func TestReceiveIdleAndCancel(t *testing.T) {
	u, err := New(Options{Root: filepath.Join(t.TempDir(), "uploads"), Idle: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := u.Receive(context.Background(), "idle", &testSink{}, &countProgress{}); err == nil || !strings.Contains(err.Error(), "no data from the host") {
		t.Fatalf("idle session: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := receive(t, ctx, u, "c", &testSink{}, &countProgress{})
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled session: %v", err)
	}
}

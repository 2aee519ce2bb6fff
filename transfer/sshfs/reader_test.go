package sshfs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"imagestore/internal/retry"
	"imagestore/transfer/faultproxy"
	"imagestore/transfer/sshtest"
)

// testReader is a Reader over fake lane files, without a pool; its
// reconnect waits are recorded, not slept, and a reconnect dial panics
// unless the test sets openLane.
func testReader(ctx context.Context, size int64, files ...laneFile) (*Reader, *atomic.Int32) {
	var sleeps atomic.Int32
	r := &Reader{
		pool: &Pool{log: discardLog()}, ctx: ctx, files: files, gens: make([]int, len(files)), size: size,
		policy: DefaultReconnect(),
	}
	r.policy.Sleep = func(ctx context.Context, d time.Duration) error {
		sleeps.Add(1)
		return ctx.Err()
	}
	r.openLane = func(context.Context, int) (laneFile, error) { panic("unexpected reconnect") }
	return r, &sleeps
}

func discardLog() *slog.Logger { return slog.New(slog.DiscardHandler) }

// shortFile answers at most max bytes per read, with io.EOF as pkg/sftp
// does when a server caps its reads below the request size.
type shortFile struct {
	b     []byte
	max   int
	noEOF bool // answer short with a nil error instead
}

func (f *shortFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(f.b)) {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), f.max)], f.b[off:])
	if n < len(p) && !f.noEOF {
		return n, io.EOF
	}
	return n, nil
}
func (f *shortFile) Close() error { return nil }
func (f *shortFile) Size() int64  { return int64(len(f.b)) }

func (f *shortFile) ModTime() time.Time { return time.Time{} }

func TestReaderShortReads(t *testing.T) {
	b := make([]byte, 100000)
	for i := range b {
		b[i] = byte(i % 251)
	}
	tests := []struct {
		name     string
		max      int
		noEOF    bool
		off, n   int64
		want     int
		wantErr  error
		wantRead int64
	}{
		{"capped reads inside the file", 1000, false, 10, 50000, 50000, nil, 50000},
		{"uncapped", 1 << 20, false, 0, 100000, 100000, nil, 100000},
		{"past the end", 1000, false, 99000, 5000, 1000, io.EOF, 1000},
		{"short without error inside the file", 1000, true, 10, 50000, 1000, io.ErrUnexpectedEOF, 1000},
		{"short without error to the end", 1000, true, 99000, 5000, 1000, io.EOF, 1000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := testReader(context.Background(), int64(len(b)), &shortFile{b: b, max: tc.max, noEOF: tc.noEOF})
			p := make([]byte, tc.n)
			n, err := r.ReadAt(p, tc.off)
			if n != tc.want || err != tc.wantErr {
				t.Fatalf("ReadAt = %d, %v; want %d, %v", n, err, tc.want, tc.wantErr)
			}
			if !bytes.Equal(p[:n], b[tc.off:tc.off+int64(n)]) {
				t.Fatal("wrong bytes")
			}
			if got := r.BytesRead(); got != tc.wantRead {
				t.Fatalf("counted %d host bytes, want %d", got, tc.wantRead)
			}
		})
	}
}

// lostFile fails every read as a dropped connection does.
type lostFile struct{}

func (lostFile) ReadAt([]byte, int64) (int, error) {
	return 0, &connLostError{errors.New("connection lost")}
}
func (lostFile) Close() error       { return nil }
func (lostFile) Size() int64        { return 100 }
func (lostFile) ModTime() time.Time { return time.Time{} }

// A reconnect stops with the reader's context: no back-off sleep, no dial
// (openLane panics), and the error says why.
func TestReaderReconnectCanceled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r, sleeps := testReader(ctx, 100, lostFile{})
	_, err := r.ReadAt(make([]byte, 10), 0)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("ReadAt = %v, want context.Canceled", err)
	}
	if r.reconnects != 0 || sleeps.Load() != 0 {
		t.Fatalf("%d reconnects and %d back-off waits after the context ended, want none", r.reconnects, sleeps.Load())
	}
}

// A read retries as the policy allows, then gives up saying how often it tried.
func TestReaderGivesUp(t *testing.T) {
	r, sleeps := testReader(context.Background(), 100, lostFile{})
	r.policy = retry.Policy{Attempts: 3, Sleep: r.policy.Sleep}
	var dials atomic.Int32
	r.openLane = func(context.Context, int) (laneFile, error) { dials.Add(1); return lostFile{}, nil }
	_, err := r.ReadAt(make([]byte, 10), 0)
	var cl *connLostError
	if !errors.As(err, &cl) || !bytes.Contains([]byte(err.Error()), []byte("giving up after 3 tries")) {
		t.Fatalf("ReadAt = %v, want a lost connection after 3 tries", err)
	}
	if dials.Load() != 2 || sleeps.Load() != 2 || r.reconnects != 2 {
		t.Fatalf("dials %d, waits %d, reconnects %d; want 2 each", dials.Load(), sleeps.Load(), r.reconnects)
	}
}

// While one lane reconnects, reads on the other lanes go on.
func TestReaderLaneReopenDoesNotBlockOthers(t *testing.T) {
	b := make([]byte, 4096)
	for i := range b {
		b[i] = byte(i % 251)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	r, _ := testReader(context.Background(), int64(len(b)), lostFile{}, &shortFile{b: b, max: len(b)})
	r.openLane = func(ctx context.Context, lane int) (laneFile, error) {
		close(entered)
		<-release
		return &shortFile{b: b, max: len(b)}, nil
	}
	r.next.Store(1) // the first read goes to lane 0, the lost one
	type result struct {
		n   int
		err error
	}
	first := make(chan result, 1)
	go func() {
		p := make([]byte, 100)
		n, err := r.ReadAt(p, 10)
		if err == nil && !bytes.Equal(p, b[10:110]) {
			err = errors.New("wrong bytes after the reconnect")
		}
		first <- result{n, err}
	}()
	<-entered // lane 0 is reconnecting, held in openLane

	second := make(chan result, 1)
	go func() {
		n, err := r.ReadAt(make([]byte, 100), 200) // lane 1
		second <- result{n, err}
	}()
	select {
	case res := <-second:
		if res.err != nil || res.n != 100 {
			t.Fatalf("read on the healthy lane: %d, %v", res.n, res.err)
		}
	case <-time.After(30 * time.Second):
		close(release)
		t.Fatal("a read on the healthy lane waited for the other lane's reconnect")
	}
	close(release)
	if res := <-first; res.err != nil || res.n != 100 {
		t.Fatalf("read on the reconnected lane: %d, %v", res.n, res.err)
	}
	if r.reconnects != 1 || r.gens[0] != 1 || r.gens[1] != 0 {
		t.Fatalf("reconnects %d, generations %v: want one reconnect, of lane 0", r.reconnects, r.gens)
	}
}

// A lane that finds the file changed (size or mtime) since the first lane
// opened it fails the open, as a reconnect that finds it changed does.
func TestReaderLaneSeesChangedFile(t *testing.T) {
	s := sshtest.Start(t)
	p, _ := newPool(t, PoolOptions{})
	src := filepath.Join(t.TempDir(), "vol.qcow2")
	if err := os.WriteFile(src, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	host := Host{Addr: s.Addr, User: s.User, PrivateKey: s.PrivateKey, Fingerprint: s.Fingerprint}
	ctx := context.Background()
	r, err := p.OpenReader(ctx, host, src, ReadOptions{Lanes: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(src, later, later); err != nil {
		t.Fatal(err)
	}
	f, err := r.openChecked(ctx, 1)
	if !errors.Is(err, ErrFileChanged) {
		if f != nil {
			f.Close()
		}
		t.Fatalf("opening lane 1 after the file changed = %v, want ErrFileChanged", err)
	}
	r2, err := p.OpenReader(ctx, host, src, ReadOptions{Lanes: 2})
	if err != nil {
		t.Fatalf("open of the unchanged file over 2 lanes: %v", err)
	}
	defer r2.Close()
	if r2.Lanes() != 2 {
		t.Fatalf("%d lanes open, want 2", r2.Lanes())
	}
}

// Reads over two lanes through a proxy that cuts connections: each lane
// reconnects on its own, the bytes are right and every byte received is
// counted (retries included).
func TestReaderLanesThroughCuttingProxy(t *testing.T) {
	s := sshtest.Start(t)
	px := faultproxy.New(t, s.Addr)
	p, _ := newPool(t, PoolOptions{})
	name, data := randomFile(t, 6<<20)
	h := Host{Addr: px.Addr(), User: s.User, PrivateKey: s.PrivateKey, Fingerprint: s.Fingerprint}
	var onRead atomic.Int64
	r, err := p.OpenReader(context.Background(), h, name, ReadOptions{Lanes: 2, OnRead: func(n int64) { onRead.Add(n) }})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Lanes() != 2 || px.Conns() != 2 {
		t.Fatalf("lanes %d over %d connections, want 2", r.Lanes(), px.Conns())
	}
	px.CutAfter(1 << 20)
	px.CutNext(2)
	px.CloseConns() // two cuts now; later connections are cut after 1 MiB, twice
	checkRanges(t, r, data, 4, 6)
	if px.Cuts() < 2 {
		t.Fatalf("cuts %d, want at least 2", px.Cuts())
	}
	if r.BytesRead() != onRead.Load() || r.BytesRead() == 0 {
		t.Fatalf("BytesRead %d, OnRead saw %d", r.BytesRead(), onRead.Load())
	}
}

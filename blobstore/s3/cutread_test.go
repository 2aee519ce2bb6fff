package s3store

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imagestore/blobstore"
)

// cutProxy forwards TCP to target; the first response that passes cutAt
// bytes is cut there (both connections closed), as an RGW restart or a
// dropped connection ends a body early.
type cutProxy struct {
	ln     net.Listener
	target string
	cutAt  int64
	cut    atomic.Bool
	stall  bool        // at the cut, keep the connection open and send nothing more
	down   atomic.Bool // drop every connection at once
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

func startCutProxy(t *testing.T, target string, cutAt int64) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, cutAt: cutAt}
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.conns = append(p.conns, c)
			p.mu.Unlock()
			p.wg.Go(func() { p.serve(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns { // the client's idle keep-alive connections
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

// setDown drops every connection now and refuses new ones until up again.
func (p *cutProxy) setDown(down bool) {
	p.down.Store(down)
	if down {
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
	}
}

func (p *cutProxy) serve(c net.Conn) {
	defer c.Close()
	if p.down.Load() {
		return
	}
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer s.Close()
	go func() { _, _ = io.Copy(s, c); s.Close() }()
	if p.cut.Load() {
		_, _ = io.Copy(c, s)
		return
	}
	buf := make([]byte, 32<<10)
	var n int64
	for {
		k, err := s.Read(buf)
		if k > 0 {
			if n+int64(k) > p.cutAt && p.cut.CompareAndSwap(false, true) {
				_, _ = c.Write(buf[:p.cutAt-n])
				if p.stall {
					// Hung, not closed: wait for the client to give up.
					_, _ = io.Copy(io.Discard, c)
				}
				return // closes both: the body ends early
			}
			if _, werr := c.Write(buf[:k]); werr != nil {
				return
			}
			n += int64(k)
		}
		if err != nil {
			return
		}
	}
}

// TestReadRetriesBrokenBody: a GET whose body breaks is retried or
// reopened, not taken for the end of the blob: cut short (the connection
// closed cleanly before Content-Length, as when RGW restarts), or stalled
// (no byte while the connection stays up: abandoned after ReadStall
// instead of hanging until the Blob is closed, or for ever). Each way of
// reading goes through a GET of its own: a ranged GET (ReadAt), the one
// streaming GET of a range of streamMin or more, and a readahead stream
// serving 1 MiB ranges read in order (its chunks then come from their
// readers' own GETs).
func TestReadRetriesBrokenBody(t *testing.T) {
	b, c, bucket := newBackend(t)
	ctx := context.Background()
	data := randBytes(9, streamMin+(1<<20)+5)
	res := ingestCommit(t, b, "cut", data)
	readRange := func(bl blobstore.Blob, p []byte, off int64) (int, error) {
		body, err := bl.(blobstore.RangeReader).ReadRange(ctx, off, int64(len(p)))
		if err != nil {
			return 0, err
		}
		defer body.Close()
		return io.ReadFull(body, p)
	}
	reads := []struct {
		name string
		read func(bl blobstore.Blob, p []byte) (int, error)
	}{
		{"ReadAt", func(bl blobstore.Blob, p []byte) (int, error) { return bl.ReadAt(p, 0) }},
		{"stream", func(bl blobstore.Blob, p []byte) (int, error) { return readRange(bl, p, 0) }},
		{"readahead", func(bl blobstore.Blob, p []byte) (int, error) {
			n := 0
			for n < len(p) {
				k, err := readRange(bl, p[n:min(n+1<<20, len(p))], int64(n))
				n += k
				if err != nil {
					return n, err
				}
			}
			return n, nil
		}},
	}
	for _, tc := range []struct {
		name  string
		stall bool
	}{{"cut", false}, {"stalled", true}} {
		for _, rd := range reads {
			t.Run(tc.name+"/"+rd.name, func(t *testing.T) {
				p := startCutProxy(t, strings.TrimPrefix(c.Endpoint, "http://"), 1<<20)
				p.stall = tc.stall
				pb := openBackend(t, c, bucket, func(o *Options) {
					o.Endpoint = "http://" + p.ln.Addr().String()
					o.CacheBytes = -1
					o.ReadStall = time.Second
				})
				// Open (a HEAD) before arming the cut: only a GET's body is cut.
				bl, err := pb.OpenBlob(ctx, res.Digest)
				if err != nil {
					t.Fatal(err)
				}
				defer bl.Close()
				got := make([]byte, len(data))
				done := make(chan struct{})
				var n int
				go func() { defer close(done); n, err = rd.read(bl, got) }()
				select {
				case <-done:
				case <-time.After(2 * time.Minute):
					t.Fatal("a read through a broken body did not return: no stall deadline")
				}
				if !p.cut.Load() {
					t.Fatal("the proxy cut nothing")
				}
				if err != nil || n != len(data) || !bytes.Equal(got, data) {
					t.Fatalf("read of %d bytes through a broken body: %d bytes, %v (equal %v)", len(data), n, err, bytes.Equal(got[:n], data[:n]))
				}
			})
		}
	}
}

// TestOpenIngestDropsLostBytes: bytes a Writer accepted but could not
// store (a part upload failed for good) are not in the ingest its next
// Writer resumes; OpenIngest reports them dropped, so the Store releases
// what it reserved for them (else its quota accounting keeps them until
// a restart).
func TestOpenIngestDropsLostBytes(t *testing.T) {
	_, c, bucket := newBackend(t)
	ctx := context.Background()
	p := startCutProxy(t, strings.TrimPrefix(c.Endpoint, "http://"), 1<<62)
	b := openBackend(t, c, bucket, func(o *Options) {
		o.Endpoint = "http://" + p.ln.Addr().String()
		o.Retry.Attempts = 2
	})
	in, dropped, err := b.OpenIngest(ctx, "lost")
	if err != nil || dropped != 0 {
		t.Fatal(dropped, err)
	}
	if _, err := in.Write(randBytes(3, testPart+1000)); err != nil { // one part, 1000 bytes after it
		t.Fatal(err)
	}
	p.setDown(true) // every request fails from here
	// Parts upload in the background: a failure may surface at a later
	// Write or only at Close.
	n, werr := in.Write(randBytes(4, testPart))
	if cerr := in.Close(); werr == nil && cerr == nil {
		t.Fatal("a part upload through a dead endpoint succeeded")
	}
	written := int64(testPart+1000) + int64(n)
	p.setDown(false)
	in2, dropped, err := b.OpenIngest(ctx, "lost")
	if err != nil {
		t.Fatal(err)
	}
	defer in2.Cancel()
	if got := in2.Offset() + dropped; got != written {
		t.Fatalf("resumed at %d with %d dropped; the Writer had accepted %d bytes", in2.Offset(), dropped, written)
	}
}

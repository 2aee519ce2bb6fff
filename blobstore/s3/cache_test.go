package s3store

import (
	"bytes"
	"context"
	"testing"
	"time"
)

// TestChunkCacheReferences: a chunk's pooled buffer goes back to its pool
// only when the cache and every reader have released it, so a reader
// holding an evicted chunk keeps its bytes while the pool hands buffers
// to the next chunks; a get that waits for another's fetch gets its own
// reference, and one that gives up leaves none behind; a sequential read
// reuses a handful of buffers instead of making one per chunk.
func TestChunkCacheReferences(t *testing.T) {
	const size = 64
	key := func(i int64) chunkKey { return chunkKey{"sha256:x", "etag", i} }
	filled := func(p *bufPool, v byte) func() (*chunkBuf, error) {
		return func() (*chunkBuf, error) {
			c := p.get(size)
			for i := range c.b {
				c.b[i] = v
			}
			return c, nil
		}
	}
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, c *chunkCache, p *bufPool)
	}{
		{"evicted while read", func(t *testing.T, c *chunkCache, p *bufPool) {
			first, err := c.get(t.Context(), key(0), filled(p, 'a'))
			if err != nil {
				t.Fatal(err)
			}
			first.release()
			held, err := c.get(t.Context(), key(0), filled(p, '?')) // a hit
			if err != nil {
				t.Fatal(err)
			}
			for i := int64(1); i <= 4; i++ { // evicts chunk 0 (cap: 2 chunks)
				d, err := c.get(t.Context(), key(i), filled(p, byte('a'+i)))
				if err != nil {
					t.Fatal(err)
				}
				d.release()
			}
			if c.has(key(0)) {
				t.Fatal("chunk 0 was not evicted")
			}
			if !bytes.Equal(held.b, bytes.Repeat([]byte{'a'}, size)) {
				t.Fatalf("a held chunk's buffer was reused after its eviction: %q", held.b[:8])
			}
			held.release()
		}},
		{"waiter gets its own reference", func(t *testing.T, c *chunkCache, p *bufPool) {
			f := c.reserve(key(0))
			got := make(chan *chunkBuf)
			go func() {
				d, err := c.get(context.Background(), key(0), filled(p, 'x'))
				if err != nil {
					t.Error(err)
				}
				got <- d
			}()
			waitWaiters(t, c, f, 1)
			d := p.get(size)
			copy(d.b, bytes.Repeat([]byte{'w'}, size))
			c.complete(key(0), f, d, nil, true)
			d.release() // the producer's reference
			w := <-got
			c.reset() // the cache's reference
			if !bytes.Equal(w.b, bytes.Repeat([]byte{'w'}, size)) {
				t.Fatalf("the waiter's chunk was reused before it released it: %q", w.b[:8])
			}
			w.release()
		}},
		{"waiter gives up", func(t *testing.T, c *chunkCache, p *bufPool) {
			f := c.reserve(key(0))
			ctx, cancel := context.WithCancel(context.Background())
			errc := make(chan error)
			go func() {
				_, err := c.get(ctx, key(0), filled(p, 'x'))
				errc <- err
			}()
			waitWaiters(t, c, f, 1)
			cancel()
			if err := <-errc; err == nil {
				t.Fatal("a get that gave up returned no error")
			}
			d := p.get(size)
			c.complete(key(0), f, d, nil, false)
			d.release()
		}},
		{"waiters give up as the chunk comes", func(t *testing.T, c *chunkCache, p *bufPool) {
			// Each waiter sees its context end and the fill end at
			// about the same time: whichever it takes, no reference
			// may be left behind (checked after the run).
			for i := range int64(200) {
				f := c.reserve(key(i))
				ctx, cancel := context.WithCancel(context.Background())
				got := make(chan *chunkBuf)
				go func() {
					d, _ := c.get(ctx, key(i), filled(p, 'x'))
					got <- d
				}()
				waitWaiters(t, c, f, 1)
				d := p.get(size)
				cancel()
				c.complete(key(i), f, d, nil, false)
				d.release()
				if w := <-got; w != nil {
					w.release()
				}
			}
		}},
		{"failed fill", func(t *testing.T, c *chunkCache, p *bufPool) {
			f := c.reserve(key(0))
			errc := make(chan error)
			go func() {
				_, err := c.get(context.Background(), key(0), filled(p, 'x'))
				errc <- err
			}()
			waitWaiters(t, c, f, 1)
			c.complete(key(0), f, nil, errStreamEnded, false)
			if err := <-errc; err != errStreamEnded {
				t.Fatalf("waiter: %v, want the fill's error", err)
			}
		}},
		{"sequential read reuses buffers", func(t *testing.T, c *chunkCache, p *bufPool) {
			for i := range int64(50) {
				d, err := c.get(t.Context(), key(i), filled(p, byte(i)))
				if err != nil {
					t.Fatal(err)
				}
				if d.b[0] != byte(i) || d.b[size-1] != byte(i) {
					t.Fatalf("chunk %d holds %d", i, d.b[0])
				}
				d.release()
			}
			if made, _ := p.stats(); made > 4 {
				t.Fatalf("%d buffers made for 50 chunks read in turn through a cache of 2", made)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newBufPool(size, 4)
			c := newChunkCache(2 * size)
			tc.run(t, c, p)
			c.reset()
			if _, out := p.stats(); out != 0 {
				t.Fatalf("%d buffers still referenced after every reader released and the cache was emptied", out)
			}
		})
	}
}

// waitWaiters waits until n gets wait for fill f.
func waitWaiters(t *testing.T, c *chunkCache, f *fill, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		c.mu.Lock()
		w := f.waiters
		c.mu.Unlock()
		if w == n {
			return
		}
	}
	t.Fatalf("no %d gets waiting for the fill", n)
}

package s3store

import (
	"container/list"
	"context"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
)

// chunkCache is the bounded read cache: fixed-size chunks of committed
// (immutable) blobs in memory, evicted least recently used once their total
// size exceeds the cap. Concurrent misses of one chunk fetch it once.
type chunkCache struct {
	max int64

	mu      sync.Mutex
	size    int64
	lru     *list.List // of *cacheEntry, front = most recent
	entries map[chunkKey]*list.Element
	loading map[chunkKey]*fill
	hits    int64
	misses  int64
}

type chunkKey struct {
	d    digest.Digest
	etag string // a blob rewritten behind our back (repaired, corrupted) is another blob to the cache
	idx  int64
}

type cacheEntry struct {
	key  chunkKey
	data *chunkBuf // the entry holds one reference
	// unread: brought ahead of its reader (a readahead stream's chunk) and
	// not read yet; never evicted, so that readers re-reading older chunks
	// cannot push out the ones they are about to need. Its producer bounds
	// how many it keeps unread.
	unread bool
}

type fill struct {
	done chan struct{}
	data *chunkBuf
	err  error
	// guarded by the cache's mu
	waiters int  // gets waiting for it: complete gives each a reference
	ended   bool // complete ran
}

func newChunkCache(max int64) *chunkCache {
	return &chunkCache{max: max, lru: list.New(), entries: map[chunkKey]*list.Element{}, loading: map[chunkKey]*fill{}}
}

// get returns the chunk, calling load on a miss (once for concurrent
// callers; a caller that joins another's load waits for it, or for ctx).
// load returns a buffer with one reference, which becomes the caller's.
// The returned buffer carries a reference the caller must release once
// done with its bytes, which it must not modify.
func (c *chunkCache) get(ctx context.Context, k chunkKey, load func() (*chunkBuf, error)) (*chunkBuf, error) {
	c.mu.Lock()
	if e, ok := c.entries[k]; ok {
		c.lru.MoveToFront(e)
		c.hits++
		ce := e.Value.(*cacheEntry)
		ce.unread = false
		ce.data.ref()
		c.mu.Unlock()
		return ce.data, nil
	}
	if f, ok := c.loading[k]; ok {
		f.waiters++
		c.mu.Unlock()
		select {
		case <-f.done:
			return f.data, f.err
		case <-ctx.Done():
			c.mu.Lock()
			if !f.ended {
				f.waiters--
			} else if f.data != nil {
				// It came as we gave up: its reference is ours.
				f.data.release()
			}
			c.mu.Unlock()
			return nil, ctx.Err()
		}
	}
	c.misses++
	f := &fill{done: make(chan struct{})}
	c.loading[k] = f
	c.mu.Unlock()
	data, err := load()
	c.complete(k, f, data, err, false)
	if err != nil {
		return nil, err
	}
	return data, nil
}

// reserve marks chunk k as being fetched by the caller, who must then
// call complete with it; concurrent gets of k wait for that. It returns
// nil if k is held or already being fetched.
func (c *chunkCache) reserve(k chunkKey) *fill {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.entries[k]; ok {
		return nil
	}
	if _, ok := c.loading[k]; ok {
		return nil
	}
	c.misses++
	f := &fill{done: make(chan struct{})}
	c.loading[k] = f
	return f
}

// complete ends fill f of chunk k: its data is kept (evicting the least
// recently used chunks over the cap), or its error handed to the gets
// waiting for it and forgotten. unread keeps the chunk until its first
// read (see cacheEntry); gets already waiting for it do not count.
// The caller keeps its own reference to data (nil with an error); the
// cache and the waiting gets take theirs.
func (c *chunkCache) complete(k chunkKey, f *fill, data *chunkBuf, err error, unread bool) {
	if err != nil {
		data = nil
	}
	c.mu.Lock()
	f.data, f.err, f.ended = data, err, true
	if data != nil {
		data.refs.Add(int32(f.waiters))
	}
	if c.loading[k] == f {
		delete(c.loading, k)
	}
	if data != nil && int64(len(data.b)) <= c.max {
		if _, ok := c.entries[k]; !ok {
			data.ref()
			c.entries[k] = c.lru.PushFront(&cacheEntry{key: k, data: data, unread: unread})
			c.size += int64(len(data.b))
			c.evict()
		}
	}
	c.mu.Unlock()
	close(f.done)
}

// evict removes the least recently used chunks, unread ones excepted,
// until the cache is within its cap (or holds only unread chunks).
func (c *chunkCache) evict() {
	for e := c.lru.Back(); e != nil && c.size > c.max; {
		prev := e.Prev()
		if !e.Value.(*cacheEntry).unread {
			c.remove(e)
		}
		e = prev
	}
}

func (c *chunkCache) remove(e *list.Element) {
	ce := c.lru.Remove(e).(*cacheEntry)
	delete(c.entries, ce.key)
	c.size -= int64(len(ce.data.b))
	ce.data.release()
}

// settle makes the unread chunks of blob version (d, etag) evictable like
// any other: their producer has stopped (a readahead stream ended), so
// whoever would have read them has gone elsewhere.
func (c *chunkCache) settle(d digest.Digest, etag string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for e := c.lru.Front(); e != nil; e = e.Next() {
		if ce := e.Value.(*cacheEntry); ce.unread && ce.key.d == d && ce.key.etag == etag {
			ce.unread = false
		}
	}
	c.evict()
}

// has reports whether chunk k is held or being fetched.
func (c *chunkCache) has(k chunkKey) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, held := c.entries[k]
	_, loading := c.loading[k]
	return held || loading
}

// drop forgets every chunk of d (deleted or quarantined).
func (c *chunkCache) drop(d digest.Digest) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for e := c.lru.Front(); e != nil; {
		next := e.Next()
		if e.Value.(*cacheEntry).key.d == d {
			c.remove(e)
		}
		e = next
	}
}

// stats reports the bytes held and the hit and miss counts.
func (c *chunkCache) stats() (size, hits, misses int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.size, c.hits, c.misses
}

// reset empties the cache.
func (c *chunkCache) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for e := c.lru.Front(); e != nil; e = e.Next() {
		e.Value.(*cacheEntry).data.release()
	}
	c.lru.Init()
	clear(c.entries)
	c.size = 0
}

// chunkBuf is a chunk's bytes, shared by the cache and its readers by
// reference count: a buffer from a bufPool goes back to it when the last
// reference is released, so that it is reused rather than left to the
// GC. A fresh buffer costs the zeroing of its bytes and a page fault per
// 4 KiB page the first time it is touched (≈11 µs each on a PVM guest,
// ≈360 MB/s per core), more than the GET that fills it costs us; a
// reused one costs neither. A buffer without a pool is the GC's.
type chunkBuf struct {
	b    []byte
	refs atomic.Int32
	pool *bufPool
}

// newChunkBuf wraps b (the GC's) with one reference.
func newChunkBuf(b []byte) *chunkBuf {
	c := &chunkBuf{b: b}
	c.refs.Store(1)
	return c
}

func (c *chunkBuf) ref() { c.refs.Add(1) }

// release drops a reference; after it the caller must not touch c.b.
func (c *chunkBuf) release() {
	n := c.refs.Add(-1)
	if n < 0 {
		panic("s3store: chunk buffer released more often than referenced")
	}
	if n == 0 && c.pool != nil {
		c.pool.put(c)
	}
}

// bufPool hands out buffers of size bytes, keeping up to max released
// ones for reuse (past that, a released buffer is the GC's). It never
// waits: when none is free it makes one, so what is held stays bounded
// by the callers (the chunk caches' caps, one chunk per stream and per
// fetch in flight, one per response being written), as without it.
type bufPool struct {
	size, max int

	mu   sync.Mutex
	free []*chunkBuf
	made int64 // buffers made (tests)
	out  int64 // buffers handed out and not back (tests)
}

func newBufPool(size, max int) *bufPool { return &bufPool{size: size, max: max} }

// get returns a buffer of n <= size bytes with one reference. Its bytes
// are whatever the last user left: the caller overwrites all n.
func (p *bufPool) get(n int) *chunkBuf {
	p.mu.Lock()
	p.out++
	var c *chunkBuf
	if k := len(p.free); k > 0 {
		c = p.free[k-1]
		p.free[k-1] = nil
		p.free = p.free[:k-1]
	} else {
		p.made++
	}
	p.mu.Unlock()
	if c == nil {
		c = &chunkBuf{b: make([]byte, p.size), pool: p}
	}
	c.b = c.b[:n]
	c.refs.Store(1)
	return c
}

func (p *bufPool) put(c *chunkBuf) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.out--
	if len(p.free) < p.max {
		c.b = c.b[:cap(c.b)]
		p.free = append(p.free, c)
	}
}

// stats reports the buffers made and those handed out and not released.
func (p *bufPool) stats() (made, out int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.made, p.out
}

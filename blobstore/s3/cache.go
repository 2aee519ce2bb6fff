package s3store

import (
	"container/list"
	"context"
	"sync"

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
	data []byte
	// unread: brought ahead of its reader (a readahead stream's chunk) and
	// not read yet; never evicted, so that readers re-reading older chunks
	// cannot push out the ones they are about to need. Its producer bounds
	// how many it keeps unread.
	unread bool
}

type fill struct {
	done chan struct{}
	data []byte
	err  error
}

func newChunkCache(max int64) *chunkCache {
	return &chunkCache{max: max, lru: list.New(), entries: map[chunkKey]*list.Element{}, loading: map[chunkKey]*fill{}}
}

// get returns the chunk, calling load on a miss (once for concurrent
// callers; a caller that joins another's load waits for it, or for ctx).
// The returned slice is shared and must not be modified.
func (c *chunkCache) get(ctx context.Context, k chunkKey, load func() ([]byte, error)) ([]byte, error) {
	c.mu.Lock()
	if e, ok := c.entries[k]; ok {
		c.lru.MoveToFront(e)
		c.hits++
		e.Value.(*cacheEntry).unread = false
		c.mu.Unlock()
		return e.Value.(*cacheEntry).data, nil
	}
	if f, ok := c.loading[k]; ok {
		c.mu.Unlock()
		select {
		case <-f.done:
			return f.data, f.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	c.misses++
	f := &fill{done: make(chan struct{})}
	c.loading[k] = f
	c.mu.Unlock()
	data, err := load()
	c.complete(k, f, data, err, false)
	return data, err
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
func (c *chunkCache) complete(k chunkKey, f *fill, data []byte, err error, unread bool) {
	f.data, f.err = data, err
	c.mu.Lock()
	if c.loading[k] == f {
		delete(c.loading, k)
	}
	if err == nil && int64(len(data)) <= c.max {
		if _, ok := c.entries[k]; !ok {
			c.entries[k] = c.lru.PushFront(&cacheEntry{key: k, data: data, unread: unread})
			c.size += int64(len(data))
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
	c.size -= int64(len(ce.data))
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
	c.lru.Init()
	clear(c.entries)
	c.size = 0
}

package s3store

import (
	"container/list"
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
// callers). The returned slice is shared and must not be modified.
func (c *chunkCache) get(k chunkKey, load func() ([]byte, error)) ([]byte, error) {
	c.mu.Lock()
	if e, ok := c.entries[k]; ok {
		c.lru.MoveToFront(e)
		c.hits++
		c.mu.Unlock()
		return e.Value.(*cacheEntry).data, nil
	}
	if f, ok := c.loading[k]; ok {
		c.mu.Unlock()
		<-f.done
		return f.data, f.err
	}
	c.misses++
	f := &fill{done: make(chan struct{})}
	c.loading[k] = f
	c.mu.Unlock()

	f.data, f.err = load()

	c.mu.Lock()
	delete(c.loading, k)
	if f.err == nil && int64(len(f.data)) <= c.max {
		c.entries[k] = c.lru.PushFront(&cacheEntry{key: k, data: f.data})
		c.size += int64(len(f.data))
		for c.size > c.max {
			old := c.lru.Back()
			c.remove(old)
		}
	}
	c.mu.Unlock()
	close(f.done)
	return f.data, f.err
}

func (c *chunkCache) remove(e *list.Element) {
	ce := c.lru.Remove(e).(*cacheEntry)
	delete(c.entries, ce.key)
	c.size -= int64(len(ce.data))
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

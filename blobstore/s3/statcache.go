package s3store

import (
	"sync"
	"time"
)

// statCache remembers, for a few seconds, the size and ETag of blobs
// OpenBlob found, so that a client reading a blob by many range requests
// (each one an OpenBlob on the registry) costs one HEAD, not one per
// request.
//
// A committed blob never changes (its key is its content's digest), but
// it can go: a GC on another agent sharing the bucket may delete it once
// no image refers to it. A stale entry lets OpenBlob succeed for a blob
// that is gone; its reads then fail with blobstore.ErrNotFound (RGW
// answers the GET 404), which also drops the entry. It never yields other
// bytes than the blob's: the size is the content's, and a blob committed
// again under its digest holds the same verified bytes. The one thing a
// stale ETag could do, serve the read cache's copy of an object rewritten
// behind the store's back (corrupted, or repaired), is ruled out by a
// HEAD before a reused blob's first read through that cache (blob.tagged);
// readahead chunks, which live seconds, are keyed by the reused ETag.
// StatBlob (and so Store.Stat and Exists, which decide whether a blob must
// be uploaded or may be referenced) always asks the bucket.
type statCache struct {
	ttl time.Duration
	max int
	now func() time.Time

	mu sync.Mutex
	m  map[string]statEntry // by object key
}

type statEntry struct {
	o  object
	at time.Time
}

const (
	// statTTL is how long an opened blob's size and ETag are reused.
	statTTL = 30 * time.Second
	// statMax bounds the entries (a few hundred bytes each).
	statMax = 4096
)

func newStatCache(ttl time.Duration, max int, now func() time.Time) *statCache {
	return &statCache{ttl: ttl, max: max, now: now, m: map[string]statEntry{}}
}

func (c *statCache) get(key string) (object, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok {
		return object{}, false
	}
	if age := c.now().Sub(e.at); age < 0 || age >= c.ttl {
		delete(c.m, key)
		return object{}, false
	}
	return e.o, true
}

func (c *statCache) put(key string, o object) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if len(c.m) >= c.max {
		for k, e := range c.m {
			if age := now.Sub(e.at); age < 0 || age >= c.ttl {
				delete(c.m, k)
			}
		}
	}
	if len(c.m) >= c.max {
		clear(c.m) // a burst of distinct blobs: start over rather than grow
	}
	c.m[key] = statEntry{o: o, at: now}
}

func (c *statCache) drop(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, key)
}

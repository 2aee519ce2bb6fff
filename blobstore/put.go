package blobstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"
)

// Put ingests r in one go under a private ref and commits it. size -1
// means unknown; with a known size the quota is checked before reading.
func (s *Store) Put(ctx context.Context, r io.Reader, size int64, expected digest.Digest) (digest.Digest, int64, error) {
	if expected != "" {
		if err := validateDigest(expected); err != nil {
			return "", 0, err
		}
	}
	if size >= 0 {
		s.mu.Lock()
		over := s.quota > 0 && s.used+size > s.quota
		used, quota := s.used, s.quota
		s.mu.Unlock()
		if over {
			return "", 0, fmt.Errorf("blobstore: put: %w: %d bytes in use + %d > quota %d", ErrQuotaExceeded, used, size, quota)
		}
		r = io.LimitReader(r, size+1) // one more, to see a too-long stream
	}
	var rnd [12]byte
	_, _ = rand.Read(rnd[:])
	w, err := s.Writer(ctx, "put-"+hex.EncodeToString(rnd[:]))
	if err != nil {
		return "", 0, err
	}
	bp := s.copyBufs.Get().(*[]byte)
	defer s.copyBufs.Put(bp)
	buf := *bp
	for {
		if err := ctx.Err(); err != nil {
			w.Cancel()
			return "", w.Offset(), err
		}
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			if _, err := w.Write(buf[:n]); err != nil {
				w.Cancel()
				return "", w.Offset(), err
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			w.Cancel()
			return "", w.Offset(), fmt.Errorf("blobstore: put: read: %w", rerr)
		}
	}
	n := w.Offset()
	d, err := w.Commit(ctx, size, expected)
	if err != nil {
		return "", n, err
	}
	return d, n, nil
}

package registry

import (
	"io"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/layer"
	"imagestore/qcow2"
)

// While an upload runs, the registry records which 4 KiB blocks of its
// bytes are zeros (layer.ZeroBlocks, one bit a block), as they are
// written; the blob it commits keeps that record until a manifest naming
// it arrives (at most MountHold). The manifest's canonical check of the
// layer (layer.CheckCanonical) then learns which data clusters are all
// zeros from the record instead of reading the stored layer back: the
// blobstore drops an ingest's pages from the cache as it goes, so that
// read came from the disk, after the upload, while the client's final PUT
// waited. An upload the record did not see whole (resumed after a restart,
// or from an offset it cannot rewind to) has none, and its check reads.

// Bounds on the records held: concurrent uploads, and committed blobs
// waiting for their manifest.
const (
	maxUploadZeros  = 32
	maxBlobZeros    = 32
	uploadZerosIdle = 24 * time.Hour
)

type uploadZeros struct {
	z    *layer.ZeroBlocks
	used time.Time
}

// zerosFor returns the record of upload id, now at offset off (nil: none
// is kept). A new upload (offset 0) gets one; a resumed one rewinds it.
func (s *Server) zerosFor(id string, off int64) *layer.ZeroBlocks {
	s.zmu.Lock()
	defer s.zmu.Unlock()
	now := time.Now()
	e, ok := s.uploadZeros[id]
	if !ok {
		if off != 0 {
			return nil
		}
		for k, v := range s.uploadZeros {
			if now.Sub(v.used) > uploadZerosIdle {
				delete(s.uploadZeros, k)
			}
		}
		if len(s.uploadZeros) >= maxUploadZeros {
			return nil
		}
		e = &uploadZeros{z: &layer.ZeroBlocks{}}
		s.uploadZeros[id] = e
	}
	if e.z.Len() < off {
		delete(s.uploadZeros, id) // bytes it never saw
		return nil
	}
	e.z.Rewind(off)
	e.used = now
	return e.z
}

// dropZeros forgets upload id's record.
func (s *Server) dropZeros(id string) {
	s.zmu.Lock()
	delete(s.uploadZeros, id)
	s.zmu.Unlock()
}

// committedZeros hands upload id's record to blob d, committed from its
// size bytes, until d's manifest arrives or MountHold passes.
func (s *Server) committedZeros(id string, d digest.Digest, size int64) {
	s.zmu.Lock()
	defer s.zmu.Unlock()
	e, ok := s.uploadZeros[id]
	delete(s.uploadZeros, id)
	if ok {
		s.keepBlobZerosLocked(d, e.z, size)
	}
}

// keepBlobZeros keeps z, the record of blob d's size bytes, until d's
// manifest arrives or MountHold passes.
func (s *Server) keepBlobZeros(d digest.Digest, z *layer.ZeroBlocks, size int64) {
	s.zmu.Lock()
	defer s.zmu.Unlock()
	s.keepBlobZerosLocked(d, z, size)
}

func (s *Server) keepBlobZerosLocked(d digest.Digest, z *layer.ZeroBlocks, size int64) {
	if z.Len() != size || len(s.blobZeros) >= maxBlobZeros {
		return
	}
	s.blobZeros[d] = z
	time.AfterFunc(MountHold, func() {
		s.zmu.Lock()
		if s.blobZeros[d] == z {
			delete(s.blobZeros, d)
		}
		s.zmu.Unlock()
	})
}

// blobZerosOf is replicate.Apply's zeros: the record of blob d, if any.
func (s *Server) blobZerosOf(d digest.Digest) qcow2.ZeroMap {
	s.zmu.Lock()
	defer s.zmu.Unlock()
	if z, ok := s.blobZeros[d]; ok {
		return z
	}
	return nil
}

// forgetBlobZeros drops the records of blobs a manifest has recorded.
func (s *Server) forgetBlobZeros(ds []digest.Digest) {
	s.zmu.Lock()
	for _, d := range ds {
		delete(s.blobZeros, d)
	}
	s.zmu.Unlock()
}

// recordingWriter writes to w and records what w took in z (nil: none).
type recordingWriter struct {
	w io.Writer
	z *layer.ZeroBlocks
}

func (r recordingWriter) Write(p []byte) (int, error) {
	n, err := r.w.Write(p)
	if r.z != nil && n > 0 {
		r.z.Write(p[:n])
	}
	return n, err
}

package agent

import (
	"context"
	"fmt"
	"net/http"
	"os"

	"imagestore/agent/api"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
)

// Handlers of questions about files on the store host.

// getLocalFileSize answers the size of a file on the store host. Only
// files an import could read are answered (upload dirs, allowed import
// roots, released NBD targets: agent/uploads.Confine); any other path is
// refused with an error saying so, so the management port reveals nothing
// about the rest of the host.
func (a *Agent) getLocalFileSize(w http.ResponseWriter, r *http.Request) {
	var req api.LocalFileSizeRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "getlocalfilesize", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		p, err := a.uploads.Confine(req.Path)
		if err != nil {
			return nil, fmt.Errorf("getlocalfilesize: path: %w", err)
		}
		f, err := a.uploads.Open(p)
		if err != nil {
			return nil, fmt.Errorf("getlocalfilesize: %w", err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return nil, fmt.Errorf("getlocalfilesize: %w", err)
		}
		c := a.capacity()
		return api.LocalFileSizeReply{Size: fi.Size(), TotalCapacity: c.TotalSize, AvailableCapacity: c.FreeSize}, nil
	})
}

// getLocalCacheDir answers a directory on the store host for imageUuid.
// What the management node puts there is not visible in its sources; a
// fresh upload dir is inside the store, writable the way hosts write
// backups, and expires after uploadDirExpiry.
func (a *Agent) getLocalCacheDir(w http.ResponseWriter, r *http.Request) {
	var req api.LocalCacheDirRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	if req.ImageUUID != "" {
		if err := (blobstore.Ref{Name: req.ImageUUID, ID: "x"}).Validate(); err != nil {
			replyErr(w, http.StatusOK, fmt.Errorf("imageUuid: %w", err))
			return
		}
	}
	dir, err := a.uploads.Alloc(0)
	if err != nil {
		replyErr(w, http.StatusOK, err)
		return
	}
	if err := os.Chmod(dir.Path, 0o755); err != nil {
		replyErr(w, http.StatusOK, err)
		return
	}
	a.log.Info("local cache dir", "imageUuid", req.ImageUUID, "dir", dir.Path)
	reply(w, api.LocalCacheDirReply{Path: dir.Path})
}

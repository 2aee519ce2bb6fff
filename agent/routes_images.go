package agent

import (
	"context"
	"net/http"

	"imagestore/agent/api"
	"imagestore/agent/config"
	"imagestore/agent/images"
	"imagestore/agent/ingest"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
)

// Handlers of imports (agent/ingest) and image reads (agent/images).

// importReply is the reply of every import path.
type importReply = api.ImportReply

func importReplyFor(img blobstore.Image, c api.Capacity) importReply {
	return importReply{
		Capacity: c, Name: img.Name, ID: img.ID, Blobsum: img.Blob.String(),
		Size: img.Size, VirtualSize: img.VirtualSize, Format: img.Format, InstallPath: img.InstallPath(),
	}
}

// importBackup ingests a file a KVM host wrote into an upload dir (or an
// allowed file:// path); a database backup goes to importDatabaseBackup.
func (a *Agent) importBackup(w http.ResponseWriter, r *http.Request) {
	var req api.ImportBackupRequest
	err := decode(r, &req)
	if err == nil && ingest.IsDatabaseBackup(req.Name, req.Desc) {
		a.importDatabaseBackup(w, r, req)
		return
	}
	a.async(w, r, JobSpec{Kind: "import-backup", Backup: true, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		img, err := a.ingest.ImportBackup(ctx, ingest.BackupRequest{
			Task: job.ID(), ImgURL: req.ImgURL, Name: req.Name, Desc: req.Desc, Parent: req.Parent,
			InstallPath: req.InstallPath, ImageUUID: req.ImageUUID, ProcessToRelease: req.ProcessToRelease,
		}, job)
		if err != nil {
			return nil, err
		}
		return importReplyFor(img, a.capacity()), nil
	})
}

// importDatabaseBackup is import-backup of a zsbak dump whose desc carries
// an md5: the image is recorded only when the stored bytes match it.
func (a *Agent) importDatabaseBackup(w http.ResponseWriter, r *http.Request, req api.ImportBackupRequest) {
	_, err := ingest.ParseDatabaseDesc(req.Desc)
	a.async(w, r, JobSpec{Kind: "import-backup", Backup: true, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		img, err := a.ingest.ImportDatabaseBackup(ctx, ingest.DatabaseBackupRequest{
			ImgURL: req.ImgURL, Desc: req.Desc, InstallPath: req.InstallPath, ImageUUID: req.ImageUUID,
		}, job)
		if err != nil {
			return nil, err
		}
		return importReplyFor(img, a.capacity()), nil
	})
}

// ingestURLRequest is an import request for ingest.ImportURL, in job task.
func ingestURLRequest(task string, req api.ImportRequest) ingest.URLRequest {
	return ingest.URLRequest{Task: task, ImgURL: req.ImgURL, Name: req.Name, ImageUUID: req.ImageUUID, Arch: req.Arch, Desc: req.Desc, CACert: req.CACert}
}

// importURL downloads an image (http(s), sftp, file, or an upload stream
// from the host CLI) and stores it as a canonical standalone layer.
func (a *Agent) importURL(w http.ResponseWriter, r *http.Request) {
	var req api.ImportRequest
	err := decode(r, &req)
	if err == nil {
		_, err = ingest.CheckSource(req.ImgURL)
	}
	if err == nil && ingest.IsUploadSession(req.ImgURL, req.ImageUUID) {
		a.importUploadSession(w, r, req)
		return
	}
	a.async(w, r, JobSpec{Kind: "import", Backup: true, Err: err, ImageUUID: firstNonEmpty(req.ImageUUID, req.Name)}, func(ctx context.Context, job *jobs.Job) (any, error) {
		img, err := a.ingest.ImportURL(ctx, ingestURLRequest(job.ID(), req), job)
		if err != nil {
			return nil, err
		}
		return importReplyFor(img, a.capacity()), nil
	})
}

// createTemplate flattens a backup's chain into a new standalone base image.
func (a *Agent) createTemplate(w http.ResponseWriter, r *http.Request) {
	var req api.TemplateRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "template", Backup: true, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		img, err := a.ingest.CreateTemplate(ctx, ingest.TemplateRequest{
			Task: job.ID(), InstallPath: req.InstallPath, Name: req.ImageUUID, Format: req.Format, Compress: req.Compress,
		}, job)
		if err != nil {
			return nil, err
		}
		return importReplyFor(img, a.capacity()), nil
	})
}

func (a *Agent) imgChain(w http.ResponseWriter, r *http.Request) {
	var req api.InstallPathRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "imgchain", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		chain, err := a.images.Chain(ctx, req.InstallPath)
		if err != nil {
			return nil, err
		}
		return api.ChainReply{Chain: chain}, nil
	})
}

func (a *Agent) imgInfo(w http.ResponseWriter, r *http.Request) {
	var req api.InstallPathRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "imginfo", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		info, err := a.images.Info(ctx, req.InstallPath)
		if err != nil {
			return nil, err
		}
		return info, nil
	})
}

// listImages returns the images of a name (all images without one), as
// the infos of GetDatabaseBackupFromImageStore.
func (a *Agent) listImages(w http.ResponseWriter, r *http.Request) {
	var req api.ListImagesRequest
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	infos, err := a.images.List(r.Context(), req.Name)
	if err != nil {
		replyErr(w, http.StatusOK, err)
		return
	}
	reply(w, api.ListImagesReply{Infos: infos})
}

// deleteImage removes an image record (its blob is freed by the next gc)
// and answers the capacity after it. Deleting an absent image succeeds
// with deleted:false; an image with children is marked deleted and
// reclaimed once no live descendant needs it (deferred:true).
func (a *Agent) deleteImage(w http.ResponseWriter, r *http.Request) {
	var req api.InstallPathRequest
	err := decode(r, &req)
	var ref blobstore.Ref
	if err == nil {
		ref, err = images.ParsePath("installPath", req.InstallPath)
	}
	a.async(w, r, JobSpec{Kind: "delete", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		res, err := a.images.Delete(ctx, ref)
		if err != nil {
			return nil, err
		}
		return api.DeleteReply{Capacity: a.capacity(), Deleted: res.Deleted, Deferred: res.Deferred}, nil
	})
}

// largeBodyLimit is the body limit of gc and dumpimagemetadatatofile,
// whose bodies name every image the management node knows for this store.
func largeBodyLimit(c config.Config) int64 { return max(c.MaxLargeBodyBytes, c.MaxBodyBytes) }

// gc deletes image records not in imagesToKeep (nor their ancestors, nor
// what running jobs work on) and frees unreferenced blobs. Entries that
// are not zstore:// install paths are skipped and reported. A list with
// no usable entry keeps every image: an empty list is far more likely a
// management node without records than a wish to delete everything.
func (a *Agent) gc(w http.ResponseWriter, r *http.Request) {
	var req api.GCRequest
	err := decode(r, &req)
	keep, skipped := images.ParseKeep(req.ImagesToKeep)
	a.async(w, r, JobSpec{Kind: "gc", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		rep := api.GCReply{Kept: len(keep), SkippedCount: len(skipped)}
		for i, k := range skipped {
			if i == api.MaxSkippedReported {
				break
			}
			// A pending upload's URL holds its session token, the
			// upload's only credential: never log or echo it.
			k.Entry = redactUploadURL(k.Entry)
			rep.Skipped = append(rep.Skipped, k.String())
		}
		if len(skipped) > 0 {
			a.log.Warn("gc: keep-list entries skipped", "count", len(skipped), "entries", rep.Skipped)
		}
		if keep != nil {
			// In-flight imports and uploads: what they write is not in the
			// management node's list yet.
			for _, in := range a.jobs.List() {
				if in.State.Finished() || in.InstallPath == "" || in.ID == job.ID() {
					continue
				}
				if ref, err := images.ParsePath("installPath", in.InstallPath); err == nil {
					keep = append(keep, ref)
				}
			}
		}
		res, err := a.images.GC(ctx, keep)
		if err != nil {
			return nil, err
		}
		rep.Capacity = a.capacity()
		rep.Freed, rep.BlobsFreed = res.BytesFreed, res.BlobsFreed
		rep.ImagesRemoved, rep.IngestsRemoved = res.ImagesRemoved, res.IngestsRemoved
		return rep, nil
	})
}

// imageHash hashes the image's blob (the stored layer bytes).
func (a *Agent) imageHash(w http.ResponseWriter, r *http.Request) {
	var req api.ImageHashRequest
	err := decode(r, &req)
	if err == nil {
		err = images.CheckHashAlgorithm(req.HashAlgorithm())
	}
	a.async(w, r, JobSpec{Kind: "getimagehash", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		sum, err := a.images.Hash(ctx, images.HashRequest{InstallPath: req.InstallPath, Algorithm: req.HashAlgorithm()}, job)
		if err != nil {
			return nil, err
		}
		return api.ImageHashReply{Hash: sum, Algorithm: req.HashAlgorithm()}, nil
	})
}

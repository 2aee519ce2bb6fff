package agent

import (
	"context"
	"net/http"

	"imagestore/agent/api"
	"imagestore/agent/exports"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
)

// packExportedImages packs the exports of installPathList and a config
// file into one downloadable package (see exports.Service.Pack).
// packageUrl is relative; the management node puts
// http://<bs-hostname>:8001 in front and does not rename it.
func (a *Agent) packExportedImages(w http.ResponseWriter, r *http.Request) {
	var req api.PackRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "pack", Backup: true, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		imgs := make([]blobstore.Image, 0, len(req.InstallPathList))
		for _, ip := range req.InstallPathList {
			img, err := a.images.Lookup(ctx, "installPathList", ip)
			if err != nil {
				return nil, err
			}
			imgs = append(imgs, img)
		}
		pkg, err := a.exports.Pack(ctx, job, imgs, exports.PackOptions{
			ImageFormat: req.ImageExportFormat, Config: req.ConfigFileContent, ConfigFormat: req.ConfigFileFormat,
			Name: req.PackageName, Format: req.PackageFormat,
		})
		if err != nil {
			return nil, err
		}
		return api.PackReply{Size: pkg.Size, MD5Sum: pkg.MD5Sum, PackageURL: pkg.Path()}, nil
	})
}

// deleteImagePackage removes the package exportUrl names; an absent one
// is no error.
func (a *Agent) deleteImagePackage(w http.ResponseWriter, r *http.Request) {
	var req api.DeletePackageRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "delete-package", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		n, err := a.exports.DeletePackage(ctx, req.ExportURL)
		if err != nil {
			return nil, err
		}
		return api.DeletePackageReply{Deleted: n}, nil
	})
}

// remoteUpload writes an image's guest view into a remote target
// (nbd://host:port[/export] only; see exports.Service.WriteRemote).
func (a *Agent) remoteUpload(w http.ResponseWriter, r *http.Request) {
	var req api.RemoteUploadRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "remote-upload", Backup: true, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		img, err := a.images.Lookup(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		if err := a.exports.WriteRemote(ctx, job, img, exports.RemoteTarget{URL: req.RemoteTargetURL, Concurrency: req.Concurrency}); err != nil {
			return nil, err
		}
		return nil, nil
	})
}

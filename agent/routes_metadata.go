package agent

import (
	"context"
	"fmt"
	"net/http"

	"imagestore/agent/api"
	"imagestore/agent/jobs"
	"imagestore/agent/metadata"
)

// Handlers of the image-metadata file (agent/metadata) the management
// node writes for disaster recovery.

func (a *Agent) generateMetadataFile(w http.ResponseWriter, r *http.Request) {
	var req api.MetadataRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "metadata", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		a.metadata.CheckPath(req.BackupStoragePath)
		if err := a.metadata.Generate(); err != nil {
			return nil, err
		}
		return api.MetadataFileReply{BackupStorageMetaFileName: metadata.FileName}, nil
	})
}

func (a *Agent) checkMetadataFile(w http.ResponseWriter, r *http.Request) {
	var req api.MetadataRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "metadata", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		a.metadata.CheckPath(req.BackupStoragePath)
		ok, err := a.metadata.Exists()
		if err != nil {
			return nil, err
		}
		return api.MetadataExistReply{BackupStorageMetaFileName: metadata.FileName, Exist: ok}, nil
	})
}

func (a *Agent) dumpMetadata(w http.ResponseWriter, r *http.Request) {
	var req api.DumpMetadataRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "metadata", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		a.metadata.CheckPath(req.BackupStoragePath)
		return nil, a.metadata.Dump(req.ImageMetaData, req.DumpAllMetaData)
	})
}

func (a *Agent) getMetadata(w http.ResponseWriter, r *http.Request) {
	var req api.MetadataRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "metadata", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		a.metadata.CheckPath(req.BackupStoragePath)
		data, err := a.metadata.Read()
		if err != nil {
			return nil, err
		}
		return api.GetMetadataReply{ImagesMetadata: data}, nil
	})
}

func (a *Agent) deleteMetadata(w http.ResponseWriter, r *http.Request) {
	var req api.DeleteMetadataRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "metadata", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		a.metadata.CheckPath(req.BackupStoragePath)
		n, err := a.metadata.DeleteImage(req.ImageUUID)
		if err != nil {
			return nil, err
		}
		return api.DeleteMetadataReply{Ret: 0, Out: fmt.Sprintf("%d line(s) of image %s removed", n, req.ImageUUID)}, nil
	})
}

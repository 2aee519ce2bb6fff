package agent

import (
	"context"
	"net/http"

	"imagestore/agent/api"
	"imagestore/agent/exports"
	"imagestore/agent/images"
	"imagestore/agent/jobs"
)

// export makes an image downloadable (see exports.Service.Create);
// exporting the same image and format again reuses the export. imgUrl is
// relative: the management node puts http://<bs-hostname>:8001 in front.
func (a *Agent) export(w http.ResponseWriter, r *http.Request) {
	var req api.ExportRequest
	err := decode(r, &req)
	if err == nil && req.InstallPath == "" {
		err = missing("installPath")
	}
	a.async(w, r, JobSpec{Kind: "export", Backup: true, Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		img, err := a.images.Lookup(ctx, "installPath", req.InstallPath)
		if err != nil {
			return nil, err
		}
		exp, err := a.exports.Create(ctx, job, img, req.ExtFmt)
		if err != nil {
			return nil, err
		}
		rep := api.ExportReply{ImgURL: exp.Path(), MD5Sum: exp.MD5Sum, Size: exp.Size, Format: exp.ExtFmt}
		if img.Name == images.DatabaseBackupName {
			rep.DatabaseBackupURL = rep.ImgURL
		}
		return rep, nil
	})
}

// delExport removes the exports of installPath (only extFmt's, if given),
// or the one imgUrl names.
func (a *Agent) delExport(w http.ResponseWriter, r *http.Request) {
	var req api.ExportRequest
	err := decode(r, &req)
	a.async(w, r, JobSpec{Kind: "delexp", Err: err}, func(ctx context.Context, job *jobs.Job) (any, error) {
		sel := exports.Selector{InstallPath: req.InstallPath, ExtFmt: req.ExtFmt}
		if req.ImgURL != "" {
			token, err := exports.TokenFromURL(req.ImgURL)
			if err != nil {
				return nil, err
			}
			sel.Token = token
		}
		if req.InstallPath != "" {
			if _, err := images.ParsePath("installPath", req.InstallPath); err != nil {
				return nil, err
			}
		}
		n, err := a.exports.Delete(ctx, sel)
		if err != nil {
			return nil, err
		}
		return api.DeleteExportReply{Deleted: n}, nil
	})
}

// serveExport serves GET/HEAD /export/[<anything>-]image-<token>.<ext>
// and /export/package/<token>/<file>
// with Range support (see exports.Service.Resolve).
func (a *Agent) serveExport(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	m, f, err := a.exports.Resolve(r.URL.Path)
	if err != nil { // exports.ErrNotFound
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-MD5-Hex", m.MD5Sum)
	w.Header().Set("ETag", `"`+m.MD5Sum+`"`)
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, m.File, m.Created, f)
	a.m.bytesExported.Add(float64(cw.n))
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

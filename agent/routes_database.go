package agent

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
)

// databaseBackupName is the image name database backups are stored under.
const databaseBackupName = "zsbak"

// Database backups (the zsbak flows): import-backup with name zsbak and a
// desc JSON {name, description, version, type, createdTime, md5} stores
// the dump as an opaque blob only when its bytes match desc.md5 (a zsbak
// import whose desc has no md5 is a plain, unverified import).
// /imagestore/images/ lists images by name; export of a zsbak image adds
// databaseBackupUrl (routes_export.go).

// databaseBackupDesc is the desc JSON of a database backup.
type databaseBackupDesc struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Version     string `json:"version"`
	Type        string `json:"type"`
	CreatedTime any    `json:"createdTime"`
	MD5         string `json:"md5"`
}

// importDatabaseBackup is import-backup of a zsbak dump whose desc carries
// an md5: the image is recorded only when the stored bytes match it.
func (a *Agent) importDatabaseBackup(w http.ResponseWriter, r *http.Request, req importBackupReq) {
	var desc databaseBackupDesc
	err := parseDatabaseDesc(req.Desc, &desc)
	a.async(w, r, JobSpec{Kind: "import-backup", Backup: true, Err: err}, func(ctx context.Context, job *Job) (any, error) {
		ref, err := a.newImageRef(req.InstallPath, databaseBackupName, nil)
		if err != nil {
			return nil, err
		}
		if ref.Name != databaseBackupName {
			return nil, fmt.Errorf("installPath %s: database backups are stored under the name %s", req.InstallPath, databaseBackupName)
		}
		job.SetImage(firstNonEmpty(req.ImageUUID, ref.ID), ref.InstallPath(), "")
		path, err := a.confineImportPath(req.ImgURL)
		if err != nil {
			return nil, err
		}
		img, err := a.importDatabaseDump(ctx, job, path, ref, req.Desc, desc.MD5)
		if err != nil {
			return nil, err
		}
		return importReplyFor(img, a.capacity()), nil
	})
}

// hasMD5 reports whether desc is a JSON object with an md5 field.
func hasMD5(desc string) bool {
	var m map[string]json.RawMessage
	if json.Unmarshal([]byte(desc), &m) != nil {
		return false
	}
	_, ok := m["md5"]
	return ok
}

func parseDatabaseDesc(s string, d *databaseBackupDesc) error {
	if strings.TrimSpace(s) == "" {
		return fmt.Errorf("desc: a %s import needs the backup's desc JSON {name, description, version, type, createdTime, md5}", databaseBackupName)
	}
	if err := json.Unmarshal([]byte(s), d); err != nil {
		return fmt.Errorf("desc: not the database backup JSON: %w", err)
	}
	d.MD5 = strings.ToLower(strings.TrimSpace(d.MD5))
	if b, err := hex.DecodeString(d.MD5); err != nil || len(b) != md5.Size {
		return fmt.Errorf("desc: md5 %q is not an MD5 hex digest", d.MD5)
	}
	return nil
}

// importDatabaseDump stores the dump as is, hashing the bytes it stores;
// the image is recorded only when they match wantMD5 (a mismatching blob
// is left unreferenced for GC).
func (a *Agent) importDatabaseDump(ctx context.Context, job *Job, path string, ref blobstore.Ref, desc, wantMD5 string) (blobstore.Image, error) {
	f, err := a.openImportPath(path)
	if err != nil {
		return blobstore.Image{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return blobstore.Image{}, err
	}
	job.SetTotal(fi.Size())
	head := make([]byte, 8)
	n, _ := f.ReadAt(head, 0)
	format := sniffFormat(head[:n])
	h := md5.New()
	d, size, err := a.store.Put(ctx, io.TeeReader(jobs.Reader(job, ctxReader(ctx, f)), h), fi.Size(), "")
	if err != nil {
		return blobstore.Image{}, fmt.Errorf("storing %s: %w", path, err)
	}
	release := a.store.Hold(d)
	defer release()
	if got := hex.EncodeToString(h.Sum(nil)); got != wantMD5 {
		return blobstore.Image{}, fmt.Errorf("database backup %s is corrupt: md5 %s, desc says %s; nothing stored", path, got, wantMD5)
	}
	a.m.bytesIngested.Add(float64(size))
	return a.recordImage(ctx, NewImage{Ref: ref, Blob: d, Size: size, VirtualSize: size, Format: format, Desc: desc})
}

type listImagesReq struct {
	Name string `json:"name"`
}

type listImagesReply struct {
	Infos []ImageInfo `json:"infos"`
}

// listImages returns the images of a name (all images without one), as
// the infos of GetDatabaseBackupFromImageStore.
func (a *Agent) listImages(w http.ResponseWriter, r *http.Request) {
	var req listImagesReq
	if err := decode(r, &req); err != nil {
		replyDecodeErr(w, err)
		return
	}
	if req.Name != "" {
		if err := (blobstore.Ref{Name: req.Name, ID: "x"}).Validate(); err != nil {
			replyErr(w, http.StatusOK, fmt.Errorf("name: %w", err))
			return
		}
	}
	imgs, err := a.store.ListImages(r.Context(), req.Name)
	if err != nil {
		replyErr(w, http.StatusOK, err)
		return
	}
	out := listImagesReply{Infos: make([]ImageInfo, 0, len(imgs))}
	for _, img := range imgs {
		out.Infos = append(out.Infos, imageInfo(img))
	}
	reply(w, out)
}

package ingest

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"imagestore/agent/images"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/internal/ctxio"
	"imagestore/layer"
)

// Database backups (the zsbak flows): import-backup with name zsbak and a
// desc JSON {name, description, version, type, createdTime, md5} stores
// the dump as an opaque blob only when its bytes match desc.md5 (a zsbak
// import whose desc has no md5 is a plain, unverified import).

// databaseBackupDesc is the desc JSON of a database backup.
type databaseBackupDesc struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Version     string `json:"version"`
	Type        string `json:"type"`
	CreatedTime any    `json:"createdTime"`
	MD5         string `json:"md5"`
}

// IsDatabaseBackup reports whether an import-backup of name with desc is
// a database backup to check against its md5: name zsbak and a desc that
// is a JSON object with an md5 field.
func IsDatabaseBackup(name, desc string) bool {
	if name != images.DatabaseBackupName {
		return false
	}
	var m map[string]json.RawMessage
	if json.Unmarshal([]byte(desc), &m) != nil {
		return false
	}
	_, ok := m["md5"]
	return ok
}

// DatabaseBackupRequest is an import-backup IsDatabaseBackup accepted.
type DatabaseBackupRequest struct {
	ImgURL      string // the dump: an absolute path or file://path
	Desc        string // the desc JSON (with the md5), recorded as the image's desc
	InstallPath string // an allocated zstore://zsbak/<id> ("" = a new id)
	ImageUUID   string // reported in progress lookups
}

// ParseDatabaseDesc checks a database backup's desc JSON and returns its
// md5 (lower-case hex).
func ParseDatabaseDesc(desc string) (string, error) {
	if strings.TrimSpace(desc) == "" {
		return "", fmt.Errorf("desc: a %s import needs the backup's desc JSON {name, description, version, type, createdTime, md5}", images.DatabaseBackupName)
	}
	var d databaseBackupDesc
	if err := json.Unmarshal([]byte(desc), &d); err != nil {
		return "", fmt.Errorf("desc: not the database backup JSON: %w", err)
	}
	sum := strings.ToLower(strings.TrimSpace(d.MD5))
	if b, err := hex.DecodeString(sum); err != nil || len(b) != md5.Size {
		return "", fmt.Errorf("desc: md5 %q is not an MD5 hex digest", sum)
	}
	return sum, nil
}

// ImportDatabaseBackup stores a database dump as is, recording the image
// only when the stored bytes match the desc's md5.
func (s *Service) ImportDatabaseBackup(ctx context.Context, req DatabaseBackupRequest, p jobs.Progress) (blobstore.Image, error) {
	wantMD5, err := ParseDatabaseDesc(req.Desc)
	if err != nil {
		return blobstore.Image{}, err
	}
	ref, err := images.NewRef(req.InstallPath, images.DatabaseBackupName, nil)
	if err != nil {
		return blobstore.Image{}, err
	}
	if ref.Name != images.DatabaseBackupName {
		return blobstore.Image{}, fmt.Errorf("installPath %s: database backups are stored under the name %s", req.InstallPath, images.DatabaseBackupName)
	}
	p.SetImage(firstNonEmpty(req.ImageUUID, ref.ID), ref.InstallPath(), "")
	path, err := s.opts.Uploads.Confine(req.ImgURL)
	if err != nil {
		return blobstore.Image{}, err
	}
	return s.importDatabaseDump(ctx, p, path, ref, req.Desc, wantMD5)
}

// importDatabaseDump stores the dump as is, hashing the bytes it stores;
// the image is recorded only when they match wantMD5 (a mismatching blob
// is left unreferenced for GC).
func (s *Service) importDatabaseDump(ctx context.Context, p jobs.Progress, path string, ref blobstore.Ref, desc, wantMD5 string) (blobstore.Image, error) {
	f, err := s.opts.Uploads.Open(path)
	if err != nil {
		return blobstore.Image{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return blobstore.Image{}, err
	}
	p.SetTotal(fi.Size())
	format := sniff(f)
	h := md5.New()
	return s.commit(ctx, layer.Spec{
		Record: layer.Record{Ref: ref, Format: format, Desc: desc},
		Reader: io.TeeReader(jobs.Reader(p, ctxio.Reader(ctx, f)), h), Size: fi.Size(),
		Verify: func(context.Context, layer.Layer) error {
			if got := hex.EncodeToString(h.Sum(nil)); got != wantMD5 {
				return fmt.Errorf("database backup %s is corrupt: md5 %s, desc says %s; nothing stored", path, got, wantMD5)
			}
			return nil
		},
	}, fi.Size(), func(err error) error { return fmt.Errorf("storing %s: %w", path, err) })
}

package api

import "fmt"

// ExportRequest is the body of PathExport and PathDelExport: export makes
// installPath downloadable as extFmt; delexp removes the exports of
// installPath (only extFmt's, if given) or the one imgUrl names.
type ExportRequest struct {
	InstallPath string `json:"installPath"`
	ExtFmt      string `json:"extFmt"` // "qcow2", "raw" or "" (export: the image's own format; delexp: any)
	ImgURL      string `json:"imgUrl"` // delexp only: an export URL instead of installPath
}

// Validate checks the fields both paths need; export also needs
// installPath, which its handler checks after.
func (q *ExportRequest) Validate() error {
	if q.InstallPath == "" && q.ImgURL == "" {
		return missing("installPath")
	}
	switch q.ExtFmt {
	case "", "qcow2", "raw":
	default:
		return fmt.Errorf("extFmt %q not supported (qcow2 or raw)", q.ExtFmt)
	}
	return nil
}

// ExportReply answers PathExport.
type ExportReply struct {
	ImgURL string `json:"imgUrl"` // relative: /export/image-<token>.<fmt>
	MD5Sum string `json:"md5Sum"` // of the served bytes
	Size   int64  `json:"size"`
	Format string `json:"format"`
	// DatabaseBackupURL repeats imgUrl for database backups (image name
	// zsbak), the field ExportDatabaseBackupFromBackupStorage returns.
	DatabaseBackupURL string `json:"databaseBackupUrl,omitempty"`
}

// DeleteExportReply answers PathDelExport.
type DeleteExportReply struct {
	Deleted int `json:"deleted"`
}

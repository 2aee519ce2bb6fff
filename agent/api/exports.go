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

// PackRequest is the body of PathPackExportedImages: pack the exports of
// installPathList (each as imageExportFormat, "" = the image's own format)
// and a config file into one downloadable package.
type PackRequest struct {
	InstallPathList   []string `json:"installPathList"`
	ImageExportFormat string   `json:"imageExportFormat"` // "qcow2", "raw" or "" (each image's own format)
	ConfigFileContent string   `json:"configFileContent"`
	ConfigFileFormat  string   `json:"configFileFormat"` // the config file's extension; "" = "json"
	PackageName       string   `json:"packageName"`
	PackageFormat     string   `json:"packageFormat"` // "tar" (or ""), "tar.gz" (or "tgz")
}

// Validate checks what can be checked before any work.
func (q *PackRequest) Validate() error {
	if len(q.InstallPathList) == 0 {
		return missing("installPathList")
	}
	if q.PackageName == "" {
		return missing("packageName")
	}
	switch q.ImageExportFormat {
	case "", "qcow2", "raw":
	default:
		return fmt.Errorf("imageExportFormat %q not supported (qcow2 or raw)", q.ImageExportFormat)
	}
	switch q.PackageFormat {
	case "", "tar", "tar.gz", "tgz":
	default:
		return fmt.Errorf("packageFormat %q not supported (tar or tar.gz)", q.PackageFormat)
	}
	return nil
}

// PackReply answers PathPackExportedImages.
type PackReply struct {
	Size       int64  `json:"size"`
	MD5Sum     string `json:"md5Sum"`     // of the served bytes
	PackageURL string `json:"packageUrl"` // relative: /export/package/<token>/<packageName>.<ext>
}

// DeletePackageRequest is the body of PathDeleteImagePackage.
type DeletePackageRequest struct {
	ExportURL string `json:"exportUrl"` // a packageUrl, absolute or relative
}

// Validate checks exportUrl is there.
func (q *DeletePackageRequest) Validate() error {
	if q.ExportURL == "" {
		return missing("exportUrl")
	}
	return nil
}

// DeletePackageReply answers PathDeleteImagePackage.
type DeletePackageReply struct {
	Deleted int `json:"deleted"` // 0 when the package was already gone
}

// RemoteUploadRequest is the body of PathRemoteUpload: write installPath's
// guest view into remoteTargetUrl (nbd://host:port[/export]).
type RemoteUploadRequest struct {
	RemoteTargetURL string `json:"remoteTargetUrl"`
	InstallPath     string `json:"installPath"`
	Format          string `json:"format"`      // the target's format behind the NBD server: "raw", "qcow2" or ""
	ImageFormat     string `json:"imageFormat"` // the image's format as the caller knows it
	Concurrency     int    `json:"concurrency"` // parallel writes (qemu-img -m), clamped to 1..16
}

// Validate checks the fields are there.
func (q *RemoteUploadRequest) Validate() error {
	if q.RemoteTargetURL == "" {
		return missing("remoteTargetUrl")
	}
	if q.InstallPath == "" {
		return missing("installPath")
	}
	switch q.Format {
	case "", "raw", "qcow2":
	default:
		return fmt.Errorf("format %q not supported (raw or qcow2)", q.Format)
	}
	return nil
}

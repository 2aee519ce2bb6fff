package api

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"imagestore/blobstore"
)

// The bodies of the upload-dir, install-path, import and image paths, and
// the headers of an upload chunk.

// Headers of an upload chunk (PUT PathUpload; the body is the bytes).
const (
	HeaderTaskUUID       = "taskuuid"        // the upload:// import's taskuuid
	HeaderUploadOffset   = "Upload-Offset"   // where the chunk starts: the bytes received so far
	HeaderUploadComplete = "Upload-Complete" // "true" on the last chunk
	HeaderUploadLength   = "Upload-Length"   // the whole upload's size (upload URLs of upload://<imageUuid>/<file>)
)

// ImageInfo is the protocol's image info.
type ImageInfo = blobstore.Info

// MaxExpireHour bounds an upload dir's expireHour (ten years) so the
// expiry cannot overflow.
const MaxExpireHour = 10 * 366 * 24

// AllocUploadDirRequest is the body of allocuploaddir.
type AllocUploadDirRequest struct {
	ExpireHour Int `json:"expireHour"` // 0: the agent's uploadDirExpiry
}

// Validate checks expireHour's range.
func (q *AllocUploadDirRequest) Validate() error {
	if q.ExpireHour < 0 {
		return fmt.Errorf("expireHour %d is negative", q.ExpireHour)
	}
	if q.ExpireHour > MaxExpireHour {
		return fmt.Errorf("expireHour %d is too large (at most %d)", q.ExpireHour, MaxExpireHour)
	}
	return nil
}

// AllocUploadDirReply answers allocuploaddir.
type AllocUploadDirReply struct {
	UploadDir string    `json:"uploadDir"` // <root>/uploads/u-<hex>, removed after Expires
	Expires   time.Time `json:"expires"`
}

// AllocInstallPathRequest is the body of installpath/allocate.
type AllocInstallPathRequest struct {
	Parent string `json:"parent"` // install path or name:id; the new path shares its name
	Name   string `json:"name"`   // without a parent ("" = a new name)
}

// AllocInstallPathReply answers installpath/allocate.
type AllocInstallPathReply struct {
	InstallPath string `json:"installPath"`
}

// UploadReply answers an upload chunk; with a 409 it says where to resume.
type UploadReply struct {
	Offset   int64 `json:"offset"`   // bytes received
	MaxChunk int64 `json:"maxChunk"` // largest chunk body accepted
	Complete bool  `json:"complete"`
}

// ImportBackupRequest is the body of import-backup.
type ImportBackupRequest struct {
	ImgURL           string `json:"imgurl"` // a file in an upload dir, or file://path
	Name             string `json:"name"`
	Desc             string `json:"desc"`
	Parent           string `json:"parent"`
	InstallPath      string `json:"installPath"`
	ImageUUID        string `json:"imageuuid"`
	ProcessToRelease string `json:"processToRelease"`
}

// Validate checks the required fields.
func (q *ImportBackupRequest) Validate() error {
	if q.ImgURL == "" {
		return missing("imgurl")
	}
	if q.Name == "" && q.Parent == "" && q.InstallPath == "" {
		return missing("name")
	}
	return nil
}

// ImportReply answers import-backup, import and template/create.
type ImportReply struct {
	Capacity
	Name        string `json:"name"`
	ID          string `json:"id"`
	Blobsum     string `json:"blobsum"`
	Size        int64  `json:"size"`
	VirtualSize int64  `json:"virtualsize"`
	Format      string `json:"format"`
	InstallPath string `json:"installPath"`
}

// ImportRequest is the body of import (a download or an upload stream).
type ImportRequest struct {
	ImgURL      string `json:"imgurl"` // http(s)://, ftp://, sftp://, file://, upload:// or zstore://
	Name        string `json:"name"`
	Arch        string `json:"arch"`
	Desc        string `json:"desc"`
	Tag         string `json:"tag"`
	ImageUUID   string `json:"imageuuid"`
	Concurrency Int    `json:"concurrency"`
	// CACert (zstore:// only) is the PEM the source store's certificate
	// is verified against (name: the agent's serverName).
	CACert string `json:"cacert"`
}

// Validate checks the required fields (the URL itself is the import's to check).
func (q *ImportRequest) Validate() error {
	if q.ImgURL == "" {
		return missing("imgurl")
	}
	if q.Name == "" && q.ImageUUID == "" {
		return missing("name")
	}
	return nil
}

// InstallPathRequest is the body of imgchain, imginfo and delete.
type InstallPathRequest struct {
	InstallPath string `json:"installPath"`
	ImageUUID   string `json:"imageUuid"`
	UUID        string `json:"uuid"`
}

// Validate checks the required field.
func (q *InstallPathRequest) Validate() error {
	if q.InstallPath == "" {
		return missing("installPath")
	}
	return nil
}

// ChainReply answers imgchain: the chain, top first.
type ChainReply struct {
	Chain []ImageInfo `json:"chain"`
}

// ListImagesRequest is the body of images.
type ListImagesRequest struct {
	Name string `json:"name"` // "" = every image
}

// ListImagesReply answers images.
type ListImagesReply struct {
	Infos []ImageInfo `json:"infos"`
}

// DeleteReply answers delete: the store's capacity after it.
type DeleteReply struct {
	Capacity
	Deleted bool `json:"deleted"` // false when the image was already gone (or deferred)
	// Deferred: the image has children; it is gone for the management node
	// and reclaimed once no live descendant needs it.
	Deferred bool `json:"deferred"`
}

// GCRequest is the body of gc.
type GCRequest struct {
	ImagesToKeep []string `json:"imagesToKeep"` // absent, empty or no usable entry: keep every image
}

// MaxSkippedReported bounds how many skipped keep-list entries a gc reply
// (and its log line) names; SkippedCount has them all.
const MaxSkippedReported = 100

// GCReply answers gc.
type GCReply struct {
	Capacity
	Freed          int64 `json:"freed"`
	BlobsFreed     int   `json:"blobsFreed"`
	ImagesRemoved  int   `json:"imagesRemoved"`
	IngestsRemoved int   `json:"ingestsRemoved"`
	// Kept is how many keep-list entries were used.
	Kept int `json:"kept"`
	// Skipped names keep-list entries that are not zstore:// install
	// paths or do not parse (at most MaxSkippedReported, each "imagesToKeep[i]
	// "<entry>": why"); SkippedCount counts them all.
	Skipped      []string `json:"skipped,omitempty"`
	SkippedCount int      `json:"skippedCount"`
}

// ImageHashRequest is the body of getimagehash.
type ImageHashRequest struct {
	InstallPath string `json:"installPath"`
	Alogrithm   string `json:"alogrithm"` // sic: the management node's spelling
	Algorithm   string `json:"algorithm"`
}

// Validate checks the required field (the algorithm is the hash's to check).
func (q *ImageHashRequest) Validate() error {
	if q.InstallPath == "" {
		return missing("installPath")
	}
	return nil
}

// HashAlgorithm is the algorithm asked for, lower case; sha256 by default.
func (q *ImageHashRequest) HashAlgorithm() string {
	for _, a := range []string{q.Alogrithm, q.Algorithm} {
		if a != "" {
			return strings.ToLower(a)
		}
	}
	return "sha256"
}

// ImageHashReply answers getimagehash.
type ImageHashReply struct {
	Hash      string `json:"hash"`
	Algorithm string `json:"algorithm"`
}

// TemplateRequest is the body of template/create.
type TemplateRequest struct {
	InstallPath string `json:"installPath"` // the backup (top of its chain)
	ImageUUID   string `json:"imageUuid"`   // the template's name
	Compress    bool   `json:"compress"`
	Format      string `json:"format"` // "qcow2" (default) or "raw"
}

// Validate checks the fields.
func (q *TemplateRequest) Validate() error {
	if q.InstallPath == "" {
		return missing("installPath")
	}
	if q.ImageUUID == "" {
		return missing("imageUuid")
	}
	if err := (blobstore.Ref{Name: q.ImageUUID, ID: "x"}).Validate(); err != nil {
		return fmt.Errorf("imageUuid: %w", err)
	}
	switch q.Format {
	case "", "qcow2":
	case "raw":
		if q.Compress {
			return errors.New("compress needs format qcow2")
		}
	default:
		return fmt.Errorf("format %q not supported (qcow2 or raw)", q.Format)
	}
	return nil
}

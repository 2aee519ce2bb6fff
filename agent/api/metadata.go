package api

// The image-metadata paths (disaster recovery): the management node keeps
// newline-separated JSON image inventories in a file on the store.

// MetadataRequest is the body of generateimagemetadatafile,
// checkimagemetadatafileexist and getimagesmetadata.
type MetadataRequest struct {
	BackupStoragePath string `json:"backupStoragePath"` // the store's url in the management node
}

// MetadataFileReply answers generateimagemetadatafile.
type MetadataFileReply struct {
	BackupStorageMetaFileName string `json:"backupStorageMetaFileName"` // the file's name
}

// MetadataExistReply answers checkimagemetadatafileexist. Exist is always
// present: the management node unboxes it.
type MetadataExistReply struct {
	BackupStorageMetaFileName string `json:"backupStorageMetaFileName"`
	Exist                     bool   `json:"exist"`
}

// DumpMetadataRequest is the body of dumpimagemetadatatofile.
type DumpMetadataRequest struct {
	BackupStoragePath string `json:"backupStoragePath"`
	ImageMetaData     string `json:"imageMetaData"`
	// DumpAllMetaData: replace the whole file; else add or replace the
	// lines of the images in ImageMetaData (matched on their uuid).
	DumpAllMetaData bool `json:"dumpAllMetaData"`
}

// GetMetadataReply answers getimagesmetadata: the file ("" when none).
type GetMetadataReply struct {
	ImagesMetadata string `json:"imagesMetaData"`
}

// DeleteMetadataRequest is the body of deleteimagesmetadata.
type DeleteMetadataRequest struct {
	ImageUUID              string `json:"imageUuid"`
	ImageBackupStorageUUID string `json:"imageBackupStorageUuid"`
	BackupStoragePath      string `json:"backupStoragePath"`
}

// Validate checks the required field.
func (q *DeleteMetadataRequest) Validate() error {
	if q.ImageUUID == "" {
		return missing("imageUuid")
	}
	return nil
}

// DeleteMetadataReply answers deleteimagesmetadata: Ret 0 = done, Out
// says how many lines went.
type DeleteMetadataReply struct {
	Ret int    `json:"ret"`
	Out string `json:"out"`
}

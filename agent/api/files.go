package api

// Files on the store host the management node asks about.

// LocalFileSizeRequest is the body of getlocalfilesize.
type LocalFileSizeRequest struct {
	Path string `json:"path"` // a file in an upload dir or an allowed import root
}

// Validate checks the required field.
func (q *LocalFileSizeRequest) Validate() error {
	if q.Path == "" {
		return missing("path")
	}
	return nil
}

// LocalFileSizeReply answers getlocalfilesize.
type LocalFileSizeReply struct {
	Size              int64 `json:"size"`
	TotalCapacity     int64 `json:"totalCapacity"`
	AvailableCapacity int64 `json:"availableCapacity"`
}

// LocalCacheDirRequest is the body of getlocalcachedir-sync.
type LocalCacheDirRequest struct {
	ImageUUID string `json:"imageUuid"`
	URL       string `json:"url"`
}

// LocalCacheDirReply answers getlocalcachedir-sync: a directory on the
// store host (a fresh upload dir).
type LocalCacheDirReply struct {
	Path string `json:"path"`
}

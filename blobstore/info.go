package blobstore

import "time"

// Info is the protocol's image info (the management node's
// {id, parent, blobsum, created, author, arch, desc, size, virtualsize, name},
// the `infos` of GetDatabaseBackupFromImageStore) plus format and installPath.
// The agent and the host CLI both answer with it.
type Info struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	Parent      string    `json:"parent"` // "name:id", "" for a base
	Blobsum     string    `json:"blobsum"`
	Created     time.Time `json:"created"`
	Author      string    `json:"author"`
	Arch        string    `json:"arch"`
	Desc        string    `json:"desc"`
	Size        int64     `json:"size"`
	VirtualSize int64     `json:"virtualsize"`
	Format      string    `json:"format"`
	InstallPath string    `json:"installPath"`
}

// Info renders the image's protocol info.
func (img Image) Info() Info {
	return Info{
		ID: img.ID, Name: img.Name, Parent: img.Parent, Blobsum: img.Blob.String(),
		Created: img.Created, Author: img.Author, Arch: img.Arch, Desc: img.Desc,
		Size: img.Size, VirtualSize: img.VirtualSize, Format: img.Format,
		InstallPath: img.InstallPath(),
	}
}

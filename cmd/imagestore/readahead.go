package main

import (
	"os"

	"golang.org/x/sys/unix"
)

// defaultReaders is push's -concurrency 0: 4 parallel readers ahead of
// the encoder when f is on a network file system (each read there is a
// request to a server, and several in flight keep the link busy), else 1:
// no read-ahead, since the encoder's own parallel chunk reads, with the
// kernel's readahead, keep a local disk busy, and a read-ahead would copy
// every byte once more.
func defaultReaders(f *os.File) int {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return 1
	}
	switch int64(st.Type) {
	case unix.NFS_SUPER_MAGIC, unix.SMB_SUPER_MAGIC, unix.CIFS_SUPER_MAGIC, unix.SMB2_SUPER_MAGIC,
		unix.CEPH_SUPER_MAGIC, unix.FUSE_SUPER_MAGIC, unix.V9FS_MAGIC, unix.AFS_FS_MAGIC, unix.CODA_SUPER_MAGIC:
		return 4
	}
	return 1
}

package fsutil

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// hugePage is the size of an x86-64 (and arm64 4 KiB-granule) transparent
// huge page.
const hugePage = 2 << 20

// HugeBuffer is memory for the pieces a DirectWriter writes: anonymous,
// aligned to 2 MiB and advised into transparent huge pages. The block layer
// sends an O_DIRECT write as one request per run of physically contiguous
// memory, up to the queue's max_segments runs a request: from the Go
// heap's scattered 4 KiB pages, a 4 MiB piece reached a virtio disk
// (max_segments 254) as 1 to 8 requests of 0.5-1 MiB; from 2 MiB pages it
// goes as one or two, up to max_sectors_kb. On a virtual machine every
// request costs an exit to the host, and a restore's ordered writes wait
// for each. Where the kernel gives no huge page (THP off, memory too
// fragmented) the buffer is ordinary pages and writes are as before.
// Free must be called once nothing reads or writes the buffer any more:
// the memory is not the garbage collector's.
type HugeBuffer struct {
	m []byte // the mapping, nil when b is from the heap
	b []byte
}

// NewHugeBuffer returns a buffer of n bytes (zeroed). If the kernel
// refuses the mapping, the buffer is from the heap.
func NewHugeBuffer(n int) *HugeBuffer {
	m, err := unix.Mmap(-1, 0, n+hugePage, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return &HugeBuffer{b: make([]byte, n)}
	}
	off := 0
	if r := int(uintptr(unsafe.Pointer(&m[0])) % hugePage); r != 0 {
		off = hugePage - r
	}
	b := m[off : off+n : off+n]
	// Advice: with THP off it fails and the pages are small ones.
	_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
	return &HugeBuffer{m: m, b: b}
}

// Bytes is the buffer.
func (h *HugeBuffer) Bytes() []byte { return h.b }

// Free unmaps the buffer; Bytes must not be used after it.
func (h *HugeBuffer) Free() {
	if h.m != nil {
		_ = unix.Munmap(h.m)
		h.m = nil
	}
	h.b = nil
}

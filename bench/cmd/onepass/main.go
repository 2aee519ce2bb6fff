// Command onepass copies a file durably while hashing it once with
// SHA-256, the hash on a goroutine of its own beside the reads and writes:
// the least a push does on one machine when its store hashes every byte it
// keeps, before any network, framing or qcow2 work. bench/hostpath.sh
// prints its rate as the bound of a push beside the disk limit.
//
// It writes as the store's ingest does: 4 MiB pieces (three in flight),
// each in 256 KiB write(2)s with its write-back started at once
// (sync_file_range), and every 128 MiB (the ingest's checkpoint) an fsync and a drop of the synced
// pages from the cache on a goroutine of its own (on a VM, writing into
// pages the cache keeps reusing is much cheaper than into fresh ones:
// without it this measured slower than our push). It fsyncs the output at
// the end and prints the digest.
package main

import (
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

const (
	piece    = 4 << 20
	inFlight = 3
	writeMax = 256 << 10
	// checkpoint is the ingest's default checkpoint interval.
	checkpoint = 128 << 20
)

func main() {
	in := flag.String("i", "", "file to read")
	out := flag.String("o", "", "file to write and fsync")
	flag.Parse()
	if *in == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "usage: onepass -i FILE -o OUT")
		os.Exit(2)
	}
	sum, err := copyHashed(*in, *out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "onepass:", err)
		os.Exit(1)
	}
	fmt.Printf("sha256:%x\n", sum)
}

// copyHashed copies in to out (fsynced) and returns the SHA-256 of the
// bytes: each piece goes to the hashing goroutine and is written by this
// one meanwhile; a piece's buffer is reused once it is hashed (it was
// written before the next read began).
func copyHashed(in, out string) ([]byte, error) {
	src, err := os.Open(in)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	dst, err := os.Create(out)
	if err != nil {
		return nil, err
	}
	defer dst.Close()
	h := sha256.New()
	pool := make(chan []byte, inFlight)
	for range inFlight {
		pool <- make([]byte, piece)
	}
	toHash := make(chan []byte, inFlight)
	hashed := make(chan struct{})
	go func() {
		defer close(hashed)
		for b := range toHash {
			h.Write(b)
			pool <- b[:cap(b)]
		}
	}()
	var (
		off, synced int64
		pending     chan error // the checkpoint in flight
	)
	wait := func() error {
		if pending == nil {
			return nil
		}
		err := <-pending
		pending = nil
		return err
	}
	werr := func() error {
		for {
			b := <-pool
			n, err := io.ReadFull(src, b)
			if n > 0 {
				toHash <- b[:n]
				for k := 0; k < n; k += writeMax {
					if _, err := dst.Write(b[k:min(n, k+writeMax)]); err != nil {
						return err
					}
				}
				_ = unix.SyncFileRange(int(dst.Fd()), off, int64(n), unix.SYNC_FILE_RANGE_WRITE)
				off += int64(n)
				if off-synced >= checkpoint {
					if err := wait(); err != nil {
						return err
					}
					from, to := synced, off
					pending = make(chan error, 1)
					go func() {
						err := dst.Sync()
						if err == nil {
							err = unix.Fadvise(int(dst.Fd()), from, to-from, unix.FADV_DONTNEED)
						}
						pending <- err
					}()
					synced = off
				}
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil
			}
			if err != nil {
				return err
			}
		}
	}()
	close(toHash)
	<-hashed
	if err := wait(); werr == nil {
		werr = err
	}
	if werr != nil {
		return nil, werr
	}
	if err := dst.Sync(); err != nil {
		return nil, err
	}
	return h.Sum(nil), dst.Close()
}

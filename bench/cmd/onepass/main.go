// Command onepass copies a file durably while hashing it once with
// SHA-256, the hash on a goroutine of its own beside the reads and writes:
// the least a push does on one machine when its store hashes every byte it
// keeps, before any network, framing or qcow2 work. bench/hostpath.sh
// prints its rate as the bound of a push beside the disk limit.
//
// It reads 4 MiB pieces (three in flight), writes each in 256 KiB
// write(2)s as the store's ingest does, fsyncs the output at the end and
// prints the digest.
package main

import (
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

const (
	piece    = 4 << 20
	inFlight = 3
	writeMax = 256 << 10
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
	werr := func() error {
		for {
			b := <-pool
			n, err := io.ReadFull(src, b)
			if n > 0 {
				toHash <- b[:n]
				for off := 0; off < n; off += writeMax {
					if _, err := dst.Write(b[off:min(n, off+writeMax)]); err != nil {
						return err
					}
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
	if werr != nil {
		return nil, werr
	}
	if err := dst.Sync(); err != nil {
		return nil, err
	}
	return h.Sum(nil), dst.Close()
}

// Command ingest streams one file into a blob store with Store.Put and
// prints the throughput, for bench/ingest.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"time"

	"imagestore/blobstore"
)

func main() {
	root := flag.String("root", "", "store root")
	file := flag.String("file", "", "file to ingest")
	flag.Parse()
	if *root == "" || *file == "" {
		fmt.Fprintln(os.Stderr, "usage: ingest -root DIR -file FILE")
		os.Exit(2)
	}
	ctx := context.Background()
	s, err := blobstore.Open(ctx, blobstore.Options{Root: *root, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer s.Close()
	f, err := os.Open(*file)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer f.Close()
	fi, _ := f.Stat()
	start := time.Now()
	d, n, err := s.Put(ctx, f, fi.Size(), "")
	el := time.Since(start)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Printf("%s %d bytes %.3f s %.1f MB/s (heap sys %d MiB)\n", d, n, el.Seconds(), float64(n)/1e6/el.Seconds(), ms.HeapSys>>20)
}

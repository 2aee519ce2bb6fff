// Command gencorpus writes the qcow2 reader's malicious-image corpus to
// qcow2/testdata/corpus. Run from the repository root:
//
//	go run ./qcow2/internal/gencorpus
package main

import (
	"flag"
	"log"
	"os"
	"path/filepath"

	"imagestore/qcow2/internal/corpus"
)

func main() {
	dir := flag.String("dir", "qcow2/testdata/corpus", "output directory")
	flag.Parse()
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		log.Fatal(err)
	}
	for _, im := range corpus.All() {
		if err := os.WriteFile(filepath.Join(*dir, im.Name+".qcow2"), im.Bytes, 0o644); err != nil {
			log.Fatal(err)
		}
	}
}

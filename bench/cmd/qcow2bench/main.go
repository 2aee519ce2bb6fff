// Command qcow2bench times imagestore's qcow2 Flatten and Normalize on real
// files, for bench/qcow2.sh. It prints one line: operation, bytes, seconds,
// MB/s and the process's peak RSS.
//
//	qcow2bench flatten [-format qcow2|raw] [-zstd] -o out layer-base.qcow2 ... layer-top.qcow2
//	qcow2bench normalize [-backing name] [-zstd] -o out delta.qcow2
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime/pprof"
	"time"

	"golang.org/x/sys/unix"

	"imagestore/qcow2"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "qcow2bench:", err)
		os.Exit(1)
	}
}

// run is the benchmark script, in the order it measures; kept in one piece
// so each figure printed sits next to the lines that produced it.
func run(args []string) error {
	if len(args) < 1 {
		return fmt.Errorf("usage: qcow2bench flatten|normalize [flags] files")
	}
	op := args[0]
	fs := flag.NewFlagSet(op, flag.ContinueOnError)
	out := fs.String("o", "", "output file")
	format := fs.String("format", "qcow2", "flatten output format")
	backing := fs.String("backing", "", "backing file name for normalize")
	zstd := fs.Bool("zstd", false, "zstd-compressed clusters")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile here")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *out == "" || fs.NArg() == 0 {
		return fmt.Errorf("need -o and input files")
	}
	var layers []*qcow2.Image
	for _, p := range fs.Args() {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		im, err := qcow2.Open(f, st.Size())
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		layers = append([]*qcow2.Image{im}, layers...) // top first
	}
	w, err := os.Create(*out)
	if err != nil {
		return err
	}
	defer w.Close()
	if *cpuprofile != "" {
		pf, err := os.Create(*cpuprofile)
		if err != nil {
			return err
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	ctx := context.Background()
	opts := qcow2.WriteOptions{Compress: *zstd, BackingFile: *backing}
	start := time.Now()
	var guest int64
	switch op {
	case "flatten":
		c, err := qcow2.NewChain(layers...)
		if err != nil {
			return err
		}
		guest = c.VirtualSize()
		if _, err := qcow2.Flatten(ctx, w, c, *format, opts); err != nil {
			return err
		}
	case "normalize":
		if len(layers) != 1 {
			return fmt.Errorf("normalize takes one file")
		}
		guest = layers[0].AllocatedBytes()
		if _, err := qcow2.Normalize(ctx, w, layers[0], opts); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown operation %q", op)
	}
	secs := time.Since(start).Seconds()
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	_, err = fmt.Fprintf(os.Stdout, "%s bytes=%d seconds=%.3f MB/s=%.1f maxrss_MiB=%.1f\n",
		op, guest, secs, float64(guest)/secs/1e6, float64(ru.Maxrss)/1024)
	return err
}

// Command pullbench runs one host pull in-process (agent/hostxfer, the
// service behind pullfromhost, over a fresh or given store) and prints the
// new image's install path, the host bytes read, the elapsed time and this
// process's CPU seconds, for bench/pull.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"
	"syscall"
	"time"

	"imagestore/agent/hostxfer"
	"imagestore/agent/images"
	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/layer"
)

func main() {
	root := flag.String("root", "", "store root")
	knownHosts := flag.String("known-hosts", "", "known_hosts file")
	keyFile := flag.String("key", "", "private key file")
	host := flag.String("host", "127.0.0.1", "ssh host")
	port := flag.Int("port", 22, "ssh port")
	user := flag.String("user", os.Getenv("USER"), "ssh user")
	path := flag.String("path", "", "qcow2 path on the host")
	parent := flag.String("parent", "", "parent install path")
	par := flag.Int("parallelism", 4, "streams")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the pull here")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "pullbench:", err)
			os.Exit(1)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "pullbench:", err)
			os.Exit(1)
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	if err := run(*root, *knownHosts, *keyFile, *host, *port, *user, *path, *parent, *par); err != nil {
		fmt.Fprintln(os.Stderr, "pullbench:", err)
		os.Exit(1)
	}
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func run(root, knownHosts, keyFile, host string, port int, user, path, parent string, par int) error {
	ctx := context.Background()
	key, err := os.ReadFile(keyFile)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	store, err := blobstore.Open(ctx, blobstore.Options{Root: root})
	if err != nil {
		return err
	}
	defer store.Close()
	layers, err := layer.New(layer.Options{Blobs: store, Logger: log})
	if err != nil {
		return err
	}
	imgs, err := images.New(images.Options{Store: store, Logger: log})
	if err != nil {
		return err
	}
	x, err := hostxfer.New(hostxfer.Options{Layers: layers, Images: imgs, KnownHostsFile: knownHosts, Logger: log})
	if err != nil {
		return err
	}
	defer x.Close()
	req := hostxfer.PullRequest{
		Login: hostxfer.Login{Hostname: host, Port: port, Username: user, PrivateKey: string(key)},
		Path:  path, Parent: parent, Name: "vol", Parallelism: par,
	}
	cpu0, t0 := cpuSeconds(), time.Now()
	res, err := x.Pull(ctx, req, jobs.Nop{})
	elapsed, cpu := time.Since(t0).Seconds(), cpuSeconds()-cpu0
	if err != nil {
		return fmt.Errorf("pull failed: %w", err)
	}
	fmt.Printf("%s %d %.3f %.2f\n", res.Image.InstallPath(), res.HostBytesRead, elapsed, cpu)
	return nil
}

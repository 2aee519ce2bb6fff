// Command pullbench runs one agent pullfromhost request in-process (the
// real agent handler over a fresh or given store) and prints the reply with
// the elapsed time and this process's CPU seconds, for bench/pull.sh.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime/pprof"
	"syscall"
	"time"

	"imagestore/agent"
	"imagestore/agent/config"
	"imagestore/blobstore"
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
	store, err := blobstore.Open(ctx, blobstore.Options{Root: root})
	if err != nil {
		return err
	}
	defer store.Close()
	cfg := config.Default()
	cfg.Root = root
	cfg.KnownHostsFile = knownHosts
	a, err := agent.New(cfg, store, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		return err
	}
	defer a.Close()
	body := map[string]any{
		"hostname": host, "sshPort": port, "username": user, "privateKey": string(key),
		"path": path, "parallelism": par, "name": "vol",
	}
	if parent != "" {
		body["parent"] = parent
	}
	b, _ := json.Marshal(body)
	cpu0, t0 := cpuSeconds(), time.Now()
	rec := httptest.NewRecorder()
	a.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/imagestore/pullfromhost-sync/", bytes.NewReader(b)))
	elapsed, cpu := time.Since(t0).Seconds(), cpuSeconds()-cpu0
	var out map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		return fmt.Errorf("reply %q: %w", rec.Body.String(), err)
	}
	if out["success"] != true {
		return fmt.Errorf("pull failed: %v", out["error"])
	}
	fmt.Printf("%s %v %.3f %.2f\n", out["installPath"], int64(out["hostBytesRead"].(float64)), elapsed, cpu)
	return nil
}

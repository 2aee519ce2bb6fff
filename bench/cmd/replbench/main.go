// Command replbench measures replication between two stores over loopback
// TCP for bench/replicate.sh. Both registries run in this process, each on
// its own 127.0.0.1 port, and the push is driven through A's /v1/push over
// HTTP exactly as a management node would.
//
//	replbench prepare -root DIR -size-mb 4096 -layers 16   # prints: name id bytes
//	replbench push -src DIR -dst DIR -name N -id I -parallel 4  # prints: bytes seconds
//	replbench noop -images 1000                            # prints: images seconds
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"imagestore/blobstore"
	"imagestore/transfer/registry"
	"imagestore/transfer/replicate"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: replbench prepare|push|noop [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "prepare":
		err = prepare(os.Args[2:])
	case "push":
		err = push(os.Args[2:])
	case "noop":
		err = noop(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "replbench:", err)
		os.Exit(1)
	}
}

// randReader yields incompressible bytes quickly (ChaCha8).
type randReader struct{ r *rand.ChaCha8 }

func (r randReader) Read(p []byte) (int, error) { return r.r.Read(p) }

func prepare(args []string) error {
	fs := flag.NewFlagSet("prepare", flag.ExitOnError)
	root := fs.String("root", "", "store root")
	sizeMB := fs.Int64("size-mb", 4096, "total MiB of layers")
	layers := fs.Int("layers", 16, "layers in the chain")
	_ = fs.Parse(args)
	ctx := context.Background()
	st, err := blobstore.Open(ctx, blobstore.Options{Root: *root})
	if err != nil {
		return err
	}
	defer st.Close()
	per := (*sizeMB << 20) / int64(*layers)
	var seed [32]byte
	seed[0] = 42
	rr := randReader{rand.NewChaCha8(seed)}
	parent := ""
	var total int64
	var img blobstore.Image
	for i := 0; i < *layers; i++ {
		d, n, err := st.Put(ctx, io.LimitReader(rr, per), per, "")
		if err != nil {
			return err
		}
		img = blobstore.Image{Ref: blobstore.Ref{Name: "benchvol", ID: fmt.Sprintf("layer%03d", i)}, Blob: d, Parent: parent, Size: n, Format: "raw"}
		if err := st.PutImage(ctx, img); err != nil {
			return err
		}
		parent = img.Ref.String()
		total += n
	}
	fmt.Println(img.Name, img.ID, total)
	return nil
}

type node struct {
	st   *blobstore.Store
	eng  *replicate.Engine
	srv  *http.Server
	addr string
	hc   *http.Client // to the node's registry
}

func startNode(root string, parallel int) (*node, error) {
	ctx := context.Background()
	st, err := blobstore.Open(ctx, blobstore.Options{Root: root})
	if err != nil {
		return nil, err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	eng, err := replicate.New(replicate.Options{Store: st, Dir: filepath.Join(root, "registry", "tasks"), Parallelism: parallel, MaxTasks: 16, Logger: log})
	if err != nil {
		return nil, err
	}
	reg, err := registry.New(registry.Options{Store: st, Engine: eng, Logger: log})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	n := &node{st: st, eng: eng, srv: &http.Server{Handler: reg.Handler()}, addr: ln.Addr().String(),
		hc: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}}
	go func() { _ = n.srv.Serve(ln) }()
	return n, nil
}

func (n *node) close() {
	n.srv.Close()
	n.eng.Close()
	n.st.Close()
}

// postPush asks a's registry to push name:id to peer; returns the task id or "existed".
func postPush(a *node, peer, name, id string) (string, error) {
	body, _ := json.Marshal(replicate.Request{Name: name, ID: id, Addr: peer})
	resp, err := a.hc.Post("http://"+a.addr+"/v1/push", "application/json", bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("/v1/push: %d %s", resp.StatusCode, b)
	}
	return resp.Header.Get("X-Sync-Task-ID"), nil
}

func waitTask(a *node, id string) error {
	for {
		resp, err := a.hc.Get("http://" + a.addr + "/v1/tasks/" + id)
		if err != nil {
			return err
		}
		var t struct{ Status, Error string }
		err = json.NewDecoder(resp.Body).Decode(&t)
		resp.Body.Close()
		if err != nil {
			return err
		}
		switch t.Status {
		case "success":
			return nil
		case "failed":
			return errors.New(t.Error)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func push(args []string) error {
	fs := flag.NewFlagSet("push", flag.ExitOnError)
	src := fs.String("src", "", "source store root")
	dst := fs.String("dst", "", "destination store root")
	name := fs.String("name", "", "image name")
	id := fs.String("id", "", "image id")
	parallel := fs.Int("parallel", 4, "blob streams")
	_ = fs.Parse(args)
	a, err := startNode(*src, *parallel)
	if err != nil {
		return err
	}
	defer a.close()
	b, err := startNode(*dst, *parallel)
	if err != nil {
		return err
	}
	defer b.close()
	chain, err := a.st.Chain(context.Background(), blobstore.Ref{Name: *name, ID: *id})
	if err != nil {
		return err
	}
	var total int64
	for _, img := range chain {
		total += img.Size
	}
	t0 := time.Now()
	task, err := postPush(a, b.addr, *name, *id)
	if err != nil {
		return err
	}
	if err := waitTask(a, task); err != nil {
		return err
	}
	fmt.Printf("%d %.3f\n", total, time.Since(t0).Seconds())
	return nil
}

func noop(args []string) error {
	fs := flag.NewFlagSet("noop", flag.ExitOnError)
	images := fs.Int("images", 1000, "images")
	_ = fs.Parse(args)
	dir, err := os.MkdirTemp("", "replbench-noop-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	a, err := startNode(filepath.Join(dir, "a"), 4)
	if err != nil {
		return err
	}
	defer a.close()
	b, err := startNode(filepath.Join(dir, "b"), 4)
	if err != nil {
		return err
	}
	defer b.close()
	ctx := context.Background()
	for i := 0; i < *images; i++ {
		data := fmt.Appendf(nil, "image %d of the no-op resync benchmark", i)
		d, n, err := a.st.Put(ctx, bytes.NewReader(data), int64(len(data)), "")
		if err != nil {
			return err
		}
		if err := a.st.PutImage(ctx, blobstore.Image{Ref: blobstore.Ref{Name: "noop", ID: fmt.Sprintf("img%04d", i)}, Blob: d, Size: n, Format: "raw"}); err != nil {
			return err
		}
	}
	// First sync (not timed).
	for i := 0; i < *images; i++ {
		task, err := postPush(a, b.addr, "noop", fmt.Sprintf("img%04d", i))
		if err != nil {
			return err
		}
		if task != replicate.Existed {
			if err := waitTask(a, task); err != nil {
				return err
			}
		}
	}
	// The resync: every push must answer "existed".
	t0 := time.Now()
	for i := 0; i < *images; i++ {
		task, err := postPush(a, b.addr, "noop", fmt.Sprintf("img%04d", i))
		if err != nil {
			return err
		}
		if task != replicate.Existed {
			return fmt.Errorf("img%04d: resync started task %s", i, task)
		}
	}
	fmt.Printf("%d %.3f\n", *images, time.Since(t0).Seconds())
	return nil
}

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"imagestore/agent/config"
	"imagestore/blobstore/s3/rgwtest"
	"imagestore/internal/lockedbuf"
)

var agentBin, cliBin, zstcliBin string

// TestMain builds the real daemon once; tests run it as a subprocess.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "imagestore-cli-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	agentBin = filepath.Join(dir, "imagestore-agent")
	// add's host-local index: never the machine's own.
	os.Setenv("IMAGESTORE_STATE_DIR", filepath.Join(dir, "state"))
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = "/usr/local/go/bin/go"
	}
	out, err := exec.Command(gobin, "build", "-o", agentBin, "imagestore/cmd/imagestore-agent").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building daemon: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	cliBin = filepath.Join(dir, "imagestore")
	out, err = exec.Command(gobin, "build", "-o", cliBin, "imagestore/cmd/imagestore").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building the CLI: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	// Called through a symlink named zstcli, as the cloud installs it.
	zstcliBin = filepath.Join(dir, "zstcli")
	if err := os.Symlink(cliBin, zstcliBin); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := rgw.Run(m)
	os.RemoveAll(dir)
	os.Exit(code)
}

// store is a real imagestore-agent on a temp store: url is its registry
// port, agentURL its management port.
type store struct {
	url      string
	addr     string
	agentURL string
	token    string
	root     string // the store's directory

	logs lockedbuf.Buffer
}

// startStore runs the daemon on 127.0.0.1:0 ports with a fresh store.
func startStore(t *testing.T, token string) *store {
	t.Helper()
	return startStoreWith(t, token, "")
}

// rgw is this test process's one Ceph RGW cluster, started by the first
// test that keeps a store on S3 (TestMain closes it).
var rgw rgwtest.Shared

// storageKinds are where the flows that store bytes keep the store: on
// local disk and in an S3 bucket (storage.type s3).
var storageKinds = []string{"local", "s3"}

// startStoreOn is startStore with the store kept where kind says: under
// its root ("local"), or in a fresh bucket of the test cluster ("s3"),
// with the keys in the environment as an operator would give them.
func startStoreOn(t *testing.T, token, kind string) *store {
	t.Helper()
	if kind != "s3" {
		return startStore(t, token)
	}
	c := rgw.Get(t)
	storage := fmt.Sprintf("storage:\n  type: s3\n  endpoint: %s\n  bucket: %s\n  prefix: store\n  region: %s\n  pathStyle: true\n",
		c.Endpoint, c.TestBucket(t), c.Region)
	return startStoreEnv(t, token, storage, []string{config.EnvS3AccessKey + "=" + c.AccessKey, config.EnvS3SecretKey + "=" + c.SecretKey})
}

// startStoreWith is startStore with extra YAML lines in the config (TLS).
func startStoreWith(t *testing.T, token, extra string) *store {
	t.Helper()
	return startStoreEnv(t, token, extra, nil)
}

// startStoreEnv is startStoreWith with more environment for the daemon.
func startStoreEnv(t *testing.T, token, extra string, env []string) *store {
	t.Helper()
	dir := t.TempDir()
	// Our own profile unless extra names one: these tests exercise our
	// protections (token, one tls block).
	profile := "profile: imagestore\n"
	if strings.Contains(extra, "profile:") {
		profile = ""
	}
	cfg := profile + fmt.Sprintf(`root: %s
listen: 127.0.0.1:0
registryListen: 127.0.0.1:0
logFormat: json
logLevel: debug
callbackRetries: 2
callbackMaxDelay: 100ms
verifyInterval: 0s
shutdownTimeout: 5s
token: %q
`, filepath.Join(dir, "store"), token) + extra
	cfgPath := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	s := &store{token: token, root: filepath.Join(dir, "store")}
	cmd := exec.Command(agentBin, "-config", cfgPath)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	agentAddr, regAddr := make(chan string, 1), make(chan string, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			fmt.Fprintf(&s.logs, "%s\n", line)
			var rec struct{ Msg, Addr, Scheme string }
			if json.Unmarshal(line, &rec) == nil {
				if rec.Scheme == "" {
					rec.Scheme = "http"
				}
				switch rec.Msg {
				case "listening":
					agentAddr <- rec.Scheme + "://" + rec.Addr
				case "registry listening":
					regAddr <- rec.Scheme + "://" + rec.Addr
				}
			}
		}
		_ = cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("daemon log:\n%s", s.logs.String())
		}
	})
	for s.url == "" || s.agentURL == "" {
		select {
		case u := <-agentAddr:
			s.agentURL = u
		case u := <-regAddr:
			s.url = u
			_, s.addr, _ = strings.Cut(u, "://")
		case <-done:
			t.Fatal("daemon exited before listening")
		case <-time.After(60 * time.Second):
			t.Fatal("daemon did not start")
		}
	}
	return s
}

// received is the blob bytes the store took in through uploads
// (imagestore_replication_received_bytes_total on /metrics).
func (s *store) received(t *testing.T) int64 {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, s.agentURL+"/metrics", nil)
	if s.token != "" {
		req.Header.Set("Authorization", "Bearer "+s.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "imagestore_replication_received_bytes_total "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatal(err)
			}
			return int64(f)
		}
	}
	t.Fatalf("metrics (HTTP %d) lack imagestore_replication_received_bytes_total", resp.StatusCode)
	return 0
}

// post calls the agent protocol.
func (s *store) post(t *testing.T, path string, body any, hdr map[string]string) map[string]any {
	t.Helper()
	j, _ := json.Marshal(body)
	req, _ := http.NewRequest(http.MethodPost, s.agentURL+path, bytes.NewReader(j))
	req.Header.Set("Content-Type", "application/json")
	if s.token != "" {
		req.Header.Set("Authorization", "Bearer "+s.token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var v map[string]any
	if resp.StatusCode != http.StatusOK || json.Unmarshal(raw, &v) != nil || v["success"] != true {
		t.Fatalf("POST %s: HTTP %d: %s", path, resp.StatusCode, raw)
	}
	return v
}

// cli runs the command in-process (as imagestore) and returns stdout,
// stderr and the exit code.
func cli(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	return runFace(t, faceImagestore, args...)
}

// zcli runs the command in-process as zstcli.
func zcli(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	return runFace(t, faceZstcli, args...)
}

func runFace(t *testing.T, f face, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errb lockedbuf.Buffer
	code := run(ctx, f, args, &out, &errb)
	return out.String(), errb.String(), code
}

// cliOK runs the command and fails the test unless it exits 0.
func cliOK(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, code := cli(t, args...)
	if code != 0 {
		t.Fatalf("imagestore %q: exit %d\nstdout: %s\nstderr: %s", args, code, out, errs)
	}
	return out
}

func cliJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	out := cliOK(t, args...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("imagestore %q: bad JSON %v: %s", args, err, out)
	}
}

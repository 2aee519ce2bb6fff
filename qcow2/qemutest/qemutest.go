// Package qemutest drives the real qemu-img and qemu-io as an oracle for the
// qcow2 package's tests. Every helper fails the test (never skips) when a tool
// is missing, because the tools are part of the test environment.
package qemutest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Timeout bounds every tool invocation so a hung qemu cannot hang the suite.
const Timeout = 2 * time.Minute

// Run executes a tool and returns its stdout; it fails the test on error.
func Run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	out, err := RunErr(name, args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}

// RunErr executes a tool and returns its stdout, or an error with stderr.
func RunErr(name string, args ...string) ([]byte, error) {
	bin, err := exec.LookPath(name)
	if err != nil {
		return nil, fmt.Errorf("%s not installed: %w", name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %q: %w: %s%s", name, args, err, stderr.Bytes(), stdout.Bytes())
	}
	return stdout.Bytes(), nil
}

// Create makes a qcow2 image with `qemu-img create -f qcow2 -o <opts> path size`.
// opts is a comma-separated -o string such as "compat=0.10,cluster_size=512"
// (may be empty). Extra args (e.g. "-b", "base.qcow2", "-F", "qcow2") go before path.
func Create(t testing.TB, path string, size int64, opts string, extra ...string) {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	args = append(args, extra...)
	args = append(args, path, strconv.FormatInt(size, 10))
	Run(t, "qemu-img", args...)
}

// IO runs qemu-io commands (e.g. "write -P 0xab 0 64k", "write -z 1M 64k",
// "discard 0 64k") against a qcow2 image, in one process.
func IO(t testing.TB, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, path)
	out := Run(t, "qemu-io", args...)
	// qemu-io reports command failures on stdout with exit status 0.
	if bytes.Contains(out, []byte("failed")) || bytes.Contains(out, []byte("error")) {
		t.Fatalf("qemu-io %q: %s", cmds, out)
	}
}

// Convert runs `qemu-img convert` with the given arguments.
func Convert(t testing.TB, args ...string) {
	t.Helper()
	Run(t, "qemu-img", append([]string{"convert"}, args...)...)
}

// ConvertRaw converts a qcow2 image (with its backing chain, as qemu resolves
// it) to raw in a temporary file and returns the sha256 digest of the raw bytes.
func ConvertRaw(t testing.TB, path string) digest.Digest {
	t.Helper()
	dir := t.TempDir()
	raw := filepath.Join(dir, "out.raw")
	Run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw)
	f, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return digest.NewDigest(digest.SHA256, h)
}

// DigestReaderAt streams size bytes of r through sha256, in the same form
// as ConvertRaw, so a guest view can be compared with qemu's.
func DigestReaderAt(t testing.TB, r io.ReaderAt, size int64) digest.Digest {
	t.Helper()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(r, 0, size)); err != nil {
		t.Fatalf("reading guest view: %v", err)
	}
	return digest.NewDigest(digest.SHA256, h)
}

// Extent is one merged range of `qemu-img map --output=json` at depth 0.
// Kind is "data", "zero" or "unallocated", matching qcow2.Kind.String().
type Extent struct {
	Offset int64
	Length int64
	Kind   string
}

type mapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present *bool  `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset"`
}

// Map returns qemu-img's view of this layer alone: entries at depth 0 that are
// present with data → "data", present without data → "zero"; anything deeper
// or not present → "unallocated" (qemu reports unallocated ranges of an image
// without backing as depth 0, zero, not present). Adjacent entries of the same kind are merged.
func Map(t testing.TB, path string) []Extent {
	t.Helper()
	out := Run(t, "qemu-img", "map", "-f", "qcow2", "--output=json", path)
	var entries []mapEntry
	if err := json.Unmarshal(out, &entries); err != nil {
		t.Fatalf("qemu-img map output: %v: %s", err, out)
	}
	var res []Extent
	for _, e := range entries {
		kind := "unallocated"
		present := e.Present == nil || *e.Present // older qemu lacks "present"
		if e.Depth == 0 && present {
			switch {
			case e.Data:
				kind = "data"
			case e.Zero:
				kind = "zero"
			}
		}
		if n := len(res); n > 0 && res[n-1].Kind == kind && res[n-1].Offset+res[n-1].Length == e.Start {
			res[n-1].Length += e.Length
			continue
		}
		res = append(res, Extent{Offset: e.Start, Length: e.Length, Kind: kind})
	}
	return res
}

// CheckResult is the subset of `qemu-img check --output=json` tests assert on.
type CheckResult struct {
	Corruptions      int   `json:"corruptions"`
	Leaks            int   `json:"leaks"`
	CheckErrors      int   `json:"check-errors"`
	ImageEndOffset   int64 `json:"image-end-offset"`
	AllocatedCluster int64 `json:"allocated-clusters"`
}

// Check runs `qemu-img check` and fails the test on any corruption, leak or error.
func Check(t testing.TB, path string) CheckResult {
	t.Helper()
	out, err := RunErr("qemu-img", "check", "-f", "qcow2", "--output=json", path)
	var res CheckResult
	if jerr := json.Unmarshal(out, &res); err != nil || jerr != nil {
		t.Fatalf("qemu-img check %s: %v %v: %s", path, err, jerr, out)
	}
	if res.Corruptions != 0 || res.Leaks != 0 || res.CheckErrors != 0 {
		t.Fatalf("qemu-img check %s: %s", path, out)
	}
	return res
}

// Compare fails the test unless `qemu-img compare` says the guest views of
// a and b are identical (formats are probed; pass qcow2 or raw files).
func Compare(t testing.TB, a, b string) {
	t.Helper()
	if out, err := RunErr("qemu-img", "compare", a, b); err != nil {
		t.Fatalf("qemu-img compare %s %s: %v: %s", a, b, err, out)
	}
}

// Info returns `qemu-img info --output=json` decoded into a generic map.
func Info(t testing.TB, path string) map[string]any {
	t.Helper()
	out := Run(t, "qemu-img", "info", "-f", "qcow2", "--output=json", path)
	var m map[string]any
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("qemu-img info output: %v: %s", err, out)
	}
	return m
}

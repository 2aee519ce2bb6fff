package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/agent/api"
	"imagestore/internal/testwait"
	"imagestore/qcow2"
	"imagestore/qcow2/qemutest"
	"imagestore/transfer/faultproxy"
	"imagestore/transfer/oci"
)

const vsize = 64 << 20

// chainFixture builds base.qcow2 and three deltas with qemu-img/qemu-io
// (data, zeroes and discards), each delta backed by the previous file.
func chainFixture(t *testing.T) []string {
	t.Helper()
	dir := t.TempDir()
	files := []string{filepath.Join(dir, "base.qcow2")}
	qemutest.Create(t, files[0], vsize, "")
	qemutest.IO(t, files[0], "write -P 0x11 0 4M", "write -P 0x22 10M 3M", "write -P 0x33 40M 64k", "write -z 50M 1M")
	cmds := [][]string{
		{"write -P 0x44 1M 1M", "write -z 10M 1M", "write -P 0x55 63M 512k"},
		{"discard 0 512k", "write -P 0x66 20M 2M", "write -P 0x77 4092k 8k"},
		{"write -z 0 8M", "write -P 0x88 30M 4k", "write -P 0x99 60M 3M"},
	}
	for i, c := range cmds {
		f := filepath.Join(dir, "d"+string(rune('1'+i))+".qcow2")
		qemutest.Create(t, f, vsize, "", "-b", filepath.Base(files[len(files)-1]), "-F", "qcow2")
		qemutest.IO(t, f, c...)
		files = append(files, f)
	}
	return files
}

// TestPushPullChain pushes a 4-layer chain and pulls each top back, with
// the store on local disk and on S3.
func TestPushPullChain(t *testing.T) {
	for _, kind := range storageKinds {
		t.Run(kind, func(t *testing.T) { testPushPullChain(t, kind) })
	}
}

func testPushPullChain(t *testing.T, kind string) {
	s := startStoreOn(t, "s3cret", kind)
	files := chainFixture(t)
	g := []string{"-url", s.url, "-token", s.token, "-quiet"}
	name := "vol-1"
	parent := ""
	var refs, sums []string
	for i, f := range files {
		args := append(append([]string{}, g...), "push", "-json", "-name", name)
		if parent != "" {
			args = append(args, "-parent", parent)
		}
		var res pushResult
		cliJSON(t, &res, append(args, f)...)
		if res.Name != name || res.ID == "" || res.VirtualSize != vsize || res.Size <= 0 || res.Sent != res.Size {
			t.Fatalf("push %d: %+v", i, res)
		}
		parent = res.Name + ":" + res.ID
		refs = append(refs, parent)
		sums = append(sums, res.Blobsum)
	}
	// Each top pulled standalone equals the source chain at that point.
	out := t.TempDir()
	for i, ref := range refs {
		dst := filepath.Join(out, "pulled.qcow2") // overwritten each round: the rename replaces it
		var res pullResult
		cliJSON(t, &res, append(append([]string{}, g...), "pull", "-json", "-installpath", dst, ref)...)
		if res.Layers != i+1 || res.Format != "qcow2" {
			t.Fatalf("pull %s: %+v", ref, res)
		}
		qemutest.Check(t, dst)
		qemutest.Compare(t, dst, files[i])
		if info := qemutest.Info(t, dst); info["backing-filename"] != nil {
			t.Fatalf("pulled image has a backing file: %v", info["backing-filename"])
		}
	}
	raw := filepath.Join(out, "pulled.raw")
	cliOK(t, append(append([]string{}, g...), "pull", "-format", "raw", "-installpath", raw, refs[3])...)
	qemutest.Compare(t, raw, files[3])
	if left, _ := filepath.Glob(filepath.Join(out, ".*")); len(left) != 0 {
		t.Fatalf("pull left temp files: %v", left)
	}

	// Pushing the same delta again gives the same layer: the encoder is
	// deterministic (the bytes stream again, -mount=false; the digest is
	// learnt at the end).
	var again pushResult
	cliJSON(t, &again, append(append([]string{}, g...), "push", "-json", "-mount=false", "-name", name, "-id", "again", "-parent", refs[2], files[3])...)
	if again.Blobsum != sums[3] || again.Sent != again.Size {
		t.Fatalf("re-push: %+v, first push's blobsum %s", again, sums[3])
	}

	// info and images shapes.
	var info map[string]any
	cliJSON(t, &info, append(append([]string{}, g...), "info", "-json", refs[1])...)
	for _, k := range []string{"id", "name", "parent", "blobsum", "created", "author", "arch", "desc", "size", "virtualsize", "format", "installPath"} {
		if _, ok := info[k]; !ok {
			t.Errorf("info lacks %q: %v", k, info)
		}
	}
	if info["parent"] != refs[0] || info["virtualsize"] != float64(vsize) || !strings.HasPrefix(info["blobsum"].(string), "sha256:") {
		t.Fatalf("info: %v", info)
	}
	var imgs api.ListImagesReply
	cliJSON(t, &imgs, append(append([]string{}, g...), "images", "-json", "-name", name)...)
	if len(imgs.Infos) != 5 {
		t.Fatalf("images: %d infos, want 5: %+v", len(imgs.Infos), imgs)
	}
	var empty map[string]json.RawMessage
	cliJSON(t, &empty, append(append([]string{}, g...), "images", "-json", "-name", "nothing-here")...)
	if string(empty["infos"]) != "[]" {
		t.Fatalf("images of an empty repository: %s", empty["infos"])
	}
	// Text output names the image.
	if out := cliOK(t, append(append([]string{}, g...), "info", refs[3])...); !strings.Contains(out, refs[3]) {
		t.Fatalf("info text: %s", out)
	}
}

func TestPushRaw(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	b := make([]byte, 8<<20)
	for i := 2 << 20; i < 3<<20; i++ {
		b[i] = byte(i)
	}
	if err := os.WriteFile(raw, b, 0o644); err != nil {
		t.Fatal(err)
	}
	var res pushResult
	cliJSON(t, &res, "-url", s.url, "-quiet", "push", "-json", raw)
	if res.VirtualSize != 8<<20 || res.Size >= 8<<20 {
		t.Fatalf("push raw: %+v (zero clusters should not be stored)", res)
	}
	dst := filepath.Join(dir, "out.qcow2")
	cliOK(t, "-url", s.url, "-quiet", "pull", "-installpath", dst, res.Name+":"+res.ID)
	qemutest.Check(t, dst)
	qemutest.Compare(t, dst, raw)
}

func TestErrors(t *testing.T) {
	s := startStore(t, "right")
	files := chainFixture(t)
	dir := t.TempDir()
	notImg := filepath.Join(dir, "bad.qcow2")
	// A qcow2 magic with a garbage header is refused (not taken as raw).
	if err := os.WriteFile(notImg, append([]byte("QFI\xfb\x00\x00\x00\x09"), make([]byte, 4096)...), 0o644); err != nil {
		t.Fatal(err)
	}
	var base pushResult
	cliJSON(t, &base, "-url", s.url, "-token", "right", "-quiet", "push", "-json", "-name", "v", files[0])
	other := filepath.Join(dir, "other.qcow2")
	qemutest.Create(t, other, vsize*2, "")
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"wrong token push", []string{"-token", "wrong", "push", files[0]}, 1, "authentication failed"},
		{"wrong token pull", []string{"-token", "wrong", "pull", "-installpath", filepath.Join(dir, "x"), "v:" + base.ID}, 1, "authentication failed"},
		{"no token info", []string{"-token", "", "info", "v:" + base.ID}, 1, "authentication failed"},
		{"missing image", []string{"-token", "right", "info", "v:nope"}, 1, "no such image"},
		{"bad ref", []string{"-token", "right", "info", "v/../x"}, 2, "not of the form"},
		{"bad qcow2", []string{"-token", "right", "push", notImg}, 1, "qcow2"},
		{"size differs from parent", []string{"-token", "right", "push", "-parent", "v:" + base.ID, other}, 1, "virtual size"},
		{"missing parent", []string{"-token", "right", "push", "-parent", "v:nope", files[1]}, 1, "parent"},
		{"pull without installpath", []string{"pull", "v:" + base.ID}, 2, "installpath"},
		{"unknown command", []string{"frobnicate"}, 2, "unknown command"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, code := cli(t, append([]string{"-url", s.url, "-quiet"}, tc.args...)...)
			if code != tc.code || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d (want %d), stderr %q (want %q), stdout %q", code, tc.code, errs, tc.want, out)
			}
			if strings.Contains(errs, "right") {
				t.Fatalf("token printed: %s", errs)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); !os.IsNotExist(err) {
		t.Fatalf("failed pull created its destination: %v", err)
	}
}

// writeNoise writes n incompressible bytes (xorshift from seed) to path
// and returns them.
func writeNoise(t *testing.T, path string, n int, seed uint64) []byte {
	t.Helper()
	b := make([]byte, n)
	x := seed
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPushResume cuts the upload connection several times: the push
// resumes from the store's durable offset and the stored blob verifies.
func TestPushResume(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	raw := filepath.Join(dir, "noise.raw")
	// Incompressible data, so the upload is long enough to be cut.
	writeNoise(t, raw, 12<<20, 0x9e3779b97f4a7c15)
	p := faultproxy.New(t, s.addr)
	p.CutAfter(3 << 20)
	p.CutNext(3)
	var res pushResult
	cliJSON(t, &res, "-url", "http://"+p.Addr(), "-quiet", "push", "-json", raw)
	if p.Cuts() < 3 {
		t.Fatalf("proxy cut %d times, want 3", p.Cuts())
	}
	// The store got the layer once plus at most the bytes in flight at each cut.
	if got := s.received(t); got < res.Size || got > res.Size+3*(3<<20) {
		t.Fatalf("store received %d bytes for a %d-byte layer", got, res.Size)
	}
	// The store named the layer (a checked upload): its digest is the one
	// our encoder's bytes have, computed here on the host as add does.
	if m, err := measureFile(t.Context(), raw); err != nil || m.digest.String() != res.Blobsum || m.size != res.Size {
		t.Fatalf("pushed %s (%d bytes), the file encodes to %s (%d) (%v)", res.Blobsum, res.Size, m.digest, m.size, err)
	}
	dst := filepath.Join(dir, "out.qcow2")
	cliOK(t, "-url", s.url, "-quiet", "pull", "-installpath", dst, res.Name+":"+res.ID)
	qemutest.Compare(t, dst, raw)
}

// TestPushCorruptedInTransit: a byte flipped between the CLI and the store
// fails the push with an error that says so (the frame's crc32c), and the
// store records nothing; the same push without the fault succeeds.
func TestPushCorruptedInTransit(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	raw := filepath.Join(dir, "noise.raw")
	b := writeNoise(t, raw, 8<<20, 0x2545f4914f6cdd1d)
	p := faultproxy.New(t, s.addr)
	p.FlipAt(5 << 20)
	out, errs, code := cli(t, "-url", "http://"+p.Addr(), "-quiet", "push", "-name", "vol", "-id", "a", raw)
	if code == 0 || !strings.Contains(errs, "corrupted in transit") || !strings.Contains(errs, oci.CodeChecksumInvalid) {
		t.Fatalf("push through a corrupting proxy: exit %d\nstdout: %s\nstderr: %s", code, out, errs)
	}
	if _, errs, code := cli(t, "-url", s.url, "info", "vol:a"); code == 0 {
		t.Fatalf("the failed push recorded vol:a (%s)", errs)
	}
	p.FlipAt(-1)
	var res pushResult
	cliJSON(t, &res, "-url", "http://"+p.Addr(), "-quiet", "push", "-json", "-name", "vol", "-id", "a", raw)
	dst := filepath.Join(dir, "out.raw")
	cliOK(t, "-url", s.url, "-quiet", "pull", "-format", "raw", "-installpath", dst, "vol:a")
	if got, err := os.ReadFile(dst); err != nil || !bytes.Equal(got, b) {
		t.Fatalf("pull after the clean push differs (%v)", err)
	}
}

// TestPullCut: a pull through a cutting proxy resumes (Range) and writes
// a verified file; with every connection cut it fails and leaves neither
// a destination nor temp files.
func TestPullCut(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	raw := filepath.Join(dir, "noise.raw")
	writeNoise(t, raw, 8<<20, 12345)
	var res pushResult
	cliJSON(t, &res, "-url", s.url, "-quiet", "push", "-json", raw)
	ref := res.Name + ":" + res.ID

	p := faultproxy.New(t, s.addr)
	p.CutAfter(2 << 20)
	p.CutNext(2)
	out := t.TempDir()
	dst := filepath.Join(out, "ok.qcow2")
	cliOK(t, "-url", "http://"+p.Addr(), "-quiet", "pull", "-installpath", dst, ref)
	if p.Cuts() < 1 {
		t.Fatal("proxy never cut the download")
	}
	qemutest.Compare(t, dst, raw)

	// Range reads resume from the bytes they got, so a cut after a few
	// hundred bytes (inside the reply headers) is what keeps a pull from
	// ever finishing.
	p.CutAfter(300)
	p.CutNext(-1)
	bad := filepath.Join(out, "bad.qcow2")
	if err := os.WriteFile(bad, []byte("old content"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, errs, code := cli(t, "-url", "http://"+p.Addr(), "-quiet", "pull", "-installpath", bad, ref)
	if code == 0 {
		t.Fatal("pull through an always-cutting proxy succeeded")
	}
	if got, err := os.ReadFile(bad); err != nil || string(got) != "old content" {
		t.Fatalf("failed pull touched %s: %q %v (%s)", bad, got, err, errs)
	}
	left, _ := filepath.Glob(filepath.Join(out, ".*"))
	if len(left) != 0 {
		t.Fatalf("failed pull left temp files: %v", left)
	}
}

// TestBandwidthLimit: -bwlimit holds a push of incompressible data to the
// limit (only a lower bound on the time is asserted: a loaded machine can
// only make it slower).
func TestBandwidthLimit(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	raw := filepath.Join(dir, "noise.raw")
	b := make([]byte, 6<<20)
	x := uint64(99)
	for i := range b {
		x = x*6364136223846793005 + 1442695040888963407
		b[i] = byte(x >> 56)
	}
	if err := os.WriteFile(raw, b, 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var res pushResult
	cliJSON(t, &res, "-url", s.url, "-quiet", "push", "-json", "-bwlimit", "3M", raw)
	// 6 MiB at 3 MiB/s: 2 s, less the limiter's small burst.
	if el := time.Since(start); el < 1700*time.Millisecond {
		t.Fatalf("push of %d bytes at 3 MiB/s took %v", res.Size, el)
	}
}

// TestNormalizeReaders: reading through the parallel prefetcher
// (-concurrency) gives the same canonical layer as plain reads.
func TestNormalizeReaders(t *testing.T) {
	files := chainFixture(t)
	for i, f := range files {
		opts := qcow2.WriteOptions{}
		if i > 0 {
			opts.BackingFile = "../00/parent"
		}
		var want []byte
		for _, readers := range []int{1, 2, 16} {
			src, err := os.Open(f)
			if err != nil {
				t.Fatal(err)
			}
			st, _ := src.Stat()
			im, err := qcow2.Open(src, st.Size())
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			n, err := normalizeQcow2(context.Background(), &buf, src, st.Size(), im, opts, readers)
			src.Close()
			if err != nil || n != int64(buf.Len()) {
				t.Fatalf("%s readers=%d: n=%d len=%d err=%v", f, readers, n, buf.Len(), err)
			}
			if want == nil {
				want = buf.Bytes()
			} else if !bytes.Equal(buf.Bytes(), want) {
				t.Fatalf("%s: readers=%d gives a different layer", f, readers)
			}
		}
	}
}

// TestPushZeroDataCluster: a qcow2 FILE with an allocated all-zero data
// cluster defeats push's one-pass guess (AssumeNoZeroData); the push starts
// over with the scan pass and stores exactly the canonical layer.
func TestPushZeroDataCluster(t *testing.T) {
	s := startStore(t, "")
	f := filepath.Join(t.TempDir(), "zeros.qcow2")
	qemutest.Create(t, f, vsize, "")
	qemutest.IO(t, f, "write -P 0x5a 0 1M", "write -P 0 8M 1M", "write -P 0x6b 20M 1M")
	src, err := os.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	st, _ := src.Stat()
	im, err := qcow2.Open(src, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	for _, compress := range []bool{false, true} {
		var buf bytes.Buffer
		if _, err := qcow2.Normalize(context.Background(), &buf, im, qcow2.WriteOptions{Compress: compress}); err != nil {
			t.Fatal(err)
		}
		var res pushResult
		cliJSON(t, &res, "-url", s.url, "-quiet", "push", "-json", "-compress="+strconv.FormatBool(compress), f)
		if want := digest.FromBytes(buf.Bytes()); res.Blobsum != want.String() || res.Size != int64(buf.Len()) {
			t.Fatalf("compress=%v: pushed %s (%d bytes), canonical layer is %s (%d bytes)", compress, res.Blobsum, res.Size, want, buf.Len())
		}
		dst := filepath.Join(t.TempDir(), "out.qcow2")
		cliOK(t, "-url", s.url, "-quiet", "pull", "-installpath", dst, res.Name+":"+res.ID)
		qemutest.Compare(t, dst, f)
	}
}

// TestCompressedChainInPlace: a base and a delta pushed with -compress are
// stored as qcow2 with zstd-compressed clusters that the real qemu reads
// in place: qemu-img check is clean on each blob, qemu-img compare of the
// stored top (its backing file resolved by name inside the store) equals
// the host's chain, and so does a read-only qemu-nbd serving the stored
// top (what instant restore serves). Compression pays: the base is
// stored smaller than plain.
func TestCompressedChainInPlace(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, vsize, "")
	// Text-like data compresses; a pattern of one byte per MiB too.
	text := filepath.Join(dir, "text")
	var b strings.Builder
	for i := 0; b.Len() < 4<<20; i++ {
		fmt.Fprintf(&b, "2026-12-07 01:%02d:%02d host-%d sshd[%d]: session %d opened for user backup\n", i/60%60, i%60, i%7, 1000+i%5000, i)
	}
	if err := os.WriteFile(text, []byte(b.String()[:4<<20]), 0o644); err != nil {
		t.Fatal(err)
	}
	qemutest.IO(t, base, "write -s "+text+" 0 4M", "write -P 0x33 16M 1M")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, vsize, "", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.IO(t, top, "write -s "+text+" 2M 4M", "write -z 16M 64k")

	var plain, rb, rt pushResult
	cliJSON(t, &plain, "-url", s.url, "-quiet", "push", "-json", "-name", "plain", base)
	cliJSON(t, &rb, "-url", s.url, "-quiet", "push", "-json", "-compress", "-name", "vol", base)
	cliJSON(t, &rt, "-url", s.url, "-quiet", "push", "-json", "-compress", "-parent", rb.Name+":"+rb.ID, top)
	if rb.Size*2 > plain.Size {
		t.Fatalf("compressed base is %d bytes, plain %d", rb.Size, plain.Size)
	}
	blob := func(sum string) string {
		hex := strings.TrimPrefix(sum, "sha256:")
		return filepath.Join(s.root, "blobs", "sha256", hex[:2], hex)
	}
	for _, sum := range []string{rb.Blobsum, rt.Blobsum} {
		qemutest.Check(t, blob(sum)) // fails on any corruption, leak or error
		if info := qemutest.Info(t, blob(sum)); info["format-specific"].(map[string]any)["data"].(map[string]any)["compression-type"] != "zstd" {
			t.Fatalf("stored layer is not zstd-compressed: %v", info["format-specific"])
		}
	}
	qemutest.Compare(t, blob(rt.Blobsum), top)

	sock := filepath.Join(dir, "nbd.sock")
	nbd := exec.Command("qemu-nbd", "-r", "-f", "qcow2", "--persistent", "-k", sock, blob(rt.Blobsum))
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nbd.Process.Kill(); _ = nbd.Wait() })
	testwait.For(t, "qemu-nbd socket", func() bool { _, err := os.Stat(sock); return err == nil })
	if out, err := qemutest.RunErr("qemu-img", "compare", "-f", "raw", "-F", "qcow2", "nbd+unix:///?socket="+sock, top); err != nil {
		t.Fatalf("qemu-nbd over the stored chain differs: %v: %s", err, out)
	}
}

// TestRepushMounts: a push of a file the last push already sent (same
// file, unchanged, same options) sends nothing when the store has the
// layer; a changed file, other options or a store without the layer get
// the bytes.
func TestRepushMounts(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	f := filepath.Join(dir, "disk.raw")
	b := bytes.Repeat([]byte("imagestore"), 4<<20/10+1)
	if err := os.WriteFile(f, b[:4<<20], 0o644); err != nil {
		t.Fatal(err)
	}
	// Only a file that had not changed for a while is remembered.
	time.Sleep(pushCacheSettle + 100*time.Millisecond)
	push := func(s *store, args ...string) pushResult {
		t.Helper()
		var res pushResult
		cliJSON(t, &res, append(append([]string{"-url", s.url, "-quiet", "push", "-json"}, args...), f)...)
		return res
	}
	first := push(s, "-name", "vol", "-id", "a")
	if first.Sent != first.Size || first.Size == 0 {
		t.Fatalf("first push: %+v", first)
	}
	before := s.received(t)
	again := push(s, "-name", "vol2", "-id", "b")
	if again.Sent != 0 || again.Blobsum != first.Blobsum || again.Size != first.Size {
		t.Fatalf("repush of an unchanged file: %+v, first %+v", again, first)
	}
	// Only the small config blob (the records) is uploaded.
	if got := s.received(t); got-before > 4096 {
		t.Fatalf("the store received %d bytes for a layer it had", got-before)
	}
	dst := filepath.Join(dir, "out.raw")
	cliOK(t, "-url", s.url, "-quiet", "pull", "-format", "raw", "-installpath", dst, "vol2:b")
	if got, err := os.ReadFile(dst); err != nil || !bytes.Equal(got, b[:4<<20]) {
		t.Fatalf("pull of the mounted layer differs from the file (%v)", err)
	}
	if c := push(s, "-name", "vol", "-id", "c", "-compress"); c.Sent != c.Size {
		t.Fatalf("other options: %+v", c)
	}
	if c := push(s, "-name", "vol", "-id", "e", "-mount=false"); c.Sent != c.Size || c.Blobsum != first.Blobsum {
		t.Fatalf("-mount=false: %+v", c)
	}
	if other := push(startStore(t, ""), "-name", "vol", "-id", "a"); other.Sent != other.Size {
		t.Fatalf("a store without the layer: %+v", other)
	}
	// A write changes the file's ctime: the remembered layer is not used.
	fh, err := os.OpenFile(f, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fh.WriteAt([]byte("X"), 1<<20); err != nil {
		t.Fatal(err)
	}
	fh.Close()
	changed := push(s, "-name", "vol", "-id", "d")
	if changed.Sent != changed.Size || changed.Blobsum == first.Blobsum {
		t.Fatalf("push of a changed file: %+v, first %+v", changed, first)
	}
}

// TestPullVerify: a layer damaged at rest on the store fails a pull (by
// default every layer is checked against its digest) and leaves DST as it
// was; -verify=false trusts the store and writes what it serves.
func TestPullVerify(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	f := filepath.Join(dir, "disk.raw")
	b := bytes.Repeat([]byte{7, 1, 2, 3}, 1<<20)
	if err := os.WriteFile(f, b, 0o644); err != nil {
		t.Fatal(err)
	}
	var res pushResult
	cliJSON(t, &res, "-url", s.url, "-quiet", "push", "-json", "-name", "vol", "-id", "a", f)
	dst := filepath.Join(dir, "out.raw")
	cliOK(t, "-url", s.url, "-quiet", "pull", "-format", "raw", "-installpath", dst, "vol:a")
	if got, _ := os.ReadFile(dst); !bytes.Equal(got, b) {
		t.Fatal("pull differs from the pushed file")
	}
	// Damage the last byte of the layer (plain data: the reader cannot tell).
	d := digest.Digest(res.Blobsum)
	blob := filepath.Join(s.root, "blobs", "sha256", d.Encoded()[:2], d.Encoded())
	raw, err := os.ReadFile(blob)
	if err != nil {
		t.Fatal(err)
	}
	raw[len(raw)-1] ^= 0xff
	if err := os.Chmod(blob, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(blob, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, errs, code := cli(t, "-url", s.url, "-quiet", "pull", "-format", "raw", "-installpath", dst, "vol:a"); code == 0 || !strings.Contains(errs, "verify") {
		t.Fatalf("pull of a damaged layer: exit %d, %s", code, errs)
	}
	if got, _ := os.ReadFile(dst); !bytes.Equal(got, b) {
		t.Fatal("a failed pull changed DST")
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) != 0 {
		t.Fatalf("pull left temp files: %v", left)
	}
	cliOK(t, "-url", s.url, "-quiet", "pull", "-verify=false", "-format", "raw", "-installpath", dst, "vol:a")
	if got, _ := os.ReadFile(dst); bytes.Equal(got, b) || len(got) != len(b) {
		t.Fatal("-verify=false: want the damaged layer's content")
	}
}

// TestAddedMountFollowsBacking: add measures a qcow2 with local backing
// files as the flattened chain, so an unchanged FILE over a changed
// backing file is other content; the zstcli push must send it, not mount
// the layer add measured (which the store holds from an earlier push).
func TestAddedMountFollowsBacking(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, 8<<20, "")
	qemutest.IO(t, base, "write -P 0x11 0 2M")
	vol := filepath.Join(dir, "vol.qcow2")
	qemutest.Create(t, vol, 8<<20, "", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.IO(t, vol, "write -P 0x22 4M 1M")

	var added addResult
	out, errs, code := zcli(t, "-json", "add", "-file", vol)
	if code != 0 {
		t.Fatalf("add: exit %d: %s", code, errs)
	}
	lastJSONLine(t, out, &added)
	// The store gets the layer add measured under another name.
	var first pushResult
	cliJSON(t, &first, "-url", s.url, "-quiet", "push", "-json", "-mount=false", "-name", "other", "-id", "x", vol)

	// The backing file changes; vol itself does not.
	qemutest.IO(t, base, "write -P 0x33 0 1M")
	var now pushResult
	cliJSON(t, &now, "-url", s.url, "-quiet", "push", "-json", "-mount=false", "-name", "other", "-id", "y", vol)
	if now.Blobsum == first.Blobsum {
		t.Fatal("the flattened chain did not change with its backing file")
	}
	if _, errs, code := zcli(t, "-url", s.url, "push", vol); code != 0 {
		t.Fatalf("zstcli push: exit %d: %s", code, errs)
	}
	var info api.ImageInfo
	cliJSON(t, &info, "-url", s.url, "-json", "info", added.Name+":"+added.ID)
	if info.Blobsum != now.Blobsum {
		t.Fatalf("zstcli push recorded layer %s (what add measured: %v), the file's chain is now %s",
			info.Blobsum, info.Blobsum == first.Blobsum, now.Blobsum)
	}
}

// TestAddedMountSeesCtime: a write after add whose mtime is put back
// (cp -p, rsync -t onto the same inode) leaves size, inode and mtime as
// add saw them; only ctime shows it, so the zstcli push must send the
// file, not mount the layer add measured.
func TestAddedMountSeesCtime(t *testing.T) {
	s := startStore(t, "")
	dir := t.TempDir()
	f := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(f, bytes.Repeat([]byte("imagestore"), 1<<20/10+1)[:1<<20], 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(pushCacheSettle + 100*time.Millisecond) // a file add may trust
	var added addResult
	out, errs, code := zcli(t, "-json", "add", "-file", f)
	if code != 0 {
		t.Fatalf("add: exit %d: %s", code, errs)
	}
	lastJSONLine(t, out, &added)
	var first pushResult
	cliJSON(t, &first, "-url", s.url, "-quiet", "push", "-json", "-mount=false", "-name", "other", "-id", "x", f)

	st, err := os.Stat(f)
	if err != nil {
		t.Fatal(err)
	}
	fh, err := os.OpenFile(f, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fh.WriteAt([]byte("X"), 4096); err != nil {
		t.Fatal(err)
	}
	fh.Close()
	if err := os.Chtimes(f, st.ModTime(), st.ModTime()); err != nil {
		t.Fatal(err)
	}
	if _, errs, code := zcli(t, "-url", s.url, "push", f); code != 0 {
		t.Fatalf("zstcli push: exit %d: %s", code, errs)
	}
	var info api.ImageInfo
	cliJSON(t, &info, "-url", s.url, "-json", "info", added.Name+":"+added.ID)
	if info.Blobsum == first.Blobsum {
		t.Fatalf("zstcli push of a changed file recorded the layer add measured (%s)", info.Blobsum)
	}
}

// TestDefaultReaders: a FILE on a local file system gets no read-ahead
// (-concurrency 0 means 1 there); the network file systems are listed in
// defaultReaders.
func TestDefaultReaders(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "local"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n := defaultReaders(f); n != 1 {
		t.Fatalf("a file under %s gets %d readers, want 1", t.TempDir(), n)
	}
}

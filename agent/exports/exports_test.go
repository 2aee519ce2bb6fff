package exports

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imagestore/agent/jobs"
	"imagestore/blobstore"
	"imagestore/blobstore/blobstoretest"
	"imagestore/layer"
	"imagestore/qcow2"
)

type env struct {
	store *blobstore.Store
	root  string
	paths bool // the store's BlobPath works
}

func newEnv(t *testing.T) *env { return newEnvPaths(t, true) }

// newEnvPaths is newEnv; without paths the store's BlobPath answers
// blobstore.ErrNoLocalPath, as a store on S3 does.
func newEnvPaths(t *testing.T, paths bool) *env {
	t.Helper()
	dir := t.TempDir()
	opts := blobstore.Options{Root: dir}
	if !paths {
		local, err := blobstore.NewLocal(blobstore.LocalOptions{Root: dir})
		if err != nil {
			t.Fatal(err)
		}
		opts.Backend = blobstoretest.NoPaths(local)
	}
	st, err := blobstore.Open(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return &env{store: st, root: filepath.Join(dir, "exports"), paths: paths}
}

func (e *env) service(t *testing.T, mod func(*Options)) *Service {
	t.Helper()
	layers, err := layer.New(layer.Options{Blobs: e.store})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{Root: e.root, Layers: layers}
	if mod != nil {
		mod(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// put records data as image ref with format.
func (e *env) put(t *testing.T, ref blobstore.Ref, parent string, data []byte, format string) blobstore.Image {
	t.Helper()
	ctx := context.Background()
	d, n, err := e.store.Put(ctx, bytes.NewReader(data), int64(len(data)), "")
	if err != nil {
		t.Fatal(err)
	}
	img := blobstore.Image{Ref: ref, Blob: d, Parent: parent, Size: n, Format: format, Created: time.Now()}
	if err := e.store.PutImage(ctx, img); err != nil {
		t.Fatal(err)
	}
	return img
}

// qcowLayer writes a qcow2 layer whose data extents come from guest (a full
// guest image; only the given ranges are allocated).
func qcowLayer(t *testing.T, guest []byte, backing string, ranges ...[2]int64) []byte {
	t.Helper()
	var ext []qcow2.Extent
	for _, r := range ranges {
		ext = append(ext, qcow2.Extent{Offset: r[0], Length: r[1], Kind: qcow2.Data})
	}
	var b bytes.Buffer
	if _, err := qcow2.Write(context.Background(), &b, int64(len(guest)), ext, bytes.NewReader(guest), qcow2.WriteOptions{BackingFile: backing}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func md5hex(b []byte) string { s := md5.Sum(b); return hex.EncodeToString(s[:]) }

func readExport(t *testing.T, s *Service, exp Export) []byte {
	t.Helper()
	m, f, err := s.Open(exp.Token, exp.File)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if m != exp.Meta {
		t.Fatalf("Open meta %+v, Create gave %+v", m, exp.Meta)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// recorder is a jobs.Progress that keeps what it is told.
type recorder struct {
	total, done atomic.Int64
	image       atomic.Value
}

func (r *recorder) SetTotal(n int64) { r.total.Store(n) }
func (r *recorder) Add(n int64)      { r.done.Add(n) }
func (r *recorder) SetImage(_, installPath, _ string) {
	r.image.Store(installPath)
}

func TestCreateOpaqueBlob(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := e.service(t, nil)
	data := []byte("an opaque database dump")
	img := e.put(t, blobstore.Ref{Name: "zsbak", ID: "1"}, "", data, "gzip")
	var p recorder
	exp, err := s.Create(context.Background(), &p, img, "")
	if err != nil {
		t.Fatal(err)
	}
	if exp.File != "image-"+exp.Token+".gzip" || exp.ExtFmt != "gzip" || exp.Size != int64(len(data)) || exp.MD5Sum != md5hex(data) || !isToken(exp.Token) {
		t.Fatalf("export %+v", exp)
	}
	if exp.Path() != "/export/image-"+exp.Token+".gzip" {
		t.Fatalf("path %s", exp.Path())
	}
	if got := readExport(t, s, exp); !bytes.Equal(got, data) {
		t.Fatalf("served %q", got)
	}
	if p.total.Load() != int64(len(data)) || p.done.Load() != int64(len(data)) || p.image.Load() != img.InstallPath() {
		t.Fatalf("progress total %d done %d image %v", p.total.Load(), p.done.Load(), p.image.Load())
	}
	fi, err := os.Stat(filepath.Join(e.root, exp.Token, metaFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("export.json: %v %v", fi, err)
	}
	again, err := s.Create(context.Background(), jobs.Nop{}, img, "gzip")
	if err != nil || again.Token != exp.Token || again.File != exp.File || again.MD5Sum != exp.MD5Sum {
		t.Fatalf("second export %+v %v, first %+v", again, err, exp)
	}
	if _, err := s.Create(context.Background(), jobs.Nop{}, img, "raw"); err == nil {
		t.Fatal("an opaque blob exported as raw")
	}
}

// TestNativeExportWithoutPaths: exports of blobs as they are (an opaque
// blob, a raw image, a standalone qcow2) are the same bytes, hash and
// progress whether the blob is linked from its file or streamed from a
// store without local paths.
func TestNativeExportWithoutPaths(t *testing.T) {
	t.Parallel()
	guest := make([]byte, 1<<20)
	for i := range 300 << 10 {
		guest[i] = byte(i%249) | 1
	}
	blobs := []struct {
		data   []byte
		format string
	}{
		{[]byte("an opaque database dump"), "gzip"},
		{bytes.Repeat([]byte("raw disk "), 20000), "raw"},
		{qcowLayer(t, guest, "", [2]int64{0, 320 << 10}), "qcow2"},
	}
	got := map[bool][]Meta{}
	for _, paths := range []bool{true, false} {
		e := newEnvPaths(t, paths)
		s := e.service(t, nil)
		for i, b := range blobs {
			img := e.put(t, blobstore.Ref{Name: "n", ID: fmt.Sprint(i)}, "", b.data, b.format)
			if _, err := e.store.BlobPath(img.Blob); (err == nil) != paths || (!paths && !errors.Is(err, blobstore.ErrNoLocalPath)) {
				t.Fatalf("paths=%v: BlobPath: %v", paths, err)
			}
			var p recorder
			exp, err := s.Create(context.Background(), &p, img, "")
			if err != nil {
				t.Fatalf("paths=%v, %s: %v", paths, b.format, err)
			}
			if data := readExport(t, s, exp); !bytes.Equal(data, b.data) || exp.MD5Sum != md5hex(b.data) || exp.Size != int64(len(b.data)) {
				t.Fatalf("paths=%v, %s: export of %d bytes, meta %+v", paths, b.format, len(data), exp.Meta)
			}
			if p.total.Load() != int64(len(b.data)) || p.done.Load() != int64(len(b.data)) {
				t.Fatalf("paths=%v, %s: progress %d of %d", paths, b.format, p.done.Load(), p.total.Load())
			}
			got[paths] = append(got[paths], Meta{ExtFmt: exp.ExtFmt, MD5Sum: exp.MD5Sum, Size: exp.Size})
		}
	}
	for i := range blobs {
		if got[true][i] != got[false][i] {
			t.Errorf("%s: with paths %+v, without %+v", blobs[i].format, got[true][i], got[false][i])
		}
	}
}

func TestCreateFlattensChain(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := e.service(t, nil)
	const size = 1 << 20
	guest := make([]byte, size)
	for i := range 256 << 10 {
		guest[i] = byte(i % 251)
	}
	base := e.put(t, blobstore.Ref{Name: "vol", ID: "base"}, "", qcowLayer(t, guest, "", [2]int64{0, 256 << 10}), "qcow2")
	for i := 512 << 10; i < 576<<10; i++ {
		guest[i] = 0x5a
	}
	top := e.put(t, blobstore.Ref{Name: "vol", ID: "top"}, base.Ref.String(),
		qcowLayer(t, guest, blobstore.BackingName(base.Blob), [2]int64{512 << 10, 64 << 10}), "qcow2")

	var p recorder
	exp, err := s.Create(context.Background(), &p, top, "raw")
	if err != nil {
		t.Fatal(err)
	}
	got := readExport(t, s, exp)
	if !bytes.Equal(got, guest) || exp.Size != size || exp.MD5Sum != md5hex(guest) || exp.File != "image-"+exp.Token+".raw" {
		t.Fatalf("raw export: %d bytes, meta %+v", len(got), exp.Meta)
	}
	if p.done.Load() != size {
		t.Fatalf("progress %d, want %d", p.done.Load(), size)
	}
	q, err := s.Create(context.Background(), jobs.Nop{}, top, "qcow2")
	if err != nil {
		t.Fatal(err)
	}
	b := readExport(t, s, q)
	im, err := qcow2.Open(bytes.NewReader(b), int64(len(b)))
	if err != nil || im.BackingFile() != "" {
		t.Fatalf("qcow2 export: %v, backing %q", err, im.BackingFile())
	}
	view := make([]byte, size)
	if _, err := im.ReadAt(view, 0); err != nil || !bytes.Equal(view, guest) {
		t.Fatalf("qcow2 export reads differently: %v", err)
	}
	// Only the two exports' dirs, no temp files.
	for _, ex := range []Export{exp, q} {
		ents, _ := os.ReadDir(filepath.Join(e.root, ex.Token))
		if len(ents) != 2 {
			t.Fatalf("export dir holds %v", ents)
		}
	}
}

func TestDeleteAndOpen(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := e.service(t, nil)
	ctx := context.Background()
	a := e.put(t, blobstore.Ref{Name: "a", ID: "1"}, "", []byte("aaa"), "gzip")
	b := e.put(t, blobstore.Ref{Name: "b", ID: "1"}, "", []byte("bbb"), "gzip")
	ea, _ := s.Create(ctx, jobs.Nop{}, a, "")
	eb, _ := s.Create(ctx, jobs.Nop{}, b, "")
	for _, bad := range [][2]string{
		{ea.Token, "other.gzip"},
		{ea.Token[:30], ea.File},
		{"zz" + ea.Token[2:], ea.File},
		{"../" + ea.Token, ea.File},
	} {
		if _, _, err := s.Open(bad[0], bad[1]); !errors.Is(err, ErrNotFound) {
			t.Errorf("Open(%q, %q) = %v, want ErrNotFound", bad[0], bad[1], err)
		}
	}
	if n, err := s.Delete(ctx, Selector{InstallPath: a.InstallPath(), ExtFmt: "raw"}); n != 0 || err != nil {
		t.Fatalf("delete of another format: %d %v", n, err)
	}
	for _, u := range []string{
		"http://h:8001" + eb.Path(),
		eb.Path(),
		"http://h:8001/export/my%20image-" + eb.File, // renamed by the management node
	} {
		token, err := TokenFromURL(u)
		if err != nil || token != eb.Token {
			t.Fatalf("TokenFromURL(%s) = %q %v", u, token, err)
		}
	}
	for _, u := range []string{"https://h/elsewhere/x", "https://h/elsewhere/" + eb.File, "/export/image-" + eb.Token[:30] + ".gzip", "/export/image-" + eb.Token} {
		if _, err := TokenFromURL(u); err == nil {
			t.Fatalf("TokenFromURL of a foreign URL %s", u)
		}
	}
	token := eb.Token
	if n, err := s.Delete(ctx, Selector{Token: token}); n != 1 || err != nil {
		t.Fatalf("delete by token: %d %v", n, err)
	}
	if _, _, err := s.Open(eb.Token, eb.File); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Open after delete: %v", err)
	}
	if n, err := s.Delete(ctx, Selector{InstallPath: a.InstallPath()}); n != 1 || err != nil {
		t.Fatalf("delete by install path: %d %v", n, err)
	}
	if ents, _ := os.ReadDir(e.root); len(ents) != 0 {
		t.Fatalf("exports left: %v", ents)
	}
}

func TestNewMakesRootPrivateAndSweeps(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if err := os.MkdirAll(e.root, 0o755); err != nil {
		t.Fatal(err)
	}
	partial := filepath.Join(e.root, randomToken())
	if err := os.Mkdir(partial, 0o755); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(e.root, "not-a-token")
	if err := os.Mkdir(foreign, 0o755); err != nil {
		t.Fatal(err)
	}
	e.service(t, nil)
	if fi, err := os.Stat(e.root); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("root %v %v, want 0700", fi, err)
	}
	if _, err := os.Stat(partial); !os.IsNotExist(err) {
		t.Fatalf("interrupted export kept: %v", err)
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Fatalf("a dir that is no export was removed: %v", err)
	}
}

// TestConcurrentCreate: while an export is written, a Create of the same
// image and format waits and shares it, other exports and deletes go on,
// and a sweep leaves the dir being written alone.
func TestConcurrentCreate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	slow := e.put(t, blobstore.Ref{Name: "slow", ID: "1"}, "", []byte("slow data"), "gzip")
	fast := e.put(t, blobstore.Ref{Name: "fast", ID: "1"}, "", []byte("fast data"), "gzip")
	entered, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	var once sync.Once
	s := e.service(t, func(o *Options) {
		o.BeforeWrite = func(ip string) {
			if ip == slow.InstallPath() {
				calls.Add(1)
				once.Do(func() { close(entered) })
				<-release
			}
		}
	})
	ctx := context.Background()
	res := make(chan Export, 2)
	create := func() {
		exp, err := s.Create(ctx, jobs.Nop{}, slow, "")
		if err != nil {
			t.Error(err)
		}
		res <- exp
	}
	go create()
	<-entered
	go create()
	if _, err := s.Create(ctx, jobs.Nop{}, fast, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, Selector{InstallPath: fast.InstallPath()}); err != nil {
		t.Fatal(err)
	}
	s.Sweep()
	select {
	case exp := <-res:
		t.Fatalf("an export finished while held: %+v", exp)
	default:
	}
	// A cancelled waiter gives up without disturbing the writer.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Create(cctx, jobs.Nop{}, slow, ""); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled waiter: %v", err)
	}
	close(release)
	a, b := <-res, <-res
	// The same export (a caller that came once it was written renewed its
	// life, so Created may differ).
	if a.Token != b.Token || a.File != b.File || a.MD5Sum != b.MD5Sum || a.Token == "" || calls.Load() != 1 {
		t.Fatalf("shared export: %+v / %+v, %d writes", a, b, calls.Load())
	}
	// The stored meta is the newest renewal's.
	if b.Created.After(a.Created) {
		a = b
	}
	if got := readExport(t, s, a); string(got) != "slow data" {
		t.Fatalf("served %q", got)
	}
}

func TestExpiry(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := e.service(t, func(o *Options) { o.Expiry = time.Hour })
	ctx := context.Background()
	img := e.put(t, blobstore.Ref{Name: "a", ID: "1"}, "", []byte("data"), "gzip")
	exp, err := s.Create(ctx, jobs.Nop{}, img, "")
	if err != nil {
		t.Fatal(err)
	}
	age := func(d time.Duration) {
		t.Helper()
		m := exp.Meta
		m.Created = time.Now().Add(-d)
		b, _ := json.Marshal(m)
		if err := os.WriteFile(filepath.Join(e.root, exp.Token, metaFile), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Exporting again while the export lives hands out the same URL, with
	// its life started again.
	age(50 * time.Minute)
	again, err := s.Create(ctx, jobs.Nop{}, img, "")
	if err != nil || again.Token != exp.Token || time.Since(again.Created) > time.Minute {
		t.Fatalf("a live export was not reused and renewed: %+v %v", again, err)
	}
	if m, err := s.readMeta(exp.Token); err != nil || !m.Created.Equal(again.Created) {
		t.Fatalf("renewal not persisted: %+v %v", m, err)
	}
	if _, f, err := s.Open(exp.Token, exp.File); err != nil {
		t.Fatalf("an export within its life is not served: %v", err)
	} else {
		f.Close()
	}
	other := e.put(t, blobstore.Ref{Name: "b", ID: "1"}, "", []byte("other"), "gzip")
	young, err := s.Create(ctx, jobs.Nop{}, other, "")
	if err != nil {
		t.Fatal(err)
	}
	age(2 * time.Hour)
	if _, _, err := s.Open(exp.Token, exp.File); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Open of an expired export: %v", err)
	}
	s.Sweep()
	if _, err := os.Stat(filepath.Join(e.root, exp.Token)); !os.IsNotExist(err) {
		t.Fatalf("expired export kept by Sweep: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.root, young.Token)); err != nil {
		t.Fatalf("young export removed: %v", err)
	}
}

// Resolve finds an export by the text after the last "image-" of the
// decoded path, as the management node's removeNameFromExportUrl does, so
// the URL it publishes (the image name in front of the last segment) and
// the original both serve the file; anything else is ErrNotFound.
func TestResolve(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := e.service(t, nil)
	data := []byte("qcow2 bytes, say")
	img := e.put(t, blobstore.Ref{Name: "n", ID: "1"}, "", data, "gzip")
	exp, err := s.Create(context.Background(), jobs.Nop{}, img, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		ok   bool
	}{
		{exp.Path(), true},
		{"/export/centos7-" + exp.File, true},
		{"/export/my image-1 (copy)-" + exp.File, true}, // "image-" inside the name
		{"/export/a/b+c-" + exp.File, true},             // an encoded "/" decodes to a path separator
		{"/exports/" + exp.File, false},
		{"/export/" + exp.Token + ".gzip", false},
		{"/export/image-" + exp.Token + ".raw", false},
		{"/export/image-" + exp.Token, false},
		{"/export/image-" + exp.Token + ".gzip/x", false},
		{"/export/image-" + exp.Token[1:] + "0.gzip", false},
		{"/export/" + exp.File + "-image-" + strings.Repeat("0", 32) + ".gzip", false},
	} {
		m, f, err := s.Resolve(tc.path)
		if !tc.ok {
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("Resolve(%q) = %v, want ErrNotFound", tc.path, err)
				if f != nil {
					f.Close()
				}
			}
			continue
		}
		if err != nil {
			t.Errorf("Resolve(%q): %v", tc.path, err)
			continue
		}
		got, _ := io.ReadAll(f)
		f.Close()
		if !bytes.Equal(got, data) || m.MD5Sum != md5hex(data) {
			t.Errorf("Resolve(%q) served %q (md5 %s)", tc.path, got, m.MD5Sum)
		}
	}
}

package layer_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/layer"
	"imagestore/qcow2"
	"imagestore/qcow2/qemutest"
)

const vsize = 4 << 20

func newStore(t *testing.T) (*layer.Store, *blobstore.Store) {
	t.Helper()
	bs, err := blobstore.Open(context.Background(), blobstore.Options{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bs.Close() })
	ls, err := layer.New(layer.Options{Blobs: bs})
	if err != nil {
		t.Fatal(err)
	}
	return ls, bs
}

// openFile parses a qcow2 file the way an import does.
func openFile(t *testing.T, path string) *qcow2.Image {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, _ := f.Stat()
	im, err := qcow2.Open(f, fi.Size())
	if err != nil {
		t.Fatal(err)
	}
	return im
}

// qemuChain makes base.qcow2 and delta.qcow2 (backed by base) with qemu-img
// and qemu-io, and returns their paths.
func qemuChain(t *testing.T) (base, delta string) {
	t.Helper()
	dir := t.TempDir()
	base, delta = filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "delta.qcow2")
	qemutest.Create(t, base, vsize, "")
	qemutest.IO(t, base, "write -P 0x11 0 1M", "write -P 0x22 2M 512K")
	qemutest.Create(t, delta, vsize, "", "-b", base, "-F", "qcow2")
	qemutest.IO(t, delta, "write -P 0x33 512K 1M", "write -z 2M 64K")
	return base, delta
}

// blobFile copies a stored blob to a file qemu-img can read.
func blobFile(t *testing.T, bs *blobstore.Store, img blobstore.Image, name string) string {
	t.Helper()
	b, err := bs.OpenBlob(context.Background(), img.Blob)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	p := filepath.Join(t.TempDir(), name)
	data, err := io.ReadAll(io.NewSectionReader(b, 0, b.Size()))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestCommitChainAndFlatten: a qemu-made chain normalized into the store
// (base, then delta on it) reads back through OpenChain as qemu reads the
// original, and flattening it into the store gives a standalone layer that
// qemu-img checks clean and compares equal.
func TestCommitChainAndFlatten(t *testing.T) {
	ctx := context.Background()
	ls, bs := newStore(t)
	basePath, deltaPath := qemuChain(t)

	base, err := ls.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: blobstore.Ref{Name: "vol", ID: "b"}, Format: "qcow2", Desc: "base"},
		Content: layer.Normalize(openFile(t, basePath), nil, qcow2.WriteOptions{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	if base.VirtualSize != vsize || base.Parent != "" || base.Desc != "base" || base.Created.IsZero() {
		t.Fatalf("base record %+v", base)
	}
	delta, err := ls.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: blobstore.Ref{Name: "vol", ID: "d"}, Parent: &base, Format: "qcow2"},
		Content: layer.Normalize(openFile(t, deltaPath), &base, qcow2.WriteOptions{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	if delta.Parent != "vol:b" {
		t.Fatalf("delta parent %q", delta.Parent)
	}
	got, err := bs.GetImage(ctx, delta.Ref)
	if err != nil || got.Blob != delta.Blob || got.Size != delta.Size {
		t.Fatalf("stored record %+v, %v; want %+v", got, err, delta)
	}
	// The stored delta names its parent's blob, so qemu reads the chain in place.
	deltaBlob, _ := bs.BlobPath(delta.Blob)
	qemutest.Check(t, deltaBlob)
	qemutest.Compare(t, deltaBlob, deltaPath)

	c, closeChain, err := ls.OpenChain(ctx, delta.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Images) != 2 || c.Images[0].Ref != delta.Ref || c.Stored != base.Size+delta.Size || c.VirtualSize() != vsize {
		t.Fatalf("chain %+v stored %d", c.Images, c.Stored)
	}
	var prog counter
	flat, err := ls.Commit(ctx, layer.Spec{
		Record:   layer.Record{Ref: blobstore.Ref{Name: "tmpl", ID: "t"}, Format: "qcow2"},
		Content:  layer.Flatten(c, "qcow2", qcow2.WriteOptions{}),
		Progress: &prog,
		Ingest:   "template-test",
	})
	closeChain()
	if err != nil {
		t.Fatal(err)
	}
	if flat.VirtualSize != vsize || prog.n != flat.Size {
		t.Fatalf("flat %+v, progress %d", flat, prog.n)
	}
	p := blobFile(t, bs, flat, "flat.qcow2")
	qemutest.Check(t, p)
	qemutest.Compare(t, p, deltaPath)
	if bf := qemutest.Info(t, p)["backing-filename"]; bf != nil {
		t.Fatalf("flattened layer names backing file %v", bf)
	}
}

type counter struct{ n int64 }

func (c *counter) Add(n int64) { c.n += n }

// TestCommitRaw: a raw disk becomes a canonical standalone layer equal to it.
func TestCommitRaw(t *testing.T) {
	ctx := context.Background()
	ls, bs := newStore(t)
	raw := make([]byte, vsize)
	copy(raw[1<<20:], bytes.Repeat([]byte{7}, 3<<16))
	img, err := ls.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: blobstore.Ref{Name: "raw", ID: "1"}, Format: "qcow2"},
		Content: layer.NormalizeRaw(bytes.NewReader(raw), int64(len(raw))),
	})
	if err != nil {
		t.Fatal(err)
	}
	rawPath := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(rawPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	p := blobFile(t, bs, img, "l.qcow2")
	qemutest.Check(t, p)
	qemutest.Compare(t, p, rawPath)
	if img.VirtualSize != vsize {
		t.Fatalf("virtual size %d", img.VirtualSize)
	}
}

// TestCommitOpaque: Reader bytes are stored as they are, checked against
// Size, and the Verify hook decides whether they are recorded.
func TestCommitOpaque(t *testing.T) {
	ctx := context.Background()
	ls, bs := newStore(t)
	data := []byte("a database dump")
	ref := blobstore.Ref{Name: "zsbak", ID: "1"}
	refused := errors.New("md5 mismatch")
	var verified layer.Layer
	_, err := ls.Commit(ctx, layer.Spec{
		Record: layer.Record{Ref: ref, Format: "raw"},
		Reader: bytes.NewReader(data), Size: int64(len(data)),
		Verify: func(ctx context.Context, l layer.Layer) error { verified = l; return refused },
	})
	if !errors.Is(err, refused) {
		t.Fatalf("want the Verify error, got %v", err)
	}
	if verified.Size != int64(len(data)) || verified.VirtualSize != verified.Size {
		t.Fatalf("verify saw %+v", verified)
	}
	if bs.Exists(verified.Digest) {
		t.Fatal("a refused commit left its blob behind")
	}
	if _, err := bs.GetImage(ctx, ref); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("refused blob was recorded: %v", err)
	}
	if _, err := ls.Commit(ctx, layer.Spec{
		Record: layer.Record{Ref: ref, Format: "raw"},
		Reader: bytes.NewReader(data), Size: int64(len(data)) + 1,
	}); !errors.Is(err, blobstore.ErrSizeMismatch) {
		t.Fatalf("short reader: want ErrSizeMismatch, got %v", err)
	}
	img, err := ls.Commit(ctx, layer.Spec{
		Record: layer.Record{Ref: ref, Format: "raw", Desc: "d"},
		Reader: bytes.NewReader(data), Size: -1,
	})
	if err != nil || img.Size != int64(len(data)) || img.Blob != verified.Digest {
		t.Fatalf("opaque commit %+v, %v", img, err)
	}
}

// TestCommitBlob: a blob already in the store is recorded as it is (no
// copy); a "qcow2" record of one is still checked; a missing blob and
// two sources at once are refused.
func TestCommitBlob(t *testing.T) {
	ctx := context.Background()
	ls, bs := newStore(t)
	iso := bytes.Repeat([]byte("CD001 media "), 4096)
	d, n, err := bs.Put(ctx, bytes.NewReader(iso), int64(len(iso)), "")
	if err != nil {
		t.Fatal(err)
	}
	img, err := ls.Commit(ctx, layer.Spec{Record: layer.Record{Ref: blobstore.Ref{Name: "img", ID: "1"}, Format: "iso"}, Blob: d})
	if err != nil || img.Blob != d || img.Size != n || img.VirtualSize != n || img.Format != "iso" {
		t.Fatalf("commit of a stored blob: %+v %v", img, err)
	}
	if _, err := ls.Commit(ctx, layer.Spec{Record: layer.Record{Ref: blobstore.Ref{Name: "img", ID: "2"}, Format: "qcow2"}, Blob: d}); !errors.Is(err, layer.ErrInvalid) {
		t.Fatalf("a non-qcow2 blob recorded as qcow2: %v", err)
	}
	// A qcow2 blob is never recorded as something else (qemu would open it).
	qd, _, err := bs.Put(ctx, bytes.NewReader(append([]byte("QFI\xfb"), make([]byte, 4092)...)), 4096, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Commit(ctx, layer.Spec{Record: layer.Record{Ref: blobstore.Ref{Name: "img", ID: "5"}, Format: "raw"}, Blob: qd}); err == nil {
		t.Fatal("a qcow2 blob recorded as raw")
	}
	if _, err := ls.Commit(ctx, layer.Spec{Record: layer.Record{Ref: blobstore.Ref{Name: "img", ID: "3"}, Format: "raw"}, Blob: digest.Digest("sha256:" + strings.Repeat("0", 64))}); !errors.Is(err, blobstore.ErrNotFound) {
		t.Fatalf("a missing blob: %v", err)
	}
	if _, err := ls.Commit(ctx, layer.Spec{Record: layer.Record{Ref: blobstore.Ref{Name: "img", ID: "4"}, Format: "raw"}, Blob: d, Reader: bytes.NewReader(iso)}); err == nil {
		t.Fatal("two sources accepted")
	}
}

// TestCommitHoldsUntilRecorded: GC running while a commit verifies frees
// neither the new blob nor the parent's, whatever the commit grace.
func TestCommitHoldsUntilRecorded(t *testing.T) {
	ctx := context.Background()
	bs, err := blobstore.Open(ctx, blobstore.Options{Root: t.TempDir(), CommitGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	defer bs.Close()
	ls, _ := layer.New(layer.Options{Blobs: bs})
	basePath, deltaPath := qemuChain(t)
	base, err := ls.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: blobstore.Ref{Name: "v", ID: "b"}, Format: "qcow2"},
		Content: layer.Normalize(openFile(t, basePath), nil, qcow2.WriteOptions{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	// The base's record goes: only Commit's hold keeps its blob.
	if err := bs.DeleteImage(ctx, base.Ref); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Millisecond)
	_, err = ls.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: blobstore.Ref{Name: "v", ID: "d"}, Parent: &base, Format: "qcow2"},
		Content: layer.Normalize(openFile(t, deltaPath), &base, qcow2.WriteOptions{}),
		Verify: func(ctx context.Context, l layer.Layer) error {
			time.Sleep(time.Millisecond)
			if _, err := bs.GC(ctx, nil); err != nil {
				return err
			}
			if !bs.Exists(l.Digest) || !bs.Exists(base.Blob) {
				return fmt.Errorf("GC freed a held blob (new %v, parent %v)", bs.Exists(l.Digest), bs.Exists(base.Blob))
			}
			return nil
		},
	})
	// The parent record is gone, so recording fails; the hold is what is tested.
	if err == nil || !errors.Is(err, blobstore.ErrParentNotFound) {
		t.Fatalf("want ErrParentNotFound after the holds held, got %v", err)
	}
}

// TestCommitRefusesMisfits: a delta without its parent, on a parent of
// another size or format, or a "qcow2" record whose blob names something
// else, is refused and nothing is recorded or left in the ingests.
func TestCommitRefusesMisfits(t *testing.T) {
	ctx := context.Background()
	ls, bs := newStore(t)
	basePath, deltaPath := qemuChain(t)
	base, err := ls.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: blobstore.Ref{Name: "v", ID: "b"}, Format: "qcow2"},
		Content: layer.Normalize(openFile(t, basePath), nil, qcow2.WriteOptions{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	small := filepath.Join(t.TempDir(), "small.qcow2")
	qemutest.Create(t, small, vsize/2, "", "-u", "-b", basePath, "-F", "qcow2")
	rawParent := base
	rawParent.Format = "raw"
	passwd := filepath.Join(t.TempDir(), "passwd.qcow2")
	qemutest.Create(t, passwd, vsize, "", "-u", "-b", "/etc/passwd", "-F", "raw")
	passwdBytes, _ := os.ReadFile(passwd)
	cases := []struct {
		name string
		spec layer.Spec
		want error
	}{
		{"delta without parent", layer.Spec{Content: layer.Normalize(openFile(t, deltaPath), nil, qcow2.WriteOptions{})}, layer.ErrParent},
		{"parent of another size", layer.Spec{Content: layer.Normalize(openFile(t, small), &base, qcow2.WriteOptions{})}, layer.ErrParent},
		{"raw parent", layer.Spec{Content: layer.Normalize(openFile(t, deltaPath), &rawParent, qcow2.WriteOptions{})}, layer.ErrParent},
		{"opaque qcow2 naming /etc/passwd", layer.Spec{Reader: bytes.NewReader(passwdBytes), Size: -1}, layer.ErrInvalid},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.spec.Record = layer.Record{Ref: blobstore.Ref{Name: "bad", ID: fmt.Sprint(i)}, Format: "qcow2"}
			_, err := ls.Commit(ctx, tc.spec)
			if !errors.Is(err, tc.want) {
				t.Fatalf("want %v, got %v", tc.want, err)
			}
			if imgs, _ := bs.ListImages(ctx, "bad"); len(imgs) != 0 {
				t.Fatalf("recorded %v", imgs)
			}
			if ents, _ := os.ReadDir(filepath.Join(bs.Root(), "ingest")); len(ents) != 0 {
				t.Fatalf("ingests left: %v", ents)
			}
		})
	}
}

// TestChainPolicy: HoldChain and OpenChain refuse a chain with a non-qcow2
// image or a layer failing Check; OpenChain also refuses (and quarantines)
// a corrupt blob.
// One function: the cases share one store whose chains build on each other.
func TestChainPolicy(t *testing.T) {
	ctx := context.Background()
	ls, bs := newStore(t)
	basePath, deltaPath := qemuChain(t)
	base, err := ls.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: blobstore.Ref{Name: "v", ID: "b"}, Format: "qcow2"},
		Content: layer.Normalize(openFile(t, basePath), nil, qcow2.WriteOptions{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	delta, err := ls.Commit(ctx, layer.Spec{
		Record:  layer.Record{Ref: blobstore.Ref{Name: "v", ID: "d"}, Parent: &base, Format: "qcow2"},
		Content: layer.Normalize(openFile(t, deltaPath), &base, qcow2.WriteOptions{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	imgs, release, err := ls.HoldChain(ctx, delta.Ref)
	if err != nil || len(imgs) != 2 || imgs[1].Ref != base.Ref {
		t.Fatalf("HoldChain %v, %v", imgs, err)
	}
	release()
	release() // twice is harmless

	// A record written by hand: qcow2 on a raw parent; and a qcow2 naming /etc/passwd.
	d, n, err := bs.Put(ctx, strings.NewReader("raw bytes"), -1, "")
	if err != nil {
		t.Fatal(err)
	}
	raw := blobstore.Image{Ref: blobstore.Ref{Name: "h", ID: "raw"}, Blob: d, Size: n, VirtualSize: n, Format: "raw"}
	if err := bs.PutImage(ctx, raw); err != nil {
		t.Fatal(err)
	}
	onRaw := blobstore.Image{Ref: blobstore.Ref{Name: "h", ID: "onraw"}, Blob: delta.Blob, Parent: raw.Ref.String(), Format: "qcow2"}
	if err := bs.PutImage(ctx, onRaw); err != nil {
		t.Fatal(err)
	}
	passwd := filepath.Join(t.TempDir(), "passwd.qcow2")
	qemutest.Create(t, passwd, vsize, "", "-u", "-b", "/etc/passwd", "-F", "raw")
	pb, _ := os.ReadFile(passwd)
	pd, pn, err := bs.Put(ctx, bytes.NewReader(pb), -1, "")
	if err != nil {
		t.Fatal(err)
	}
	evil := blobstore.Image{Ref: blobstore.Ref{Name: "h", ID: "evil"}, Blob: pd, Size: pn, Format: "qcow2"}
	if err := bs.PutImage(ctx, evil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ref  blobstore.Ref
		want error
	}{{onRaw.Ref, layer.ErrNotQcow2}, {evil.Ref, layer.ErrInvalid}} {
		if _, _, err := ls.HoldChain(ctx, tc.ref); !errors.Is(err, tc.want) {
			t.Errorf("HoldChain %s: want %v, got %v", tc.ref, tc.want, err)
		}
		if _, _, err := ls.OpenChain(ctx, tc.ref); !errors.Is(err, tc.want) {
			t.Errorf("OpenChain %s: want %v, got %v", tc.ref, tc.want, err)
		}
		if _, _, err := ls.OpenChainUnverified(ctx, tc.ref); !errors.Is(err, tc.want) {
			t.Errorf("OpenChainUnverified %s: want %v, got %v", tc.ref, tc.want, err)
		}
	}

	// Check takes chains base first, before they are recorded (replication).
	if err := layer.Check(ctx, bs, []blobstore.Image{base, delta}); err != nil {
		t.Errorf("Check of a good chain: %v", err)
	}
	if err := layer.Check(ctx, bs, []blobstore.Image{raw, onRaw}); !errors.Is(err, layer.ErrInvalid) || !strings.Contains(err.Error(), delta.Blob.String()) {
		t.Errorf("Check of qcow2 on raw: want ErrInvalid naming the layer, got %v", err)
	}
	if err := layer.Check(ctx, bs, []blobstore.Image{delta}); !errors.Is(err, layer.ErrInvalid) {
		t.Errorf("Check of a delta as a base: want ErrInvalid, got %v", err)
	}

	// Flip a byte of the base blob: OpenChain verifies digests.
	p, _ := bs.BlobPath(base.Blob)
	b, _ := os.ReadFile(p)
	b[len(b)-1] ^= 0xff
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	// OpenChainUnverified does not read blobs whole (instant restore):
	// it opens the chain, and the periodic verify is what finds the flip.
	c, closeChain, err := ls.OpenChainUnverified(ctx, delta.Ref)
	if err != nil {
		t.Fatalf("OpenChainUnverified of a chain with a flipped data byte: %v", err)
	}
	if c.VirtualSize() != vsize || len(c.Images) != 2 {
		t.Errorf("OpenChainUnverified: virtual size %d, %d images", c.VirtualSize(), len(c.Images))
	}
	closeChain()
	if _, _, err := ls.OpenChain(ctx, delta.Ref); !errors.Is(err, blobstore.ErrCorrupt) {
		t.Fatalf("corrupt base: want ErrCorrupt, got %v", err)
	}
	if bs.Exists(base.Blob) {
		t.Fatal("corrupt blob not quarantined")
	}
}

func TestNewNeedsBlobs(t *testing.T) {
	if _, err := layer.New(layer.Options{}); err == nil {
		t.Fatal("New without Blobs succeeded")
	}
}

// TestCommitReaderMustBeCanonical: bytes stored as they came are recorded
// as qcow2 only if they are exactly our writer's output for their content,
// and as anything else only if they are not a qcow2.
func TestCommitReaderMustBeCanonical(t *testing.T) {
	ctx := context.Background()
	ls, bs := newStore(t)
	base, _ := qemuChain(t)
	qemuBytes, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	var canon bytes.Buffer
	if _, err := qcow2.Normalize(ctx, &canon, openFile(t, base), qcow2.WriteOptions{Compress: true}); err != nil {
		t.Fatal(err)
	}
	patched := append(bytes.Clone(canon.Bytes()), make([]byte, 64<<10)...)
	patched[63] = 1 // nb_snapshots = 1, the table at the appended cluster
	off := uint64(canon.Len())
	for i := 0; i < 8; i++ {
		patched[64+i] = byte(off >> (56 - 8*i))
	}
	cases := []struct {
		name, format string
		data         []byte
		want         error
	}{
		{"canonical qcow2", "qcow2", canon.Bytes(), nil},
		{"qemu-img's qcow2", "qcow2", qemuBytes, layer.ErrNotCanonical},
		{"canonical plus a snapshot table", "qcow2", patched, layer.ErrNotCanonical},
		{"qcow2 recorded as raw", "raw", qemuBytes, layer.ErrFormat},
		{"true raw", "raw", bytes.Repeat([]byte{1}, 4096), nil},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ref := blobstore.Ref{Name: "vol", ID: fmt.Sprint(i)}
			_, err := ls.Commit(ctx, layer.Spec{
				Record: layer.Record{Ref: ref, Format: tc.format},
				Reader: bytes.NewReader(tc.data), Size: int64(len(tc.data)),
			})
			if !errors.Is(err, tc.want) {
				t.Fatalf("Commit = %v, want %v", err, tc.want)
			}
			_, gerr := bs.GetImage(ctx, ref)
			if (tc.want == nil) != (gerr == nil) {
				t.Fatalf("record after %v: %v", err, gerr)
			}
			if tc.want != nil && bs.Exists(digest.FromBytes(tc.data)) {
				t.Fatal("a refused commit left its blob behind")
			}
		})
	}
}

// TestNamespaceRule: a parent is in the image's namespace, or (top mode) a
// base image of another; no chain crosses into or out of zsbak; Commit
// refuses the rest before storing anything.
func TestNamespaceRule(t *testing.T) {
	base := &blobstore.Image{Ref: blobstore.Ref{Name: "img-uuid", ID: "b"}}
	delta := &blobstore.Image{Ref: blobstore.Ref{Name: "vol-base", ID: "d"}, Parent: "vol-base:b"}
	baseVol := &blobstore.Image{Ref: blobstore.Ref{Name: "vol-base", ID: "b"}}
	for _, tc := range []struct {
		child  blobstore.Ref
		parent *blobstore.Image
		ok     bool
	}{
		{blobstore.Ref{Name: "vol", ID: "1"}, nil, true},
		{blobstore.Ref{Name: "vol-base", ID: "2"}, delta, true},
		{blobstore.Ref{Name: "vol", ID: "3"}, base, true}, // top mode
		{blobstore.Ref{Name: "vol", ID: "4"}, delta, false},
		{blobstore.Ref{Name: "zsbak", ID: "5"}, baseVol, false},
		{blobstore.Ref{Name: "vol", ID: "6"}, &blobstore.Image{Ref: blobstore.Ref{Name: "zsbak", ID: "x"}}, false},
	} {
		err := layer.CheckNamespace(tc.child, tc.parent)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, layer.ErrNamespace)) {
			t.Errorf("CheckNamespace(%s, %v) = %v, want ok=%v", tc.child, tc.parent, err, tc.ok)
		}
	}
	ls, bs := newStore(t)
	ctx := context.Background()
	data := []byte("dump")
	_, err := ls.Commit(ctx, layer.Spec{
		Record: layer.Record{Ref: blobstore.Ref{Name: "zsbak", ID: "7"}, Parent: baseVol, Format: "raw"},
		Reader: bytes.NewReader(data), Size: int64(len(data)),
	})
	if !errors.Is(err, layer.ErrNamespace) {
		t.Fatalf("Commit into zsbak on vol-base: %v", err)
	}
	if bs.Exists(digest.FromBytes(data)) {
		t.Fatal("refused commit stored its blob")
	}
}

// TestOurLayersAreCanonical: every way our writer makes a layer (Normalize
// of a base and of a delta at several cluster sizes, with and without
// zstd, the AssumeNoZeroData pass, Flatten, NormalizeRaw) passes
// CheckCanonical, so a peer or a registry push of our own layers is never
// refused by it.
func TestOurLayersAreCanonical(t *testing.T) {
	ctx := context.Background()
	ls, bs := newStore(t)
	basePath, deltaPath := qemuChain(t)
	n := 0
	commit := func(rec layer.Record, c layer.Content) blobstore.Image {
		t.Helper()
		n++
		rec.Ref = blobstore.Ref{Name: "vol", ID: fmt.Sprint(n)}
		rec.Format = "qcow2"
		img, err := ls.Commit(ctx, layer.Spec{Record: rec, Content: c})
		if err != nil {
			t.Fatal(err)
		}
		if err := layer.CheckCanonical(ctx, bs, img.Blob, nil); err != nil {
			t.Fatalf("layer %d (%s): %v", n, rec.Desc, err)
		}
		return img
	}
	var base blobstore.Image
	for _, o := range []qcow2.WriteOptions{{}, {Compress: true}, {ClusterBits: 9}, {ClusterBits: 21, Compress: true}, {AssumeNoZeroData: true}} {
		b := commit(layer.Record{Desc: fmt.Sprintf("base %+v", o)}, layer.Normalize(openFile(t, basePath), nil, o))
		base = b
		if o.ClusterBits > 16 {
			continue // the delta's ranges are not whole 2 MiB clusters
		}
		commit(layer.Record{Desc: fmt.Sprintf("delta %+v", o), Parent: &b}, layer.Normalize(openFile(t, deltaPath), &b, o))
	}
	// A delta whose data clusters hold zeros (written, not discarded).
	zeros := filepath.Join(t.TempDir(), "zeros.qcow2")
	qemutest.Create(t, zeros, vsize, "", "-b", basePath, "-F", "qcow2")
	qemutest.IO(t, zeros, "write -P 0 0 1M", "write -P 0x44 1M 64K")
	commit(layer.Record{Desc: "zero data", Parent: &base}, layer.Normalize(openFile(t, zeros), &base, qcow2.WriteOptions{}))
	commit(layer.Record{Desc: "zero data zstd", Parent: &base}, layer.Normalize(openFile(t, zeros), &base, qcow2.WriteOptions{Compress: true}))
	d := commit(layer.Record{Desc: "delta", Parent: &base}, layer.Normalize(openFile(t, deltaPath), &base, qcow2.WriteOptions{}))
	c, closeChain, err := ls.OpenChain(ctx, d.Ref)
	if err != nil {
		t.Fatal(err)
	}
	defer closeChain()
	commit(layer.Record{Desc: "flatten"}, layer.Flatten(c, "qcow2", qcow2.WriteOptions{}))
	commit(layer.Record{Desc: "flatten zstd"}, layer.Flatten(c, "qcow2", qcow2.WriteOptions{Compress: true}))
	raw := bytes.Repeat([]byte{0, 0, 1, 2}, 1<<18)
	commit(layer.Record{Desc: "raw"}, layer.NormalizeRaw(bytes.NewReader(raw), int64(len(raw))))
}

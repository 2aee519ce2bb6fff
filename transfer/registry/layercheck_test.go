package registry_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"imagestore/blobstore"
	"imagestore/qcow2"
	"imagestore/transfer/oci"
	"imagestore/transfer/replicate"
)

// qcow2Layer returns an empty qcow2 image of size bytes naming backing.
func qcow2Layer(t *testing.T, size int64, backing string) []byte {
	t.Helper()
	var b bytes.Buffer
	if _, err := qcow2.Write(context.Background(), &b, size, nil, bytes.NewReader(nil), qcow2.WriteOptions{BackingFile: backing}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// qemuLayer makes a layer with qemu-img, for backing formats our writer
// never writes.
func qemuLayer(t *testing.T, size int64, backing, backingFmt string) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "l.qcow2")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backingFmt, p, fmt.Sprint(size)).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// qemuBase is a plain qcow2 made by qemu-img: valid, but not canonical.
func qemuBase(t *testing.T, size int64) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "b.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", p, fmt.Sprint(size)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// withSnapshotTable appends a cluster of snapshot table to a canonical
// layer and points the header at it (nb_snapshots 1): our reader ignores
// snapshots, qemu parses them.
func withSnapshotTable(layer []byte) []byte {
	b := append(bytes.Clone(layer), bytes.Repeat([]byte{0xee}, 64<<10)...)
	binary.BigEndian.PutUint32(b[60:], 1)
	binary.BigEndian.PutUint64(b[64:], uint64(len(layer)))
	return b
}

// TestManifestRefusesUncheckedBacking: a pushed qcow2 layer whose header
// names anything but its recorded parent's blob (qemu would follow it when
// serving the image over NBD) is refused, and nothing is recorded.
func TestManifestRefusesUncheckedBacking(t *testing.T) {
	const size = 1 << 20
	base := qcow2Layer(t, size, "")
	baseD := digest.FromBytes(base)
	good := blobstore.BackingName(baseD)
	cases := []struct {
		name   string
		base   []byte // nil = the good base
		child  []byte // nil = no child layer
		accept bool
		// baseFormat is the base record's format ("" = qcow2)
		baseFormat string
	}{
		{name: "good chain", child: qcow2Layer(t, size, good), accept: true},
		{name: "good base", accept: true},
		{name: "base names /etc/passwd", base: qemuLayer(t, size, "/etc/passwd", "raw")},
		{name: "base names qcow2 backing", base: qcow2Layer(t, size, good)},
		{name: "child names /etc/passwd", child: qcow2Layer(t, size, "/etc/passwd")},
		{name: "child names json", child: qemuLayer(t, size, `json:{"driver":"file","filename":"/etc/shadow"}`, "raw")},
		{name: "child raw backing format", child: qemuLayer(t, size, good, "raw")},
		{name: "child other size", child: qcow2Layer(t, 2*size, good)},
		{name: "child not qcow2", child: bytes.Repeat([]byte("x"), 4096)},
		// Readable by our reader, but not what our writer makes: qemu
		// would parse what we skipped.
		{name: "base made by qemu-img", base: qemuBase(t, size)},
		{name: "base with a patched snapshot table", base: withSnapshotTable(base)},
		{name: "qcow2 recorded as raw", base: qemuLayer(t, size, "/etc/passwd", "raw"), baseFormat: "raw"},
		{name: "true raw base", base: bytes.Repeat([]byte{0x5a}, 4096), baseFormat: "raw", accept: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t, "")
			ctx := context.Background()
			c := n.Client(t, "", false)
			b := tc.base
			if b == nil {
				b = base
			}
			t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
			layers := [][]byte{b}
			if tc.child != nil {
				layers = append(layers, tc.child)
			}
			var chain []blobstore.Image
			m := oci.Manifest{SchemaVersion: 2, MediaType: oci.MediaTypeManifest}
			for i, l := range layers {
				d := digest.FromBytes(l)
				if err := c.PutBlob(ctx, "vol", d, l); err != nil {
					t.Fatal(err)
				}
				img := blobstore.Image{Ref: blobstore.Ref{Name: "vol", ID: fmt.Sprintf("l%d", i)}, Blob: d,
					Created: t0, Size: int64(len(l)), Format: "qcow2"}
				if i == 0 && tc.baseFormat != "" {
					img.Format, img.VirtualSize = tc.baseFormat, int64(len(l))
				}
				if i > 0 {
					img.Parent = chain[i-1].Ref.String()
				}
				chain = append(chain, img)
				m.Layers = append(m.Layers, oci.Descriptor{MediaType: oci.MediaTypeQcow2Layer, Digest: d, Size: int64(len(l))})
			}
			cfg, _ := json.Marshal(replicate.Config{Imagestore: replicate.ConfigVersion, Chain: chain})
			m.Config = oci.Descriptor{MediaType: oci.MediaTypeConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
			if err := c.PutBlob(ctx, "vol", m.Config.Digest, cfg); err != nil {
				t.Fatal(err)
			}
			mb, _ := json.Marshal(m)
			top := chain[len(chain)-1]
			resp, body := do(t, http.MethodPut, n.HTTP.URL+"/v2/vol/manifests/"+top.ID, mb,
				map[string]string{"Content-Type": oci.MediaTypeManifest})
			imgs, err := n.Store.ListImages(ctx, "vol")
			if err != nil {
				t.Fatal(err)
			}
			if tc.accept {
				if resp.StatusCode != http.StatusCreated || len(imgs) != len(chain) {
					t.Fatalf("good chain refused: %d %s (records %v)", resp.StatusCode, body, imgs)
				}
				return
			}
			if resp.StatusCode != http.StatusBadRequest || errCode(t, body) != oci.CodeManifestInvalid {
				t.Fatalf("want 400 %s, got %d %s", oci.CodeManifestInvalid, resp.StatusCode, body)
			}
			bad := chain[0].Blob
			if tc.child != nil {
				bad = top.Blob
			}
			if !strings.Contains(string(body), bad.String()) {
				t.Errorf("error does not name the layer %s: %s", bad, body)
			}
			if len(imgs) != 0 {
				t.Fatalf("refused manifest left records: %v", imgs)
			}
		})
	}
}

// TestManifestCheckUsesUploadRecord: the canonical check of a layer pushed
// just before its manifest takes which data clusters are all zeros from the
// record the upload made, not from the stored bytes (so it does not read
// the layer back); once the manifest is recorded the record is gone, and
// a later manifest's check reads the blob. Shown with a data cluster
// zeroed on disk after the upload: a layer with an all-zero data cluster is
// not our writer's, which only a read can see.
func TestManifestCheckUsesUploadRecord(t *testing.T) {
	const size = 1 << 20
	src := randBytes(t, size)
	var lb bytes.Buffer
	if _, err := qcow2.Write(context.Background(), &lb, size, []qcow2.Extent{{Offset: 0, Length: size, Kind: qcow2.Data}},
		bytes.NewReader(src), qcow2.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	l := lb.Bytes()
	for _, mode := range []string{"session", "monolithic"} {
		t.Run(mode, func(t *testing.T) {
			n := newNode(t, "")
			ctx := context.Background()
			c := n.Client(t, "", false)
			d := digest.FromBytes(l)
			if mode == "session" {
				got, _, err := c.PushProduced(ctx, "vol", func(ctx context.Context, w io.Writer) (int64, error) {
					k, err := w.Write(l)
					return int64(k), err
				}, oci.StreamOptions{})
				if err != nil || got != d {
					t.Fatalf("push: %s %v", got, err)
				}
			} else if err := c.PutBlob(ctx, "vol", d, l); err != nil {
				t.Fatal(err)
			}
			// The last data cluster, zeroed on disk behind the store's back.
			p, err := n.Store.BlobPath(d)
			if err != nil {
				t.Fatal(err)
			}
			onDisk := bytes.Clone(l)
			clear(onDisk[len(onDisk)-64<<10:])
			if err := os.Chmod(p, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, onDisk, 0o644); err != nil {
				t.Fatal(err)
			}
			put := func(id string) (*http.Response, []byte) {
				img := blobstore.Image{Ref: blobstore.Ref{Name: "vol", ID: id}, Blob: d,
					Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Size: int64(len(l)), VirtualSize: size, Format: "qcow2"}
				cfg, _ := json.Marshal(replicate.Config{Imagestore: replicate.ConfigVersion, Chain: []blobstore.Image{img}})
				m := oci.Manifest{SchemaVersion: 2, MediaType: oci.MediaTypeManifest,
					Config: oci.Descriptor{MediaType: oci.MediaTypeConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))},
					Layers: []oci.Descriptor{{MediaType: oci.MediaTypeQcow2Layer, Digest: d, Size: int64(len(l))}}}
				if err := c.PutBlob(ctx, "vol", m.Config.Digest, cfg); err != nil {
					t.Fatal(err)
				}
				mb, _ := json.Marshal(m)
				return do(t, http.MethodPut, n.HTTP.URL+"/v2/vol/manifests/"+id, mb, map[string]string{"Content-Type": oci.MediaTypeManifest})
			}
			if resp, body := put("a"); resp.StatusCode != http.StatusCreated {
				t.Fatalf("manifest after the upload: %d %s (the check read the blob instead of the upload's record)", resp.StatusCode, body)
			}
			if resp, body := put("b"); resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "canonical") {
				t.Fatalf("a later manifest: %d %s (want the check to read the blob and refuse it)", resp.StatusCode, body)
			}
		})
	}
}

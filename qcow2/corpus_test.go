package qcow2

import (
	"bytes"
	"errors"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"imagestore/qcow2/internal/corpus"
	"imagestore/qcow2/qemutest"
)

// errRead marks images that open but fail when their data is read.
var errRead = errors.New("read error")

// expectations for every file in testdata/corpus. A string value is the
// backing file name the image must report (and that is never opened).
var corpusWant = map[string]any{
	"valid": nil, "valid-v2": nil, "valid-zlib": nil, "valid-zstd": nil,
	"backing-etc-passwd": "../../etc/passwd", "backing-etc-shadow": "/etc/shadow",

	"not-qcow2": ErrNotQcow2, "empty": ErrNotQcow2, "truncated-header": ErrFormat,
	"truncated-v3-header": ErrFormat, "raw-looks-like-qcow2": ErrFormat,
	"version-1": ErrUnsupported, "version-4": ErrUnsupported,
	"cluster-bits-8": ErrFormat, "cluster-bits-22": ErrFormat,
	"header-length-beyond-cluster": ErrFormat, "header-length-unaligned": ErrFormat,
	"ext-beyond-cluster": ErrFormat, "feature-table-bad-length": ErrFormat,
	"virtual-size-absurd": ErrFormat, "too-many-snapshots": ErrFormat, "refcount-order-7": ErrFormat,
	"backing-name-too-long": ErrFormat, "backing-name-outside-cluster": ErrFormat, "backing-name-in-header": ErrFormat,

	"encryption-aes": ErrUnsupported, "encryption-luks": ErrUnsupported, "encryption-extension": ErrUnsupported,
	"data-file-bit": ErrUnsupported, "data-file-extension": ErrUnsupported,
	"unknown-incompatible-bit": ErrUnsupported, "extended-l2-bit": ErrUnsupported,
	"dirty-bit": ErrUnsupported, "corrupt-bit": ErrFormat,
	"compression-type-without-bit": ErrFormat, "compression-bit-with-zlib": ErrFormat,
	"compression-type-unknown": ErrUnsupported,

	"l1-size-2^32-1": ErrFormat, "l1-too-small": ErrFormat, "l1-past-eof": ErrFormat,
	"l1-unaligned": ErrFormat, "l1-at-header": ErrFormat,
	"refcount-table-too-large": ErrFormat, "refcount-table-past-eof": ErrFormat,
	"refcount-table-unaligned": ErrFormat, "refcount-table-empty": ErrFormat,
	"refcount-block-past-eof": ErrFormat, "refcount-block-aliases-l2": ErrFormat,

	"l2-table-past-eof": ErrFormat, "l1-entry-low-bits": ErrFormat, "l2-table-offset-2^56": ErrFormat,
	"l1-reserved-bits": ErrFormat, "l2-table-twice": ErrFormat, "l2-table-is-l1": ErrFormat,
	"data-past-eof": ErrFormat, "l2-entry-low-bits": ErrFormat, "l2-reserved-bits": ErrFormat,
	"alias-data-data": ErrFormat, "alias-data-l1": ErrFormat, "alias-data-reftable": ErrFormat,
	"alias-zero-alloc-data": ErrFormat, "data-offset-huge": ErrFormat,

	"compressed-past-eof": ErrFormat, "compressed-run-past-eof": ErrFormat,
	"compressed-offset-2^56": ErrFormat, "compressed-aliases-l1": ErrFormat, "compressed-run-shared": ErrFormat,
	"compressed-bomb-zlib": errRead, "compressed-bomb-zstd": errRead,
	"compressed-short-zlib": errRead, "compressed-garbage": errRead, "compressed-garbage-zstd": errRead,
}

// readAll opens an image and reads its whole guest view and extents.
func readAll(b []byte) (*Image, error) {
	im, err := Open(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		return nil, err
	}
	if _, err := im.Extents(); err != nil {
		return im, err
	}
	buf := make([]byte, 32<<10)
	for off := int64(0); off < im.VirtualSize(); off += int64(len(buf)) {
		if _, err := im.ReadAt(buf, off); err != nil && off+int64(len(buf)) < im.VirtualSize() {
			return im, errors.Join(errRead, err)
		}
	}
	_ = im.DataRanges()
	_ = im.Map()
	return im, nil
}

func TestCorpus(t *testing.T) {
	files, err := filepath.Glob("testdata/corpus/*.qcow2")
	if err != nil || len(files) < 30 {
		t.Fatalf("corpus has %d files (%v)", len(files), err)
	}
	seen := map[string]bool{}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".qcow2")
		seen[name] = true
		t.Run(name, func(t *testing.T) {
			want, ok := corpusWant[name]
			if !ok {
				t.Fatalf("no expectation for %s", name)
			}
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			start := time.Now()
			im, err := readAll(b)
			elapsed := time.Since(start)
			runtime.ReadMemStats(&after)
			if d := after.TotalAlloc - before.TotalAlloc; d > 64<<20 {
				t.Errorf("allocated %d bytes", d)
			}
			if elapsed > 5*time.Second {
				t.Errorf("took %v", elapsed)
			}
			switch w := want.(type) {
			case nil:
				if err != nil {
					t.Fatalf("valid image rejected: %v", err)
				}
			case string:
				if err != nil {
					t.Fatalf("open: %v", err)
				}
				if im.BackingFile() != w {
					t.Fatalf("backing file %q, want %q", im.BackingFile(), w)
				}
			case error:
				if !errors.Is(err, w) {
					t.Fatalf("error %v, want %v", err, w)
				}
				t.Logf("%v", err)
				if w == errRead && !errors.Is(err, ErrFormat) {
					t.Fatalf("read error is not a FormatError: %v", err)
				}
				var fe *FormatError
				if w == ErrFormat && (!errors.As(err, &fe) || fe.Field == "" || fe.Reason == "") {
					t.Fatalf("not a descriptive FormatError: %#v", err)
				}
			}
		})
	}
	for name := range corpusWant {
		if !seen[name] {
			t.Errorf("corpus file %s.qcow2 missing", name)
		}
	}
}

// TestCorpusUpToDate keeps the committed files in step with the generator.
func TestCorpusUpToDate(t *testing.T) {
	for _, im := range corpus.All() {
		b, err := os.ReadFile(filepath.Join("testdata/corpus", im.Name+".qcow2"))
		if err != nil || !bytes.Equal(b, im.Bytes) {
			t.Errorf("%s stale (%v): run go run ./qcow2/internal/gencorpus", im.Name, err)
		}
	}
}

// TestCorpusValidAgreesWithQemu checks the control images against qemu.
func TestCorpusValidAgreesWithQemu(t *testing.T) {
	for _, name := range []string{"valid", "valid-v2", "valid-zlib", "valid-zstd"} {
		p := filepath.Join("testdata/corpus", name+".qcow2")
		qemutest.Check(t, p)
		im := openFile(t, p)
		ext, _ := im.Extents()
		assertSameMap(t, ext, qemutest.Map(t, p))
		if got, want := qemutest.DigestReaderAt(t, im, im.VirtualSize()), qemutest.ConvertRaw(t, p); got != want {
			t.Fatalf("%s: digest %s, qemu %s", name, got, want)
		}
	}
}

// TestReaderHasNoFilesystemAccess proves a backing name can never be opened:
// the reader's source files do not import anything that opens files.
func TestReaderHasNoFilesystemAccess(t *testing.T) {
	for _, f := range []string{"reader.go", "header.go", "chain.go", "compress.go", "info.go", "errors.go"} {
		af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range af.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			switch p {
			case "os", "io/fs", "path/filepath", "syscall", "os/exec", "net", "golang.org/x/sys/unix":
				t.Errorf("%s imports %s", f, p)
			}
		}
	}
}

// TestHugeVirtualSizeInMemory opens a header-valid image claiming 4 PiB
// (2 MiB clusters) held in a sparse reader: nothing may scale with it.
func TestHugeVirtualSizeInMemory(t *testing.T) {
	const cs = 2 << 20
	const vs = 1 << 52
	b := make([]byte, 3*cs)
	be := func(off int, v uint64, n int) {
		for i := 0; i < n; i++ {
			b[off+i] = byte(v >> (8 * (n - 1 - i)))
		}
	}
	be(0, 0x514649fb, 4)
	be(4, 3, 4)
	be(20, 21, 4)
	be(24, vs, 8)
	be(36, vs/(cs*(cs/8)), 4) // 8192 L1 entries
	be(40, cs, 8)
	be(48, 2*cs, 8)
	be(56, 1, 4)
	be(96, 4, 4)
	be(100, 104, 4)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	im, err := Open(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	ext, _ := im.Extents()
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > 16<<20 {
		t.Fatalf("Open allocated %d bytes for a %d-byte image", d, len(b))
	}
	if len(ext) != 1 || ext[0].Kind != Unallocated || ext[0].Length != vs {
		t.Fatalf("extents %v", ext)
	}
	p := make([]byte, 4096)
	if _, err := im.ReadAt(p, vs-4096); err != nil || !bytes.Equal(p, make([]byte, 4096)) {
		t.Fatalf("tail read %v", err)
	}
}

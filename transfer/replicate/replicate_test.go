package replicate_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"imagestore/blobstore"
	"imagestore/transfer/faultproxy"
	"imagestore/transfer/registry/registrytest"
	"imagestore/transfer/replicate"
)

// newNode is a registry with a replication engine; wrap, if not nil,
// wraps its handler.
func newNode(t *testing.T, wrap func(http.Handler) http.Handler) *registrytest.Node {
	t.Helper()
	return registrytest.Start(t, registrytest.Options{Wrap: wrap, Engine: &replicate.Options{
		Retries: 1, RetryDelay: 50 * time.Millisecond, Parallelism: 3,
	}})
}

func randBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func addImage(t *testing.T, st *blobstore.Store, ref blobstore.Ref, parent string, size int) blobstore.Image {
	t.Helper()
	ctx := context.Background()
	d, n, err := st.Put(ctx, bytes.NewReader(randBytes(t, size)), int64(size), "")
	if err != nil {
		t.Fatal(err)
	}
	img := blobstore.Image{Ref: ref, Blob: d, Parent: parent, Created: time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC), Size: n, VirtualSize: 1 << 30, Format: "raw"}
	if err := st.PutImage(ctx, img); err != nil {
		t.Fatal(err)
	}
	return img
}

func makeChain(t *testing.T, st *blobstore.Store, name string, n, size int) []blobstore.Image {
	var out []blobstore.Image
	parent := ""
	for i := 0; i < n; i++ {
		img := addImage(t, st, blobstore.Ref{Name: name, ID: fmt.Sprintf("b%02d", i)}, parent, size+i)
		out = append(out, img)
		parent = img.Ref.String()
	}
	return out
}

func run(t *testing.T, start func(context.Context, replicate.Request) (string, error), eng *replicate.Engine, req replicate.Request) (string, replicate.Task) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	id, err := start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if id == replicate.Existed {
		return id, replicate.Task{}
	}
	task, err := eng.Wait(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return id, task
}

func sameChain(t *testing.T, a, b *blobstore.Store, ref blobstore.Ref) {
	t.Helper()
	ctx := context.Background()
	ra, err := replicate.Render(ctx, a, ref, true)
	if err != nil {
		t.Fatal(err)
	}
	rb, err := replicate.Render(ctx, b, ref, true)
	if err != nil {
		t.Fatal(err)
	}
	if ra.Digest != rb.Digest {
		t.Fatalf("%s: manifest %s here, %s there", ref, ra.Digest, rb.Digest)
	}
	for _, l := range rb.Layers {
		if err := b.VerifyBlob(ctx, l.Digest); err != nil {
			t.Fatal(err)
		}
	}
}

func TestPushPullChain(t *testing.T) {
	a, b := newNode(t, nil), newNode(t, nil)
	chain := makeChain(t, a.Store, "vol", 10, 200<<10)
	top := chain[len(chain)-1].Ref
	req := replicate.Request{Name: top.Name, ID: top.ID, Addr: b.Addr()}

	id, task := run(t, a.Engine.Push, a.Engine, req)
	if task.Status != replicate.StatusSuccess || task.BlobsTotal != 10 || task.BytesDone != task.BytesTotal {
		t.Fatalf("push %s: %+v", id, task)
	}
	sameChain(t, a.Store, b.Store, top)
	sent := testutil.ToFloat64(a.Metrics.SentBytes)
	if got := testutil.ToFloat64(b.Metrics.ReceivedBytes); got < float64(task.BytesTotal) {
		t.Fatalf("B received %v bytes, task moved %d", got, task.BytesTotal)
	}

	// Nothing to do: existed, and no blob byte moves.
	if id, _ := run(t, a.Engine.Push, a.Engine, req); id != replicate.Existed {
		t.Fatalf("second push: %q", id)
	}
	if got := testutil.ToFloat64(a.Metrics.SentBytes); got != sent {
		t.Fatalf("no-op push sent %v bytes", got-sent)
	}

	// An incremental on top moves only its layer.
	inc := addImage(t, a.Store, blobstore.Ref{Name: "vol", ID: "inc"}, top.String(), 300<<10)
	_, task = run(t, a.Engine.Push, a.Engine, replicate.Request{Name: "vol", ID: "inc", Addr: b.Addr()})
	if task.Status != replicate.StatusSuccess || task.BlobsTotal != 1 || task.BytesTotal != inc.Size || task.Skipped != 10 {
		t.Fatalf("incremental push: %+v", task)
	}
	if got := testutil.ToFloat64(a.Metrics.SentBytes) - sent; got != float64(inc.Size) {
		t.Fatalf("incremental push sent %v bytes, layer is %d", got, inc.Size)
	}
	sameChain(t, a.Store, b.Store, inc.Ref)

	// Pull into an empty third store, then a pull with nothing to do.
	c := newNode(t, nil)
	_, task = run(t, c.Engine.Pull, c.Engine, replicate.Request{Name: "vol", ID: "inc", Addr: b.Addr()})
	if task.Status != replicate.StatusSuccess || task.BlobsTotal != 11 {
		t.Fatalf("pull: %+v", task)
	}
	sameChain(t, a.Store, c.Store, inc.Ref)
	if id, _ := run(t, c.Engine.Pull, c.Engine, replicate.Request{Name: "vol", ID: "inc", Addr: b.Addr()}); id != replicate.Existed {
		t.Fatalf("second pull: %q", id)
	}
}

// flipByte corrupts a stored blob in place, as bit rot would.
func flipByte(t *testing.T, st *blobstore.Store, d digest.Digest) {
	t.Helper()
	p, err := st.BlobPath(d)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [1]byte
	if _, err := f.ReadAt(b[:], 100); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b[:], 100); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptSourceQuarantinedAndRepairedByPull(t *testing.T) {
	a, b := newNode(t, nil), newNode(t, nil)
	ctx := context.Background()
	chain := makeChain(t, a.Store, "vol", 3, 100<<10)
	top := chain[2].Ref
	req := replicate.Request{Name: top.Name, ID: top.ID, Addr: b.Addr()}
	if _, task := run(t, a.Engine.Push, a.Engine, req); task.Status != replicate.StatusSuccess {
		t.Fatalf("initial push: %+v", task)
	}
	// A new image on A whose middle blob rots before it is pushed to C.
	c := newNode(t, nil)
	bad := chain[1].Blob
	flipByte(t, a.Store, bad)
	_, task := run(t, a.Engine.Push, a.Engine, replicate.Request{Name: top.Name, ID: top.ID, Addr: c.Addr()})
	if task.Status != replicate.StatusFailed || !strings.Contains(task.Error, bad.String()) {
		t.Fatalf("push of a corrupt chain: %+v", task)
	}
	if a.Store.Exists(bad) {
		t.Fatal("corrupt blob not quarantined")
	}
	if c.Store.Exists(bad) {
		t.Fatal("corrupt blob reached the peer")
	}
	if imgs, _ := c.Store.ListImages(ctx, ""); len(imgs) != 0 {
		t.Fatalf("peer lists a partial chain: %v", imgs)
	}
	// Recover from B, which has a healthy copy.
	_, task = run(t, a.Engine.Pull, a.Engine, req)
	if task.Status != replicate.StatusSuccess || task.BlobsTotal != 1 {
		t.Fatalf("repairing pull: %+v", task)
	}
	rep, err := a.Store.Verify(ctx, 0)
	if err != nil || len(rep.Corrupt) != 0 {
		t.Fatalf("verify after repair: %+v %v", rep, err)
	}
	sameChain(t, a.Store, b.Store, top)
}

// corruptPatches flips a byte in the first k PATCH bodies it forwards.
func corruptPatches(k int32) (func(http.Handler) http.Handler, *atomic.Int32) {
	var n atomic.Int32
	return func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPatch && n.Add(1) <= k {
				r.Body = &flipReader{r: r.Body}
			}
			h.ServeHTTP(w, r)
		})
	}, &n
}

type flipReader struct {
	r    io.ReadCloser
	done bool
}

func (f *flipReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if n > 0 && !f.done {
		p[0] ^= 1
		f.done = true
	}
	return n, err
}

func (f *flipReader) Close() error { return f.r.Close() }

func TestPeerDigestMismatch(t *testing.T) {
	cases := []struct {
		name    string
		corrupt int32
		want    replicate.Status
	}{
		{"re-sent once", 1, replicate.StatusSuccess},
		{"fails naming the blob", 100, replicate.StatusFailed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			wrap, patches := corruptPatches(c.corrupt)
			a, b := newNode(t, nil), newNode(t, wrap)
			img := addImage(t, a.Store, blobstore.Ref{Name: "v", ID: "one"}, "", 256<<10)
			_, task := run(t, a.Engine.Push, a.Engine, replicate.Request{Name: "v", ID: "one", Addr: b.Addr()})
			if task.Status != c.want {
				t.Fatalf("task %+v", task)
			}
			if c.want == replicate.StatusFailed {
				if !strings.Contains(task.Error, img.Blob.String()) {
					t.Fatalf("error does not name the blob: %s", task.Error)
				}
				if p := patches.Load(); p != 2 {
					t.Fatalf("%d PATCHes, want exactly 2 (one re-send)", p)
				}
				if b.Store.Exists(img.Blob) {
					t.Fatal("bad bytes committed")
				}
				return
			}
			sameChain(t, a.Store, b.Store, img.Ref)
		})
	}
}

func TestQuotaFailsCleanly(t *testing.T) {
	a, b := newNode(t, nil), newNode(t, nil)
	ctx := context.Background()
	chain := makeChain(t, a.Store, "vol", 4, 512<<10)
	if err := b.Store.SetQuota(1 << 20); err != nil {
		t.Fatal(err)
	}
	_, task := run(t, a.Engine.Push, a.Engine, replicate.Request{Name: "vol", ID: chain[3].ID, Addr: b.Addr()})
	if task.Status != replicate.StatusFailed || !strings.Contains(strings.ToLower(task.Error), "quota") {
		t.Fatalf("push over quota: %+v", task)
	}
	if imgs, _ := b.Store.ListImages(ctx, ""); len(imgs) != 0 {
		t.Fatalf("B lists images after a failed push: %v", imgs)
	}
}

func TestPushThroughCuttingProxy(t *testing.T) {
	a, b := newNode(t, nil), newNode(t, nil)
	p := faultproxy.New(t, b.Addr())
	p.CutAfter(3 << 20)
	p.CutNext(3)
	chain := makeChain(t, a.Store, "vol", 2, 6<<20)
	_, task := run(t, a.Engine.Push, a.Engine, replicate.Request{Name: "vol", ID: chain[1].ID, Addr: p.Addr()})
	if task.Status != replicate.StatusSuccess {
		t.Fatalf("push through cuts: %+v", task)
	}
	if p.Cuts() == 0 {
		t.Fatal("no cut happened")
	}
	sameChain(t, a.Store, b.Store, chain[1].Ref)
}

func TestPullResumesThroughCuttingProxy(t *testing.T) {
	a, b := newNode(t, nil), newNode(t, nil)
	chain := makeChain(t, b.Store, "vol", 1, 8<<20)
	p := faultproxy.New(t, b.Addr())
	p.CutAfter(2 << 20)
	p.CutNext(2)
	_, task := run(t, a.Engine.Pull, a.Engine, replicate.Request{Name: "vol", ID: chain[0].ID, Addr: p.Addr()})
	if task.Status != replicate.StatusSuccess || p.Cuts() == 0 {
		t.Fatalf("pull through cuts (%d cuts): %+v", p.Cuts(), task)
	}
	sameChain(t, a.Store, b.Store, chain[0].Ref)
}

func TestThreeStores(t *testing.T) {
	a, b, c := newNode(t, nil), newNode(t, nil), newNode(t, nil)
	chain := makeChain(t, a.Store, "zsbak", 3, 64<<10)
	top := chain[2].Ref
	if _, task := run(t, a.Engine.Push, a.Engine, replicate.Request{Name: top.Name, ID: top.ID, Addr: b.Addr()}); task.Status != replicate.StatusSuccess {
		t.Fatalf("A→B: %+v", task)
	}
	if _, task := run(t, b.Engine.Push, b.Engine, replicate.Request{Name: top.Name, ID: top.ID, Addr: c.Addr()}); task.Status != replicate.StatusSuccess {
		t.Fatalf("B→C: %+v", task)
	}
	sameChain(t, a.Store, c.Store, top)
	if id, _ := run(t, a.Engine.Push, a.Engine, replicate.Request{Name: top.Name, ID: top.ID, Addr: c.Addr()}); id != replicate.Existed {
		t.Fatalf("A→C after A→B→C: %q", id)
	}
}

func TestRestartMarksTasksFailed(t *testing.T) {
	dir := t.TempDir()
	st, err := blobstore.Open(context.Background(), blobstore.Options{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rec := `{"id":"abc","kind":"push","name":"v","imageId":"i","addr":"x:1","status":"running","created":"2026-01-01T00:00:00Z","lastOpTime":"2026-01-01T00:00:00Z"}`
	if err := os.WriteFile(dir+"/abc.json", []byte(rec), 0o600); err != nil {
		t.Fatal(err)
	}
	old := `{"id":"old","kind":"pull","status":"success","created":"2000-01-01T00:00:00Z","lastOpTime":"2000-01-01T00:00:00Z"}`
	if err := os.WriteFile(dir+"/old.json", []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	eng, err := replicate.New(replicate.Options{Store: st, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	task, err := eng.Task("abc")
	if err != nil || task.Status != replicate.StatusFailed || !strings.Contains(task.Error, "interrupted") {
		t.Fatalf("task after restart: %+v %v", task, err)
	}
	if _, err := eng.Task("old"); !errors.Is(err, replicate.ErrTaskNotFound) {
		t.Fatalf("expired task not pruned: %v", err)
	}
	if _, err := os.Stat(dir + "/old.json"); !os.IsNotExist(err) {
		t.Fatalf("expired task file kept: %v", err)
	}
}

// TestTaskTempFilesRemoved: the temp files of task writes a crash
// interrupted (today's and older versions' names) are removed at start;
// task records are written without leaving any.
func TestTaskTempFilesRemoved(t *testing.T) {
	dir := t.TempDir()
	st, err := blobstore.Open(context.Background(), blobstore.Options{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// abc was running when the process died: New rewrites it as failed.
	running := `{"id":"abc","kind":"push","name":"v","imageId":"i","addr":"x:1","status":"running","created":"2026-01-01T00:00:00Z","lastOpTime":"2026-01-01T00:00:00Z"}`
	for n, b := range map[string]string{".abc.json.tmp-123": "{", ".task-456": "{", "abc.json": running} {
		if err := os.WriteFile(dir+"/"+n, []byte(b), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	eng, err := replicate.New(replicate.Options{Store: st, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	if task, err := eng.Task("abc"); err != nil || task.Status != replicate.StatusFailed {
		t.Fatalf("interrupted task not rewritten as failed: %+v %v", task, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("temp file %s left in the task dir", e.Name())
		}
	}
}

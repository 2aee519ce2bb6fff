package registry_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imagestore/blobstore"
	"imagestore/internal/testcert"
	"imagestore/internal/tlsconf"
	"imagestore/transfer/registry/registrytest"
	"imagestore/transfer/replicate"
)

// mnTask mirrors the management node's reply class for GET /v1/tasks/<id>:
// lastOpTime is a Java long, so a JSON string there fails the decode.
type mnTask struct {
	LastOpTime int64  `json:"lastOpTime"`
	Status     string `json:"status"`
}

// zstackNodes starts stores the way ZStack deploys them: every store serves
// the same self-signed certificate whose only name is store.zstack.org, and
// verifies its peers by that name (serverName) while dialling their IPs.
func zstackNodes(t *testing.T, n int, serverName string) ([]*registrytest.Node, string) {
	t.Helper()
	pair := testcert.SelfSigned(t, tlsconf.DefaultServerName)
	cert, err := tls.X509KeyPair(pair.CertPEM(), pair.KeyPEM())
	if err != nil {
		t.Fatal(err)
	}
	var out []*registrytest.Node
	for range n {
		out = append(out, registrytest.Start(t, registrytest.Options{Cert: &cert, Engine: &replicate.Options{
			PeerServerName: serverName, ReportEvery: 100 * time.Millisecond, RetryDelay: 50 * time.Millisecond,
		}}))
	}
	return out, string(pair.CertPEM())
}

// mnClient is the management node's HTTPS client: it trusts every certificate.
var mnClient = &http.Client{Timeout: time.Minute, Transport: &http.Transport{
	TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // the MN's own behaviour, which we reproduce
}}

// mnPost sends a fixture as the management node does: the body exactly as
// the file holds it with the placeholders filled in, Content-Type only.
func mnPost(t *testing.T, node *registrytest.Node, path, fixture string, vars map[string]string) (int, string, []byte) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "v1", fixture))
	if err != nil {
		t.Fatal(err)
	}
	body := string(bytes.TrimSpace(b))
	for k, v := range vars {
		j, _ := json.Marshal(v)
		body = strings.ReplaceAll(body, `"{{`+k+`}}"`, string(j))
	}
	if strings.Contains(body, "{{") || strings.Contains(body, `"token"`) {
		t.Fatalf("fixture %s: unfilled placeholder or a token: %s", fixture, body)
	}
	req, _ := http.NewRequest(http.MethodPost, node.URL()+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	res, err := mnClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	rb, _ := io.ReadAll(res.Body)
	return res.StatusCode, res.Header.Get("X-Sync-Task-ID"), rb
}

// mnGet polls GET /v1/tasks/<id> as the management node does and decodes
// the answer strictly into its types; the status must be one of the four.
func mnGet(t *testing.T, node *registrytest.Node, id string) (int, mnTask) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, node.URL()+"/v1/tasks/"+id, nil)
	req.Header.Set("Content-Type", "application/json")
	res, err := mnClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusOK {
		return res.StatusCode, mnTask{}
	}
	var task mnTask
	if err := json.Unmarshal(b, &task); err != nil {
		t.Fatalf("task %s: the management node cannot parse %s: %v", id, b, err)
	}
	switch task.Status {
	case "waiting", "running", "success", "failed":
	default:
		t.Fatalf("task %s: status %q is none of waiting|running|success|failed", id, task.Status)
	}
	if task.LastOpTime < time.Now().Add(-time.Hour).UnixMilli() || task.LastOpTime > time.Now().Add(time.Minute).UnixMilli() {
		t.Fatalf("task %s: lastOpTime %d is not epoch milliseconds of now", id, task.LastOpTime)
	}
	return res.StatusCode, task
}

// mnPoll polls until the task is terminal, as the management node's pollers do.
func mnPoll(t *testing.T, node *registrytest.Node, id string) mnTask {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		code, task := mnGet(t, node, id)
		if code != http.StatusOK {
			t.Fatalf("task %s: %d on %s", id, code, node.Addr())
		}
		if task.Status == "success" || task.Status == "failed" {
			return task
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("task %s never finished", id)
	return mnTask{}
}

// mnChain is a volume backup chain named as the management node names them.
func mnChain(t *testing.T, st *blobstore.Store) blobstore.Ref {
	t.Helper()
	imgs := makeChain(t, st, "5f0c3e2ad9b84c7e9a1f6b2c3d4e5f60", 96<<10, 64<<10, 32<<10)
	return imgs[len(imgs)-1].Ref
}

// sameImage: the receiver holds the same name:id with the same whole chain.
func sameImage(t *testing.T, from, to *blobstore.Store, ref blobstore.Ref) {
	t.Helper()
	ctx := context.Background()
	a, err := replicate.Render(ctx, from, ref, true)
	if err != nil {
		t.Fatal(err)
	}
	b, err := replicate.Render(ctx, to, ref, true)
	if err != nil {
		t.Fatalf("%s not complete on the receiver: %v", ref, err)
	}
	if a.Digest != b.Digest {
		t.Fatalf("%s: chain differs (%s vs %s)", ref, a.Digest, b.Digest)
	}
	chain, err := to.Chain(ctx, ref)
	if err != nil || len(chain) != 3 {
		t.Fatalf("receiver chain of %s: %d images, %v", ref, len(chain), err)
	}
}

func TestTaskReplyFixture(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "v1", "task.reply.json"))
	if err != nil {
		t.Fatal(err)
	}
	var task mnTask
	if err := json.Unmarshal(b, &task); err != nil || task.LastOpTime != 1765028412345 || task.Status != "running" {
		t.Fatalf("fixture: %+v %v", task, err)
	}
	// What we answer decodes the same way; the old RFC 3339 string would not.
	if err := json.Unmarshal([]byte(`{"lastOpTime":"2026-12-06T13:40:12Z","status":"running"}`), &task); err == nil {
		t.Fatal("a string lastOpTime decoded into a long")
	}
	w, _ := json.Marshal(replicate.Task{Status: replicate.StatusRunning, LastOpTime: time.UnixMilli(1765028412345)}.Wire())
	if err := json.Unmarshal(w, &task); err != nil || task.LastOpTime != 1765028412345 {
		t.Fatalf("our reply %s: %+v %v", w, task, err)
	}
}

// TestV1ManagementNodeFlows runs the management node's three uses of /v1
// with its requests exactly as sent, over TLS with ZStack's kind of
// certificate, and polls the store the management node polls in each.
func TestV1ManagementNodeFlows(t *testing.T) {
	t.Run("backup sync: push posted to the source, polled there", func(t *testing.T) {
		nodes, ca := zstackNodes(t, 2, tlsconf.DefaultServerName)
		src, dst := nodes[0], nodes[1]
		ref := mnChain(t, src.Store)
		vars := map[string]string{"addr": dst.Addr(), "ca": ca, "name": ref.Name, "id": ref.ID}
		code, id, body := mnPost(t, src, "/v1/push", "push.request.json", vars)
		if code != http.StatusAccepted || id == "" || id == replicate.Existed {
			t.Fatalf("push: %d %q %s", code, id, body)
		}
		if code, _ := mnGet(t, dst, id); code != http.StatusOK {
			t.Fatalf("the peer does not know task %s right after the push answered: %d", id, code)
		}
		if task := mnPoll(t, src, id); task.Status != "success" {
			t.Fatalf("push: %+v", task)
		}
		sameImage(t, src.Store, dst.Store, ref)
		if task := mnPoll(t, dst, id); task.Status != "success" {
			t.Fatalf("the peer's record of %s: %+v", id, task)
		}
		// Again: the peer has it.
		if code, id, body := mnPost(t, src, "/v1/push", "push.request.json", vars); code != http.StatusOK || id != replicate.Existed {
			t.Fatalf("second push: %d %q %s", code, id, body)
		}
	})
	t.Run("backup recover: pull posted to the receiver, polled there", func(t *testing.T) {
		nodes, ca := zstackNodes(t, 2, tlsconf.DefaultServerName)
		recv, holder := nodes[0], nodes[1]
		ref := mnChain(t, holder.Store)
		code, id, body := mnPost(t, recv, "/v1/pull", "pull.request.json", map[string]string{"addr": holder.Addr(), "ca": ca, "name": ref.Name, "id": ref.ID})
		if code != http.StatusAccepted || id == "" || id == replicate.Existed {
			t.Fatalf("pull: %d %q %s", code, id, body)
		}
		if task := mnPoll(t, recv, id); task.Status != "success" {
			t.Fatalf("pull: %+v", task)
		}
		sameImage(t, holder.Store, recv.Store, ref)
		if task := mnPoll(t, holder, id); task.Status != "success" {
			t.Fatalf("the holder's record of %s: %+v", id, task)
		}
	})
	t.Run("image recovery: pull posted to src with addr=dst, polled on dst", func(t *testing.T) {
		nodes, ca := zstackNodes(t, 2, tlsconf.DefaultServerName)
		src, dst := nodes[0], nodes[1]
		ref := mnChain(t, src.Store)
		code, id, body := mnPost(t, src, "/v1/pull", "pull.request.json", map[string]string{"addr": dst.Addr(), "ca": ca, "name": ref.Name, "id": ref.ID})
		if code != http.StatusAccepted || id == "" || id == replicate.Existed {
			t.Fatalf("pull: %d %q %s", code, id, body)
		}
		if code, _ := mnGet(t, dst, id); code != http.StatusOK {
			t.Fatalf("dst does not know task %s right after the pull answered: %d", id, code)
		}
		if task := mnPoll(t, dst, id); task.Status != "success" {
			t.Fatalf("pull polled on dst: %+v", task)
		}
		sameImage(t, src.Store, dst.Store, ref)
		if task := mnPoll(t, src, id); task.Status != "success" {
			t.Fatalf("src's record of %s: %+v", id, task)
		}
	})
	t.Run("the peer is verified by the configured name, not the dialled IP", func(t *testing.T) {
		nodes, ca := zstackNodes(t, 2, "")
		src, dst := nodes[0], nodes[1]
		ref := mnChain(t, src.Store)
		code, id, body := mnPost(t, src, "/v1/push", "push.request.json", map[string]string{"addr": dst.Addr(), "ca": ca, "name": ref.Name, "id": ref.ID})
		if code == http.StatusAccepted || code == http.StatusOK || !strings.Contains(string(body), "certificate") {
			t.Fatalf("push verifying the IP %s: %d %q %s, want a certificate error", dst.Addr(), code, id, body)
		}
		other := testcert.SelfSigned(t, tlsconf.DefaultServerName) // right name, wrong certificate
		nodes, _ = zstackNodes(t, 2, tlsconf.DefaultServerName)
		ref = mnChain(t, nodes[0].Store)
		code, _, body = mnPost(t, nodes[0], "/v1/push", "push.request.json", map[string]string{"addr": nodes[1].Addr(), "ca": string(other.CertPEM()), "name": ref.Name, "id": ref.ID})
		if code == http.StatusAccepted || code == http.StatusOK || !strings.Contains(string(body), "certificate") {
			t.Fatalf("push trusting another certificate: %d %s", code, body)
		}
	})
	t.Run("unknown task", func(t *testing.T) {
		nodes, _ := zstackNodes(t, 1, tlsconf.DefaultServerName)
		if code, _ := mnGet(t, nodes[0], fmt.Sprintf("%032x", 7)); code != http.StatusNotFound {
			t.Fatalf("unknown task: %d", code)
		}
	})
}

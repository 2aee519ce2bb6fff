package agent

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"imagestore/agent/config"
	"imagestore/blobstore"
	"imagestore/internal/testwait"
)

// htEnv is an agent over a fresh store behind an httptest server.
type htEnv struct {
	a     *Agent
	store *blobstore.Store
	srv   *httptest.Server
	token string
}

// newHTAgent builds an agent over a fresh store (NBD off: no ports used).
func newHTAgent(tb testing.TB, mod func(*config.Config)) (*Agent, *blobstore.Store) {
	tb.Helper()
	root := tb.TempDir()
	store, err := blobstore.Open(context.Background(), blobstore.Options{Root: root, CommitGrace: time.Nanosecond})
	if err != nil {
		tb.Fatal(err)
	}
	cfg := testConfig(tb)
	cfg.Root = root
	cfg.NBD.PortRange = ""
	cfg.CallbackMaxDelay = 5 * time.Millisecond
	cfg.CallbackTimeout = 10 * time.Second
	if mod != nil {
		mod(&cfg)
	}
	a, err := New(cfg, store, slog.New(slog.DiscardHandler))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := a.Close(); err != nil {
			tb.Errorf("agent close: %v", err)
		}
		_ = store.Close()
	})
	return a, store
}

func newHTEnv(t *testing.T, mod func(*config.Config)) *htEnv {
	t.Helper()
	a, store := newHTAgent(t, mod)
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close) // runs before the agent's cleanup
	return &htEnv{a: a, store: store, srv: srv, token: string(a.cfg.Token)}
}

type htResp struct {
	code int
	hdr  http.Header
	body map[string]any
	raw  string
}

func (r htResp) errMsg() string { s, _ := r.body["error"].(string); return s }

// do sends body (string, io.Reader or nil) to path with headers; the env's
// token is sent unless hdr sets Authorization (use "-" for none).
func (e *htEnv) do(t *testing.T, method, path string, body any, hdr map[string]string) htResp {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case string:
		rd = strings.NewReader(b)
	case io.Reader:
		rd = b
	}
	req, err := http.NewRequest(method, e.srv.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if e.token != "" {
		req.Header.Set("Authorization", "Bearer "+e.token)
	}
	for k, v := range hdr {
		if k == "Authorization" && v == "-" {
			req.Header.Del(k)
			continue
		}
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	r := htResp{code: res.StatusCode, hdr: res.Header, raw: string(raw)}
	_ = json.Unmarshal(raw, &r.body)
	return r
}

// onlyReader hides the length of a body, so it is sent chunked.
type onlyReader struct{ io.Reader }

func TestHTTPAsyncNeedsTaskUUID(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	for _, tc := range []struct {
		name, path string
		hdr        map[string]string
		code       int
		err        string
	}{
		{"ping", "/imagestore/ping/", nil, 400, "missing header taskuuid"},
		{"setquota", "/imagestore/setquota/", nil, 400, "missing header taskuuid"},
		{"imginfo no slash", "/imagestore/imginfo", nil, 400, "missing header taskuuid"},
		{"bad callback scheme", "/imagestore/ping/", map[string]string{"taskuuid": "t1", "callbackurl": "ftp://x/y"}, 400, "is not an http(s) URL"},
		{"callback without host", "/imagestore/ping/", map[string]string{"taskuuid": "t2", "callbackurl": "http:///y"}, 400, "is not an http(s) URL"},
		{"sync twin needs none", "/imagestore/ping-sync/", nil, 200, ""},
		{"sync twin no slash", "/imagestore/ping-sync", nil, 200, ""},
		{"async with taskuuid", "/imagestore/ping/", map[string]string{"taskuuid": "t3"}, 200, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(t, http.MethodPost, tc.path, "{}", tc.hdr)
			if r.code != tc.code {
				t.Fatalf("status %d, want %d: %s", r.code, tc.code, r.raw)
			}
			if r.hdr.Get("Content-Type") != "application/json" {
				t.Fatalf("content type %q", r.hdr.Get("Content-Type"))
			}
			if tc.err == "" {
				if r.body["success"] != true || r.errMsg() != "" {
					t.Fatalf("want success: %s", r.raw)
				}
				return
			}
			if r.body["success"] != false || !strings.Contains(r.errMsg(), tc.err) {
				t.Fatalf("want error %q: %s", tc.err, r.raw)
			}
		})
	}
}

func TestHTTPAsyncCallbackAndSyncTwin(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	var mu sync.Mutex
	got := map[string]map[string]any{}
	cb := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var v map[string]any
		_ = json.NewDecoder(r.Body).Decode(&v)
		mu.Lock()
		got[r.Header.Get("taskuuid")] = v
		mu.Unlock()
	}))
	defer cb.Close()
	if r := e.do(t, http.MethodPost, "/imagestore/connect/", `{"uuid":"mn-1"}`, nil); r.body["success"] != true {
		t.Fatal(r.raw)
	}

	for _, tc := range []struct {
		name, path, body string
		success          bool
		field, err       string
	}{
		{"ping", "/imagestore/ping/", `{"uuid":"mn-1"}`, true, "totalSize", ""},
		{"setquota", "/imagestore/setquota/", `{"maxCapacity":"1073741824"}`, true, "freeSize", ""},
		{"setquota float", "/imagestore/setquota/", `{"maxCapacity":1.0E10}`, true, "totalSize", ""},
		{"setquota missing", "/imagestore/setquota/", `{}`, false, "", "missing field maxCapacity"},
		{"setquota bad json", "/imagestore/setquota/", `{"maxCapacity":`, false, "", "bad JSON in request body"},
		{"imginfo unknown", "/imagestore/imginfo/", `{"installPath":"zstore://no/pe"}`, false, "", "unknown install path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "task-" + strings.ReplaceAll(tc.name, " ", "-")
			r := e.do(t, http.MethodPost, tc.path, tc.body, map[string]string{"taskuuid": id, "callbackurl": cb.URL})
			if r.code != 200 {
				t.Fatalf("async answer %d: %s", r.code, r.raw)
			}
			testwait.For(t, "callback", func() bool {
				mu.Lock()
				defer mu.Unlock()
				return got[id] != nil
			})
			mu.Lock()
			v := got[id]
			mu.Unlock()
			syncPath := strings.TrimSuffix(tc.path, "/") + "-sync/"
			s := e.do(t, http.MethodPost, syncPath, tc.body, nil)
			if s.code != 200 {
				t.Fatalf("sync answer %d: %s", s.code, s.raw)
			}
			for what, res := range map[string]map[string]any{"callback": v, "sync twin": s.body} {
				if res["success"] != tc.success {
					t.Fatalf("%s: %v, want success=%v", what, res, tc.success)
				}
				if tc.field != "" {
					if _, ok := res[tc.field]; !ok {
						t.Fatalf("%s lacks %s: %v", what, tc.field, res)
					}
				}
				if msg, _ := res["error"].(string); !strings.Contains(msg, tc.err) || (tc.err == "" && msg != "") {
					t.Fatalf("%s: error %q, want %q", what, msg, tc.err)
				}
			}
		})
	}
	// The async answer itself is just an acknowledgement.
	r := e.do(t, http.MethodPost, "/imagestore/ping/", `{}`, map[string]string{"taskuuid": "ack"})
	if r.raw != "{\"error\":\"\",\"success\":true}\n" {
		t.Fatalf("ack %q", r.raw)
	}
}

// cbSink is a management node's callback endpoint: it records every
// callback by taskuuid, in arrival order.
type cbSink struct {
	srv *httptest.Server
	mu  sync.Mutex
	got map[string][]map[string]any
	raw map[string][][]byte // the bodies as they came
}

func newCBSink(t *testing.T) *cbSink {
	t.Helper()
	c := &cbSink{got: map[string][]map[string]any{}, raw: map[string][][]byte{}}
	c.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var v map[string]any
		_ = json.Unmarshal(b, &v)
		id := r.Header.Get("taskuuid")
		c.mu.Lock()
		c.got[id] = append(c.got[id], v)
		c.raw[id] = append(c.raw[id], b)
		c.mu.Unlock()
	}))
	t.Cleanup(c.srv.Close)
	return c
}

// wait returns the first callback of id.
func (c *cbSink) wait(t *testing.T, id string) map[string]any {
	t.Helper()
	testwait.For(t, "callback "+id, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.got[id]) > 0
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.got[id][0]
}

func (c *cbSink) count(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.got[id])
}

// A body over the limit is a bad request like any other: 200 and
// success:false inline on a sync path, 200 at once and the failure
// through the callback on an async one.
func TestHTTPBodyTooLarge(t *testing.T) {
	t.Parallel()
	const limit = 1 << 10
	e := newHTEnv(t, func(c *config.Config) { c.MaxBodyBytes = limit })
	cb := newCBSink(t)
	big := `{"uuid":"` + strings.Repeat("a", 4*limit) + `"}`
	for _, tc := range []struct {
		name, path string
		chunked    bool
		task       string
	}{
		{"sync, length known", "/imagestore/connect/", false, ""},
		{"sync, chunked", "/imagestore/connect/", true, ""},
		{"async, length known", "/imagestore/ping/", false, "big1"},
		{"async, chunked", "/imagestore/ping/", true, "big2"},
		{"sync twin, length known", "/imagestore/ping-sync/", false, ""},
		{"sync twin, chunked", "/imagestore/ping-sync/", true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var body any = big
			if tc.chunked {
				body = onlyReader{strings.NewReader(big)}
			}
			var hdr map[string]string
			if tc.task != "" {
				hdr = map[string]string{"taskuuid": tc.task, "callbackurl": cb.srv.URL}
			}
			r := e.do(t, http.MethodPost, tc.path, body, hdr)
			if r.code != http.StatusOK {
				t.Fatalf("%d %.300s", r.code, r.raw)
			}
			res := r.body
			if tc.task != "" {
				if res["success"] != true {
					t.Fatalf("async acknowledgement %.300s", r.raw)
				}
				res = cb.wait(t, tc.task)
				if n := cb.count(tc.task); n != 1 {
					t.Fatalf("%d callbacks for one taskuuid", n)
				}
			}
			msg, _ := res["error"].(string)
			if res["success"] != false || !strings.Contains(msg, "request body too large") || !strings.Contains(msg, "1024") {
				t.Fatalf("%v", res)
			}
		})
	}
	// Just under the limit is fine.
	ok := `{"uuid":"` + strings.Repeat("b", limit-20) + `"}`
	if r := e.do(t, http.MethodPost, "/imagestore/connect/", onlyReader{strings.NewReader(ok)}, nil); r.code != 200 || r.body["success"] != true {
		t.Fatalf("body under the limit: %d %.200s", r.code, r.raw)
	}
}

func TestHTTPAuth(t *testing.T) {
	t.Parallel()
	const tok = "tok-0123456789abcdef"
	e := newHTEnv(t, func(c *config.Config) { c.Token = tok })
	paths := []struct {
		method, path string
		okCode       int
	}{
		{http.MethodGet, "/metrics", 200},
		{http.MethodGet, "/imagestore/echo/", 200},
		{http.MethodPost, "/imagestore/ping-sync/", 200},
		{http.MethodPost, "/imagestore/job/list/", 200},
		{http.MethodPost, "/imagestore/no-such-path/", 404},
	}
	for _, tc := range []struct {
		name, auth string
		ok         bool
	}{
		{"none", "-", false},
		{"wrong token", "Bearer nope", false},
		{"token prefix", "Bearer " + tok[:len(tok)-1], false},
		{"token plus more", "Bearer " + tok + "x", false},
		{"basic scheme", "Basic " + tok, false},
		{"lowercase scheme", "bearer " + tok, false},
		{"bare token", tok, false},
		{"right", "Bearer " + tok, true},
		{"right, trailing space", "Bearer " + tok + " ", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, p := range paths {
				r := e.do(t, p.method, p.path, "{}", map[string]string{"Authorization": tc.auth})
				want := http.StatusUnauthorized
				if tc.ok {
					want = p.okCode
				}
				if r.code != want {
					t.Fatalf("%s %s: %d, want %d: %.200s", p.method, p.path, r.code, want, r.raw)
				}
				if !tc.ok {
					if r.hdr.Get("WWW-Authenticate") == "" || !strings.Contains(r.errMsg(), "bearer token") {
						t.Fatalf("401 without challenge or clear error: %v %s", r.hdr, r.raw)
					}
				}
			}
			// Export URLs are their own credential (TestExportURLIsCapability):
			// an unknown one is 404 whatever the header says.
			if r := e.do(t, http.MethodGet, "/export/image-00000000000000000000000000000000.qcow2", nil, map[string]string{"Authorization": tc.auth}); r.code != 404 {
				t.Fatalf("unknown export with auth %q: %d, want 404", tc.auth, r.code)
			}
			// /health never needs the token.
			if r := e.do(t, http.MethodGet, "/health", nil, map[string]string{"Authorization": tc.auth}); r.code != 200 || r.body["status"] != "ok" {
				t.Fatalf("/health: %d %s", r.code, r.raw)
			}
		})
	}
	if got := testutil.ToFloat64(e.a.m.httpRequests.WithLabelValues("unauthorized", "401")); got == 0 {
		t.Fatal("401s not counted under the bounded route label")
	}
	if got := testutil.ToFloat64(e.a.m.httpRequests.WithLabelValues("unmatched", "404")); got == 0 {
		t.Fatal("unknown paths not counted as unmatched")
	}

	// No token configured: everything is open.
	open := newHTEnv(t, nil)
	if r := open.do(t, http.MethodGet, "/imagestore/echo/", nil, nil); r.code != 200 {
		t.Fatalf("open agent: %d", r.code)
	}
}

func TestHTTPMethodsAndPaths(t *testing.T) {
	t.Parallel()
	e := newHTEnv(t, nil)
	for _, tc := range []struct {
		method, path string
		code         int
		check        func(r htResp) bool
	}{
		{http.MethodGet, "/imagestore/connect/", 405, func(r htResp) bool {
			return r.hdr.Get("Allow") == "POST, PUT" && strings.Contains(r.errMsg(), "method GET not allowed")
		}},
		{http.MethodDelete, "/imagestore/ping/", 405, nil},
		{http.MethodGet, "/imagestore/ping-sync/", 405, nil},
		{http.MethodPut, "/imagestore/connect", 200, nil},
		{http.MethodPost, "/imagestore/connect/", 200, nil},
		{http.MethodHead, "/imagestore/echo/", 200, nil},
		{http.MethodPost, "/imagestore/nope/", 404, func(r htResp) bool { return strings.Contains(r.errMsg(), "unknown path /imagestore/nope/") }},
		{http.MethodPost, "/imagestore/connect-sync/", 404, nil}, // sync routes have no twin
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			r := e.do(t, tc.method, tc.path, `{"uuid":"u"}`, nil)
			if r.code != tc.code || (tc.check != nil && !tc.check(r)) {
				t.Fatalf("%d %v %s", r.code, r.hdr, r.raw)
			}
		})
	}
}

func TestReplyBody(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		v    any
		err  error
		want string
	}{
		{"nil ok", nil, nil, `{"error":"","success":true}`},
		{"fields merged", struct {
			A int `json:"a"`
		}{7}, nil, `{"a":7,"error":"","success":true}`},
		{"error wins over fields", nil, io.ErrUnexpectedEOF, `{"error":"unexpected EOF","success":false}`},
		{"value that is not an object", []int{1}, nil, ""},
		{"fields cannot fake success", map[string]any{"success": false, "error": "x"}, nil, `{"error":"","success":true}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := string(replyBody(tc.v, tc.err))
			if tc.want == "" {
				var v map[string]any
				if json.Unmarshal([]byte(got), &v) != nil || v["success"] != false || !strings.Contains(v["error"].(string), "encoding reply") {
					t.Fatalf("got %s", got)
				}
				return
			}
			if got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}

// testConfig is the imagestore profile's defaults: the agent tests exercise
// our own protections (token, NBD PSK, one tls block), which the zstack
// profile turns off; a test of the zstack profile says so.
func testConfig(tb testing.TB) config.Config {
	tb.Helper()
	cfg, err := config.Defaults(config.ProfileImagestore)
	if err != nil {
		tb.Fatal(err)
	}
	return cfg
}

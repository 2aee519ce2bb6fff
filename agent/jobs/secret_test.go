package jobs

import (
	"context"
	"imagestore/internal/testwait"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// secretCB records the credentials callbacks arrive with.
type secretCB struct {
	*httptest.Server
	mu    sync.Mutex
	seen  []string // "user:pass?query" per call
	fails int
}

func newSecretCB(t *testing.T, fails int) *secretCB {
	s := &secretCB{fails: fails}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, _ := r.BasicAuth()
		s.mu.Lock()
		s.seen = append(s.seen, u+":"+p+"?"+r.URL.RawQuery)
		n := len(s.seen)
		s.mu.Unlock()
		if n <= s.fails {
			http.Error(w, "not yet", http.StatusServiceUnavailable)
		}
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *secretCB) calls() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.seen...)
}

// withCreds puts a user, password and token into a server URL.
func withCreds(base string) string {
	return strings.Replace(base, "http://", "http://mgmt:s3cret-pw@", 1) + "/cb/path?token=s3cret-tok&x=1"
}

// noSecrets fails if any file under dir or s mentions a secret.
func noSecrets(t *testing.T, what, s string) {
	t.Helper()
	if strings.Contains(s, "s3cret") {
		t.Fatalf("%s leaks a secret: %s", what, s)
	}
}

func recordsText(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".json") {
			c, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			b.Write(c)
		}
	}
	return b.String()
}

// TestCallbackURLRedacted: job/list and job records show the callback URL
// without userinfo or query; delivery still uses the full URL, also after a
// restart (from a 0600 side file removed once the callback is settled).
// One function: the restart half checks what the first half persisted.
func TestCallbackURLRedacted(t *testing.T) {
	quick := func(context.Context, *Job) ([]byte, error) { return []byte(`{"success":true}`), nil }
	const want = "mgmt:s3cret-pw?token=s3cret-tok&x=1"

	t.Run("delivered", func(t *testing.T) {
		cb := newSecretCB(t, 0)
		dir := t.TempDir()
		jm, _ := newTestJobs(t, dir, nil)
		j := mustSubmit(t, jm, "t1", false, withCreds(cb.URL), quick)
		waitDone(t, j)
		testwait.For(t, "delivery", func() bool { return j.Info().Callback.Delivered })
		if c := cb.calls(); len(c) != 1 || c[0] != want {
			t.Fatalf("callback arrived with %q, want %q", c, want)
		}
		for _, in := range jm.List() {
			if in.CallbackURL != cb.URL+"/cb/path" {
				t.Fatalf("job/list callbackUrl %q", in.CallbackURL)
			}
		}
		noSecrets(t, "job record", recordsText(t, dir))
		testwait.For(t, "side file removed after delivery", func() bool {
			_, err := os.Stat(jm.callbackPath("t1"))
			return os.IsNotExist(err)
		})
	})

	t.Run("unreachable", func(t *testing.T) {
		jm, _ := newTestJobs(t, "", func(o *Options) { o.CallbackRetries = 0 })
		dead := httptest.NewServer(http.NotFoundHandler())
		url := withCreds(dead.URL)
		dead.Close()
		j := mustSubmit(t, jm, "t2", false, url, quick)
		testwait.For(t, "give up", func() bool { return j.Info().Callback.GivenUp })
		in := j.Info()
		if in.Callback.LastError == "" {
			t.Fatal("no error recorded")
		}
		noSecrets(t, "lastError", in.Callback.LastError)
	})

	t.Run("after restart", func(t *testing.T) {
		cb := newSecretCB(t, 0)
		dir := t.TempDir()
		jm, err := New(testOptions(dir))
		if err != nil {
			t.Fatal(err)
		}
		g := newGate()
		mustSubmit(t, jm, "t3", true, withCreds(cb.URL), g.fn)
		g.next(t)
		ctx, cancel := context.WithTimeout(context.Background(), testwait.Deadline)
		defer cancel()
		if err := jm.Shutdown(ctx); err != nil {
			t.Fatal(err)
		}
		noSecrets(t, "job record", recordsText(t, dir))
		fi, err := os.Stat(jm.callbackPath("t3"))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("side file: %v %v", fi, err)
		}
		jm2, _ := newTestJobs(t, dir, func(o *Options) { o.CallbackMaxDelay = time.Millisecond })
		jm2.ResumeCallbacks()
		testwait.For(t, "callback after restart", func() bool {
			j, ok := jm2.Get("t3")
			return ok && j.Info().Callback.Delivered
		})
		if c := cb.calls(); len(c) != 1 || c[0] != want {
			t.Fatalf("callback after restart arrived with %q, want %q", c, want)
		}
		testwait.For(t, "side file removed after delivery", func() bool {
			_, err := os.Stat(jm2.callbackPath("t3"))
			return os.IsNotExist(err)
		})
	})

	t.Run("legacy record", func(t *testing.T) {
		// A record written before redaction holds the full URL: loading
		// rewrites it redacted and still delivers to the full URL.
		cb := newSecretCB(t, 0)
		dir := t.TempDir()
		jm0, _ := newTestJobs(t, dir, nil)
		rec := `{"id":"t4","kind":"test","state":"failed","error":"x","created":"2026-01-01T00:00:00Z","ended":"2026-01-01T00:00:01Z","callbackUrl":"` + withCreds(cb.URL) + `","callback":{"attempts":0,"delivered":false,"givenUp":false},"result":{"success":false}}`
		if err := os.WriteFile(jm0.path("t4"), []byte(rec), 0o600); err != nil {
			t.Fatal(err)
		}
		jm, _ := newTestJobs(t, dir, nil)
		noSecrets(t, "rewritten record", recordsText(t, dir))
		jm.ResumeCallbacks()
		testwait.For(t, "legacy callback", func() bool {
			j, ok := jm.Get("t4")
			return ok && j.Info().Callback.Delivered
		})
		if c := cb.calls(); len(c) != 1 || c[0] != want {
			t.Fatalf("legacy callback arrived with %q", c)
		}
	})
}

// TestJobsLoadSweepsLeftovers: temp files of an interrupted record write
// and side files without a record are removed on load.
func TestJobsLoadSweepsLeftovers(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{".tmp-123456", ".0123456789abcdef0123456789abcdef.json.tmp-42", "0123456789abcdef0123456789abcdef.callback"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	newTestJobs(t, dir, nil)
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("leftovers kept: %v", ents)
	}
}

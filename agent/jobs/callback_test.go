package jobs

import (
	"context"
	"encoding/json"
	"imagestore/internal/testwait"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// cbServer fails the first n callback attempts, then accepts.
type cbServer struct {
	*httptest.Server
	mu    sync.Mutex
	fail  int
	calls []cbCall
}

type cbCall struct {
	at          time.Time
	task, ctype string
	body        []byte
}

func newCBServer(t *testing.T, fail int) *cbServer {
	s := &cbServer{fail: fail}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		s.mu.Lock()
		s.calls = append(s.calls, cbCall{time.Now(), r.Header.Get("taskuuid"), r.Header.Get("Content-Type"), b})
		n := len(s.calls)
		s.mu.Unlock()
		if n <= s.fail {
			http.Error(w, "not yet", http.StatusInternalServerError)
		}
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *cbServer) snapshot() []cbCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]cbCall(nil), s.calls...)
}

func TestCallbackRetries(t *testing.T) {
	for _, tc := range []struct {
		name      string
		fail      int
		retries   int
		maxDelay  time.Duration
		attempts  int
		delivered bool
		minGaps   []time.Duration // lower bounds only: timers never fire early
	}{
		{"first try", 0, 3, time.Second, 1, true, nil},
		{"backoff doubles", 2, 3, time.Second, 3, true, []time.Duration{250 * time.Millisecond, 500 * time.Millisecond}},
		{"capped delay", 3, 5, 20 * time.Millisecond, 4, true, []time.Duration{20 * time.Millisecond, 20 * time.Millisecond, 20 * time.Millisecond}},
		{"given up", 1000, 2, 5 * time.Millisecond, 3, false, nil},
		{"no retries", 1000, 0, 5 * time.Millisecond, 1, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := newCBServer(t, tc.fail)
			jm, m := newTestJobs(t, "", func(o *Options) {
				o.CallbackRetries = tc.retries
				o.CallbackMaxDelay = tc.maxDelay
			})
			id := "cb-" + strings.ReplaceAll(tc.name, " ", "-")
			j := mustSubmit(t, jm, id, false, srv.URL, func(context.Context, *Job) ([]byte, error) {
				return okBody(map[string]any{"answer": 42}), nil
			})
			waitDone(t, j)
			testwait.For(t, "callback settled", func() bool {
				cs := j.Info().Callback
				return cs.Delivered || (cs.GivenUp && testutil.ToFloat64(m.CallbacksGivenUp) == 1)
			})
			in := j.Info()
			cs := in.Callback
			if cs.Attempts != tc.attempts || cs.Delivered != tc.delivered || cs.GivenUp == tc.delivered {
				t.Fatalf("callback status %+v, want %d attempts delivered=%v", cs, tc.attempts, tc.delivered)
			}
			if tc.delivered != (cs.LastError == "") {
				t.Fatalf("lastError %q", cs.LastError)
			}
			if !tc.delivered && !strings.Contains(cs.LastError, "500") {
				t.Fatalf("lastError %q does not give the status", cs.LastError)
			}
			calls := srv.snapshot()
			if len(calls) != tc.attempts {
				t.Fatalf("server saw %d attempts, want %d", len(calls), tc.attempts)
			}
			for i, c := range calls {
				if c.task != id || c.ctype != "application/json" || string(c.body) != string(in.Result) {
					t.Fatalf("attempt %d: taskuuid %q type %q body %s", i+1, c.task, c.ctype, c.body)
				}
			}
			for i, min := range tc.minGaps {
				if gap := calls[i+1].at.Sub(calls[i].at); gap < min {
					t.Fatalf("gap before attempt %d: %v, want at least %v", i+2, gap, min)
				}
			}
			wantFailed := 0.0
			if !tc.delivered {
				wantFailed = 1
			}
			if got := testutil.ToFloat64(m.CallbacksGivenUp); got != wantFailed {
				t.Fatalf("callbacks_given_up_total = %v, want %v", got, wantFailed)
			}
			// The settled status is persisted, so a restart does not resend.
			testwait.For(t, "persisted callback status", func() bool {
				b, err := os.ReadFile(jm.path(id))
				var disk Info
				return err == nil && json.Unmarshal(b, &disk) == nil && disk.Callback.Delivered == tc.delivered && disk.Callback.GivenUp != tc.delivered
			})
		})
	}
}

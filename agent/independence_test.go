package agent

import (
	"net/http"
	"strings"
	"testing"

	"imagestore/agent/config"
)

// TestTwoAgentsAreIndependent runs two agents in one process and checks
// that nothing one does shows in the other: jobs, upload dirs, exports,
// metrics and configuration (token) all belong to the agent that made them.
func TestTwoAgentsAreIndependent(t *testing.T) {
	t.Parallel()
	a := newHTEnv(t, func(c *config.Config) { c.Token, c.Debug = "token-a", true })
	b := newHTEnv(t, func(c *config.Config) { c.Debug = true })

	// A job on a is unknown to b, under the same taskuuid.
	hdr := map[string]string{"taskuuid": "same-task"}
	if r := a.do(t, http.MethodPost, "/imagestore/debug/sleep/", `{"millis": 1}`, hdr); r.code != http.StatusOK {
		t.Fatalf("sleep on a: %d %v", r.code, r.body)
	}
	if r := a.do(t, http.MethodPost, "/imagestore/job/get/", `{"taskuuid": "same-task"}`, nil); r.code != http.StatusOK || r.body["success"] != true {
		t.Fatalf("job/get on a: %d %v", r.code, r.body)
	}
	if r := b.do(t, http.MethodPost, "/imagestore/job/get/", `{"taskuuid": "same-task"}`, nil); r.body["success"] == true {
		t.Fatalf("b knows a's job: %d %v", r.code, r.body)
	}

	// b starts its own job under the same id: it runs, it is not a's duplicate.
	if r := b.do(t, http.MethodPost, "/imagestore/debug/sleep-sync/", `{"millis": 1}`, map[string]string{"taskuuid": "same-task"}); r.code != http.StatusOK || r.body["success"] != true {
		t.Fatalf("sleep on b: %d %v", r.code, r.body)
	}

	// Upload dirs live under each agent's own root.
	dirA, dirB := a.allocUploadDir(t, `{}`), b.allocUploadDir(t, `{}`)
	if !strings.HasPrefix(dirA, a.a.cfg.Root) || !strings.HasPrefix(dirB, b.a.cfg.Root) || strings.HasPrefix(dirA, b.a.cfg.Root) {
		t.Fatalf("upload dirs not under their own roots: a %s (root %s), b %s (root %s)", dirA, a.a.cfg.Root, dirB, b.a.cfg.Root)
	}

	// Auth is per agent: b has no token, a refuses a request without one.
	if r := a.do(t, http.MethodPost, "/imagestore/job/list/", nil, map[string]string{"Authorization": "-"}); r.code != http.StatusUnauthorized {
		t.Fatalf("a without token: %d, want 401", r.code)
	}
	if r := b.do(t, http.MethodPost, "/imagestore/job/list/", nil, nil); r.code != http.StatusOK {
		t.Fatalf("b without token: %d, want 200", r.code)
	}

	// Metrics: each agent has its own registry and counts only its requests.
	if a.a.Registry() == b.a.Registry() {
		t.Fatal("the two agents share a Prometheus registry")
	}
	const reqs = "imagestore_agent_http_requests_total"
	beforeA, beforeB := counterSum(t, a.a, reqs), counterSum(t, b.a, reqs)
	for range 3 {
		a.do(t, http.MethodGet, "/health", nil, nil)
	}
	if got := counterSum(t, a.a, reqs) - beforeA; got != 3 {
		t.Fatalf("a counted %v more requests, want 3", got)
	}
	if got := counterSum(t, b.a, reqs); got != beforeB {
		t.Fatalf("b's request counter moved from %v to %v on a's requests", beforeB, got)
	}
}

// counterSum adds up every series of counter name in a's registry.
func counterSum(t *testing.T, a *Agent, name string) float64 {
	t.Helper()
	mfs, err := a.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

package registry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"imagestore/transfer/replicate"
)

// clientFrom is an HTTP client whose connections come from local address ip
// (any of 127.0.0.0/8 on Linux): another host, as the server sees it.
func clientFrom(t *testing.T, ip string) *http.Client {
	t.Helper()
	tr := &http.Transport{DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}).DialContext}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: time.Minute}
}

func putTask(t *testing.T, c *http.Client, url string, body []byte) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, url, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

// TestTaskReportRefusals: PUT /v1/tasks/<id> (no token in the zstack
// profile) refuses a report from a host other than the first reporter, a
// report over a task this store runs, and an oversized body.
func TestTaskReportRefusals(t *testing.T) {
	a, b := newNode(t, ""), newNode(t, "")
	local, other := clientFrom(t, "127.0.0.1"), clientFrom(t, "127.0.0.2")
	wire := func(id string, st replicate.Status, errText string) []byte {
		j, _ := json.Marshal(replicate.Wire{ID: id, Kind: "push", Name: "v", ImageID: "i", Status: st, Error: errText})
		return j
	}

	if code, body := putTask(t, local, a.URL()+"/v1/tasks/t1", wire("t1", replicate.StatusRunning, "")); code != http.StatusOK {
		t.Fatalf("first report: %d %s", code, body)
	}
	for _, tc := range []struct {
		name   string
		c      *http.Client
		id     string
		body   []byte
		status int
	}{
		{"another host flips the status", other, "t1", wire("t1", replicate.StatusSuccess, ""), http.StatusForbidden},
		{"body id is not the path's", local, "t1", wire("t2", replicate.StatusSuccess, ""), http.StatusBadRequest},
		{"body over 64 KiB", local, "t1", wire("t1", replicate.StatusFailed, strings.Repeat("x", 64<<10)), http.StatusRequestEntityTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if code, body := putTask(t, tc.c, a.URL()+"/v1/tasks/"+tc.id, tc.body); code != tc.status {
				t.Fatalf("%d %s, want %d", code, body, tc.status)
			}
			if task, err := a.Engine.Task("t1"); err != nil || task.Status != replicate.StatusRunning || task.Addr != "127.0.0.1" {
				t.Fatalf("record after a refused report: %+v %v", task, err)
			}
		})
	}
	// The first reporter still may.
	if code, body := putTask(t, local, a.URL()+"/v1/tasks/t1", wire("t1", replicate.StatusSuccess, "")); code != http.StatusOK {
		t.Fatalf("reporter's final report: %d %s", code, body)
	}

	// A task a runs itself answers 409 to a report from anyone, and stays ours.
	ref := makeChain(t, a.Store, "v", 4<<10)[0].Ref
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	own, err := a.Engine.Push(ctx, replicate.Request{Name: ref.Name, ID: ref.ID, Addr: b.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*http.Client{local, other} {
		j, _ := json.Marshal(replicate.Wire{ID: own, Kind: "push", Name: ref.Name, ImageID: ref.ID, Status: replicate.StatusFailed})
		if code, body := putTask(t, c, a.URL()+"/v1/tasks/"+own, j); code != http.StatusConflict {
			t.Fatalf("report over our own task: %d %s", code, body)
		}
	}
	if task, err := a.Engine.Wait(ctx, own); err != nil || task.Role != "" || task.Status != replicate.StatusSuccess {
		t.Fatalf("our own task: %+v %v", task, err)
	}
}

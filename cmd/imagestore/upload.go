package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"imagestore/agent/api"
	"imagestore/internal/retry"
	"imagestore/internal/tlsconf"
	"imagestore/transfer/ratelimit"
)

// The agent's upload:// import (docs/agent-protocol.md): after the
// management node starts /imagestore/import/ with imgurl upload://…, the
// host streams the file with PUT /imagestore/upload/ in chunks of at most
// maxChunk bytes, each with headers taskuuid and Upload-Offset (the bytes
// the agent holds), the last with Upload-Complete: true. An empty PUT
// without Upload-Offset asks for the offset; a chunk at the wrong offset
// gets 409 and the offset to resume from.

type agentClient struct {
	base  string
	token string
	hc    *http.Client
}

func (g *globals) agent() (*agentClient, error) {
	base := strings.TrimSuffix(g.agentURL, "/")
	if !strings.HasPrefix(base, "http://") && !strings.HasPrefix(base, "https://") {
		return nil, usageErr("-agent-url %q: want http(s)://host:port", g.agentURL)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	if g.rootCA != "" {
		tc, err := tlsconf.ClientFile(g.rootCA, g.serverName)
		if err != nil {
			return nil, fmt.Errorf("-rootca: %w", err)
		}
		tr.TLSClientConfig = tc
	}
	return &agentClient{base: base, token: g.token, hc: &http.Client{Transport: tr, Timeout: 5 * time.Minute}}, nil
}

// uploadState is the agent's answer to an upload chunk.
type uploadState struct {
	api.Reply
	api.UploadReply
}

// errNoSession: the agent has no upload waiting for this task (yet, or any more).
var errNoSession = errors.New("no upload import waiting for this task")

// errAgent is a definite refusal by the agent (not worth a retry).
type errAgent struct {
	status int
	msg    string
}

func (e *errAgent) Error() string { return fmt.Sprintf("agent: HTTP %d: %s", e.status, e.msg) }

// put sends one chunk (body nil = probe) and returns the agent's view.
func (a *agentClient) put(ctx context.Context, task string, body io.Reader, n, off int64, last bool) (uploadState, error) {
	var rd io.Reader = http.NoBody
	if body != nil {
		rd = body
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, a.base+api.PathUpload, rd)
	if err != nil {
		return uploadState{}, err
	}
	req.ContentLength = n
	req.Header.Set(api.HeaderTaskUUID, task)
	req.Header.Set("Content-Type", "application/octet-stream")
	if body != nil {
		req.Header.Set(api.HeaderUploadOffset, strconv.FormatInt(off, 10))
	}
	if last {
		req.Header.Set(api.HeaderUploadComplete, "true")
	}
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		return uploadState{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return uploadState{}, err
	}
	var st uploadState
	jerr := json.Unmarshal(b, &st)
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return st, fmt.Errorf("%w: %s", errNoSession, st.Error)
	case resp.StatusCode == http.StatusConflict && jerr == nil:
		return st, nil // resume from st.Offset
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return st, &errAgent{resp.StatusCode, "authentication failed: check -token or $IMAGESTORE_TOKEN"}
	case resp.StatusCode >= 500:
		return st, fmt.Errorf("agent: HTTP %d: %s", resp.StatusCode, st.Error)
	case resp.StatusCode != http.StatusOK || jerr != nil:
		msg := st.Error
		if msg == "" {
			msg = strings.TrimSpace(string(b))
		}
		return st, &errAgent{resp.StatusCode, msg}
	}
	return st, nil
}

type uploadResult struct {
	TaskUUID    string `json:"taskuuid"`
	Sent        int64  `json:"sent"`
	State       string `json:"state,omitempty"`
	InstallPath string `json:"installPath,omitempty"`
	Format      string `json:"format,omitempty"`
	Size        int64  `json:"size,omitempty"`
}

func cmdUpload(ctx context.Context, g *globals, args []string) error {
	fs := g.subFlags("upload")
	task := fs.String("task", "", "taskuuid of the agent's upload:// import")
	var bw byteFlag
	fs.Var(&bw, "bwlimit", "upload limit in bytes/s (0 = none)")
	waitStart := fs.Duration("wait-start", 2*time.Minute, "how long to wait for the import to be ready for data")
	wait := fs.Bool("wait", true, "wait until the agent has stored the image")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *task == "" {
		return usageErr("upload -task TASKUUID FILE")
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	a, err := g.agent()
	if err != nil {
		return err
	}
	defer a.hc.CloseIdleConnections()

	st, err := a.waitSession(ctx, *task, *waitStart)
	if err != nil {
		return err
	}
	p := g.newProgress("upload", size)
	p.Add(st.Offset)
	sent, err := a.sendFile(ctx, *task, f, size, st, ratelimit.New(bw.v), p)
	p.Done()
	if err != nil {
		return fmt.Errorf("upload %s: %w", *task, err)
	}
	res := uploadResult{TaskUUID: *task, Sent: sent}
	if *wait {
		if err := a.waitJob(ctx, *task, &res); err != nil {
			return err
		}
	}
	return g.printResult(res, func(w io.Writer) {
		fmt.Fprintf(w, "task %s: sent %d bytes %s %s\n", res.TaskUUID, res.Sent, res.State, res.InstallPath)
	})
}

// waitSession waits up to waitStart for the import job to open its upload
// session (it may be queued) and returns where the upload stands.
func (a *agentClient) waitSession(ctx context.Context, task string, waitStart time.Duration) (uploadState, error) {
	deadline := time.Now().Add(waitStart)
	for {
		st, err := a.put(ctx, task, nil, 0, 0, false)
		if err == nil {
			return st, nil
		}
		var ae *errAgent
		if errors.As(err, &ae) || time.Now().After(deadline) {
			return st, err
		}
		if err := retry.Sleep(ctx, 250*time.Millisecond); err != nil {
			return st, err
		}
	}
}

// sendFile sends f from st.Offset to size in chunks of at most the
// agent's maxChunk (16 MiB at most) and returns the bytes the agent holds.
func (a *agentClient) sendFile(ctx context.Context, task string, f io.ReaderAt, size int64, st uploadState, lim *ratelimit.Limiter, p *progress) (int64, error) {
	chunk := st.MaxChunk
	if chunk <= 0 {
		chunk = 1 << 20
	}
	chunk = min(chunk, 16<<20)
	off := st.Offset
	// A chunk that fails is sent again up to 6 times, 400 ms doubling to
	// 2 s, from where the agent says it holds the upload.
	policy := retry.Policy{Attempts: 7, Initial: 400 * time.Millisecond, Max: 2 * time.Second, Jitter: 0.2,
		Retryable: func(err error) bool {
			var ae *errAgent
			return !errors.As(err, &ae) && !errors.Is(err, errNoSession)
		}}
	for {
		n := min(chunk, size-off)
		last := off+n == size
		tries := 0
		err := policy.Do(ctx, func(ctx context.Context, attempt int) error {
			tries++
			if attempt > 0 {
				// Ask where to resume (a 409 already told us).
				if st2, perr := a.put(ctx, task, nil, 0, 0, false); perr == nil {
					p.Add(st2.Offset - off)
					off = st2.Offset
				} else if errors.Is(perr, errNoSession) {
					return perr
				}
				n = min(chunk, size-off)
				last = off+n == size
			}
			st, err := a.put(ctx, task, ratelimit.Reader(ctx, io.NewSectionReader(f, off, n), lim), n, off, last)
			if err != nil {
				return err
			}
			if !st.Success || st.Offset != off+n {
				return fmt.Errorf("agent: %s", st.Error)
			}
			p.Add(n)
			off = st.Offset
			if last && !st.Complete {
				return retry.Permanent(errors.New("agent did not acknowledge the end of the upload"))
			}
			return nil
		})
		if err != nil && tries == policy.Attempts && policy.Retryable(err) && ctx.Err() == nil {
			err = fmt.Errorf("giving up after %d failed chunks: %w", tries-1, err)
		}
		if err != nil || last {
			return off, err
		}
	}
}

// waitJob polls the agent's progress until the import job ends.
func (a *agentClient) waitJob(ctx context.Context, task string, res *uploadResult) error {
	body, _ := json.Marshal(api.ProgressRequest{TaskUUID: task})
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.base+api.PathProgress, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		if a.token != "" {
			req.Header.Set("Authorization", "Bearer "+a.token)
		}
		resp, err := a.hc.Do(req)
		if err == nil {
			var pr struct {
				api.Reply
				api.ProgressReply
			}
			derr := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&pr)
			resp.Body.Close()
			if derr == nil && pr.Success {
				switch pr.State {
				case api.JobSucceeded:
					res.State, res.InstallPath, res.Format, res.Size = string(pr.State), pr.InstallPath, pr.Format, pr.Size
					return nil
				case api.JobFailed, api.JobCancelled:
					return fmt.Errorf("import %s %s (the management node got the reason in its callback)", task, pr.State)
				}
			}
		}
		if err := retry.Sleep(ctx, 250*time.Millisecond); err != nil {
			return err
		}
	}
}

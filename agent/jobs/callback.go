package jobs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"imagestore/internal/redact"
	"imagestore/internal/retry"
)

// ResumeCallbacks starts delivering the results of loaded jobs that were
// not delivered yet.
func (m *Manager) ResumeCallbacks() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, j := range m.jobs {
		in := j.Info()
		if in.State.Finished() && j.callbackURL() != "" && !in.Callback.Delivered && !in.Callback.GivenUp {
			m.wg.Add(1)
			go m.deliver(j)
		}
	}
}

// deliver POSTs the job's result to its callback URL, retrying with
// exponential backoff, then gives up with a log line. At shutdown it
// stops without giving up: the next start delivers.
func (m *Manager) deliver(j *Job) {
	defer m.wg.Done()
	in := j.Info()
	attempts := m.opts.CallbackRetries + 1
	tried := 0
	policy := retry.Policy{
		Attempts: attempts,
		// The schedule is documented (docs/agent-protocol.md): 250 ms,
		// doubling, capped at CallbackMaxDelay, without jitter.
		Initial: 250 * time.Millisecond,
		Max:     m.opts.CallbackMaxDelay,
	}
	err := policy.Do(m.ctx, func(ctx context.Context, attempt int) error {
		tried++
		err := m.post(ctx, j.callbackURL(), in.ID, in.Result)
		j.mu.Lock()
		j.info.Callback.Attempts++
		if err == nil {
			j.info.Callback.Delivered = true
			j.info.Callback.LastError = ""
		} else {
			j.info.Callback.LastError = err.Error()
		}
		j.mu.Unlock()
		if err == nil {
			m.log.Debug("callback delivered", "task", in.ID, "attempt", attempt+1)
			return nil
		}
		m.log.Warn("callback failed", "task", in.ID, "attempt", attempt+1, "err", err)
		return err
	})
	if err == nil {
		_ = m.persist(j)
		return
	}
	if tried < attempts {
		return // shut down while waiting: delivered by the next start
	}
	j.mu.Lock()
	j.info.Callback.GivenUp = true
	j.mu.Unlock()
	m.metrics.CallbacksGivenUp.Inc()
	m.log.Error("callback given up", "task", in.ID, "kind", in.Kind, "attempts", attempts)
	_ = m.persist(j)
}

func (m *Manager) post(ctx context.Context, target, id string, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, m.client.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		// Not err: it quotes the URL.
		return fmt.Errorf("callback URL %s is not usable", redact.URL(target))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("taskuuid", id)
	resp, err := m.client.Do(req)
	if err != nil {
		// *url.Error quotes the URL, credentials included; the error is
		// logged and reported in job/list.
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = redact.URL(ue.URL)
		}
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("callback answered %s", resp.Status)
	}
	return nil
}

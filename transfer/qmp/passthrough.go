package qmp

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
)

// Passthrough is a monitor reached through a manager that owns the QMP
// socket (libvirt's qemu-monitor-command): Command sends one command's
// JSON and returns the reply's JSON; the manager forwards events as raw
// QMP event objects, which the caller hands to Passthrough.Deliver.
type PassthroughTransport interface {
	Command(ctx context.Context, request []byte) (reply []byte, err error)
	Close() error
}

// Passthrough is a Monitor over a PassthroughTransport, with the same
// event log as Client.
type Passthrough struct {
	t   PassthroughTransport
	max int

	mu      sync.Mutex
	events  []Event
	seq     uint64
	changed chan struct{}
}

// NewPassthrough wraps t. Feed the manager's QEMU events to Deliver.
func NewPassthrough(t PassthroughTransport, o Options) *Passthrough {
	if o.EventLog <= 0 {
		o.EventLog = 4096
	}
	return &Passthrough{t: t, max: o.EventLog, changed: make(chan struct{})}
}

// Execute implements Monitor.
func (p *Passthrough) Execute(ctx context.Context, command string, args, out any) error {
	// No "id": the manager matches replies itself, and libvirt refuses a
	// passthrough command that carries one ("Unable to append command
	// 'id' string").
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	raw, err := p.t.Command(ctx, b)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	m, err := decode(raw)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	if m.Error != nil {
		return fmt.Errorf("qmp %s: %w", command, m.Error)
	}
	if out != nil {
		if err := json.Unmarshal(m.Return, out); err != nil {
			return fmt.Errorf("qmp %s: decoding the reply: %w", command, err)
		}
	}
	return nil
}

// Deliver logs one raw QMP event object.
func (p *Passthrough) Deliver(raw []byte) error {
	var ev Event
	if err := json.Unmarshal(raw, &ev); err != nil {
		return fmt.Errorf("qmp: bad event: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seq++
	ev.Seq = p.seq
	p.events = append(p.events, ev)
	if len(p.events) > p.max {
		p.events = append(p.events[:0:0], p.events[len(p.events)-p.max:]...)
	}
	close(p.changed)
	p.changed = make(chan struct{})
	return nil
}

// LastSeq implements Monitor.
func (p *Passthrough) LastSeq() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seq
}

// WaitEvent implements Monitor.
func (p *Passthrough) WaitEvent(ctx context.Context, after uint64, match func(Event) bool) (Event, error) {
	for {
		p.mu.Lock()
		for _, ev := range p.events {
			if ev.Seq > after && match(ev) {
				p.mu.Unlock()
				return ev, nil
			}
		}
		ch := p.changed
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// Close closes the transport.
func (p *Passthrough) Close() error { return p.t.Close() }

package qmp

import (
	"context"
	"encoding/json"
	"fmt"
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
	t      PassthroughTransport
	events *eventLog
}

// NewPassthrough wraps t. Feed the manager's QEMU events to Deliver.
func NewPassthrough(t PassthroughTransport, o Options) *Passthrough {
	return &Passthrough{t: t, events: newEventLog(o.EventLog)}
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
	p.events.add(ev)
	return nil
}

// LastSeq implements Monitor.
func (p *Passthrough) LastSeq() uint64 { return p.events.lastSeq() }

// WaitEvent implements Monitor.
func (p *Passthrough) WaitEvent(ctx context.Context, after uint64, match func(Event) bool) (Event, error) {
	return p.events.wait(ctx, after, match)
}

// Close closes the transport.
func (p *Passthrough) Close() error { return p.t.Close() }

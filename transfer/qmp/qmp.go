// Package qmp is a small client of the QEMU Machine Protocol: one
// connection, commands with an id each and replies matched by id, whole-line
// reads with no line-length cap, and a bounded log of every event received,
// so a waiter that starts late still finds a completion event that arrived
// before it asked.
//
// Two transports: a QMP unix socket (Dial), or any Transport (for example a
// hypervisor manager's monitor passthrough) through NewPassthrough.
package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"
)

// Error is a QMP error reply: {"error":{"class":…,"desc":…}}.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Class + ": " + e.Desc }

// ErrClosed is returned once the connection is gone.
var ErrClosed = errors.New("qmp: connection closed")

// Event is one asynchronous event, numbered in arrival order from 1.
type Event struct {
	Seq   uint64          `json:"-"`
	Name  string          `json:"event"`
	Data  json.RawMessage `json:"data,omitempty"`
	Stamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// Monitor is what callers of QMP need; *Client and the passthrough
// transport implement it.
type Monitor interface {
	// Execute runs one command; out (may be nil) receives "return".
	Execute(ctx context.Context, command string, args, out any) error
	// WaitEvent returns the first event with Seq > after that match
	// accepts, waiting for it if it has not arrived yet.
	WaitEvent(ctx context.Context, after uint64, match func(Event) bool) (Event, error)
	// LastSeq is the Seq of the newest event received so far.
	LastSeq() uint64
	Close() error
}

// message is any line QEMU sends.
type message struct {
	ID     json.RawMessage `json:"id,omitempty"`
	Return json.RawMessage `json:"return,omitempty"`
	Error  *Error          `json:"error,omitempty"`
	Event  string          `json:"event,omitempty"`
	Data   json.RawMessage `json:"data,omitempty"`
	QMP    json.RawMessage `json:"QMP,omitempty"`
}

// decode parses one line QEMU sent. It is the one parser of bytes from
// the monitor (fuzzed).
func decode(line []byte) (message, error) {
	var m message
	line = bytes.TrimSpace(line)
	if len(line) == 0 {
		return m, errors.New("qmp: empty line")
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return m, fmt.Errorf("qmp: bad message: %w", err)
	}
	switch {
	case m.QMP != nil, m.Event != "", m.ID != nil:
		return m, nil
	case m.Return != nil || m.Error != nil:
		return m, nil // a reply without id (to an id-less command)
	}
	return m, fmt.Errorf("qmp: message is neither greeting, reply nor event: %.200s", line)
}

// Options configure a Client.
type Options struct {
	// EventLog is how many events are kept for WaitEvent (default 4096);
	// the oldest are dropped first.
	EventLog int
	Logger   *slog.Logger
}

// Client is one QMP connection. Safe for concurrent use.
type Client struct {
	rwc    io.ReadWriteCloser
	log    *slog.Logger
	events *eventLog

	wmu sync.Mutex // serialises writes

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan message
	err     error // set once the reader stops
	done    chan struct{}

	openedTicks uint64 // boot-time clock, in /proc's ticks, when New began
}

// Dial connects to a QMP unix socket, reads the greeting and negotiates
// capabilities. QEMU serves one client per socket: a second connection
// gets no greeting until the first closes, so ctx bounds the wait.
func Dial(ctx context.Context, path string, o Options) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	c, err := New(ctx, conn, o)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", path, err)
	}
	return c, nil
}

// New runs the protocol over an open connection: greeting, then
// qmp_capabilities.
func New(ctx context.Context, rwc io.ReadWriteCloser, o Options) (*Client, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Client{rwc: rwc, log: o.Logger, events: newEventLog(o.EventLog), pending: map[string]chan message{},
		done: make(chan struct{}), openedTicks: bootTicks()}
	br := bufio.NewReaderSize(rwc, 64<<10)
	greet := make(chan error, 1)
	go func() {
		line, err := br.ReadBytes('\n')
		if err != nil {
			greet <- fmt.Errorf("reading greeting: %w", err)
			return
		}
		m, err := decode(line)
		if err == nil && m.QMP == nil {
			err = fmt.Errorf("first message is not a greeting: %.200s", line)
		}
		greet <- err
	}()
	select {
	case err := <-greet:
		if err != nil {
			rwc.Close()
			return nil, err
		}
	case <-ctx.Done():
		rwc.Close()
		<-greet
		return nil, fmt.Errorf("waiting for the greeting (is another client connected?): %w", ctx.Err())
	}
	go c.read(br)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (c *Client) read(br *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = br.ReadBytes('\n') // no line-length cap
		if len(bytes.TrimSpace(line)) > 0 {
			m, derr := decode(line)
			if derr != nil {
				c.log.Warn("qmp: ignoring a line", "err", derr)
			} else {
				c.dispatch(m, line)
			}
		}
		if err != nil {
			break
		}
	}
	if errors.Is(err, io.EOF) {
		err = ErrClosed
	}
	c.mu.Lock()
	c.err = fmt.Errorf("%w (%v)", ErrClosed, err)
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
	c.events.close(c.err)
	c.mu.Unlock()
	close(c.done)
}

func (c *Client) dispatch(m message, line []byte) {
	if m.Event != "" {
		var ev Event
		if err := json.Unmarshal(line, &ev); err != nil {
			c.log.Warn("qmp: bad event", "err", err)
			return
		}
		c.events.add(ev)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var id string
	if json.Unmarshal(m.ID, &id) != nil {
		c.log.Warn("qmp: reply with an id we never sent", "id", string(m.ID))
		return
	}
	if ch, ok := c.pending[id]; ok {
		ch <- m
		delete(c.pending, id)
	}
}

// Execute sends one command and waits for its reply. A cancelled ctx
// stops the wait, not the command (QMP cannot withdraw one).
func (c *Client) Execute(ctx context.Context, command string, args, out any) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.nextID++
	id := "c" + strconv.FormatUint(c.nextID, 10)
	ch := make(chan message, 1)
	c.pending[id] = ch
	c.mu.Unlock()

	req := map[string]any{"execute": command, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		c.forget(id)
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	c.wmu.Lock()
	_, err = c.rwc.Write(append(b, '\n'))
	c.wmu.Unlock()
	if err != nil { // the connection is unusable from now on
		c.forget(id)
		return fmt.Errorf("qmp %s: %w: %w", command, ErrClosed, err)
	}
	select {
	case m, ok := <-ch:
		if !ok {
			return fmt.Errorf("qmp %s: %w", command, c.closedErr())
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
	case <-ctx.Done():
		c.forget(id)
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	}
}

func (c *Client) forget(id string) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

func (c *Client) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	return ErrClosed
}

// LastSeq is the number of the newest event received.
func (c *Client) LastSeq() uint64 { return c.events.lastSeq() }

// WaitEvent implements Monitor.
func (c *Client) WaitEvent(ctx context.Context, after uint64, match func(Event) bool) (Event, error) {
	return c.events.wait(ctx, after, match)
}

// Events returns the logged events with Seq > after.
func (c *Client) Events(after uint64) []Event { return c.events.since(after) }

// Close drops the connection.
func (c *Client) Close() error {
	err := c.rwc.Close()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
	}
	return err
}

// HMP runs a human-monitor command and returns its text output.
func HMP(ctx context.Context, m Monitor, cmdline string) (string, error) {
	var out string
	err := m.Execute(ctx, "human-monitor-command", map[string]any{"command-line": cmdline}, &out)
	return out, err
}

// Package libvirtqmp reaches the QMP monitor of a libvirt-managed QEMU
// domain through libvirtd: commands go through libvirt's QEMU monitor
// passthrough (virDomainQemuMonitorCommand) and QMP events come from the
// domain QEMU monitor event callbacks, both over libvirtd's unix socket
// with a pure-Go client of libvirt's RPC protocol. The result is a
// qmp.Monitor (qmp.Passthrough), so callers see the same thing as over a
// plain QMP socket.
//
// libvirt multiplexes the monitor: any number of processes may talk to
// one domain at once.
package libvirtqmp

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"imagestore/transfer/qmp"
)

// DefaultSocket is libvirtd's system socket.
const DefaultSocket = "/var/run/libvirt/libvirt-sock"

// DefaultURI is the connection URI of the system QEMU driver.
const DefaultURI = "qemu:///system"

// ErrNoDomain is returned (wrapped) when libvirtd knows no domain of that name.
var ErrNoDomain = errors.New("libvirt: no such domain")

// Options configure Dial.
type Options struct {
	Socket string // libvirtd's unix socket; default DefaultSocket
	URI    string // default DefaultURI
	Domain string // the domain name (on ZStack hosts, the VM uuid)
	// EventLog is passed to qmp.Options.
	EventLog int
	Logger   *slog.Logger
}

// transport is a qmp.PassthroughTransport over one libvirtd connection.
type transport struct {
	l      *libvirt.Libvirt
	dom    libvirt.Domain
	name   string
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
}

// Dial connects to libvirtd, looks the domain up, subscribes to its QMP
// events and returns a monitor. ctx bounds the connection and set-up;
// the monitor lives until Close.
func Dial(ctx context.Context, o Options) (*qmp.Passthrough, error) {
	if o.Domain == "" {
		return nil, errors.New("libvirt: no domain name")
	}
	if o.Socket == "" {
		o.Socket = DefaultSocket
	}
	if o.URI == "" {
		o.URI = DefaultURI
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	timeout := 15 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(o.Socket), dialers.WithLocalTimeout(timeout)))
	if err := call(ctx, l, func() error { return l.ConnectToURI(libvirt.ConnectURI(o.URI)) }); err != nil {
		return nil, fmt.Errorf("libvirt: connecting to %s (%s): %w", o.Socket, o.URI, err)
	}
	var dom libvirt.Domain
	err := call(ctx, l, func() error {
		var err error
		dom, err = l.DomainLookupByName(o.Domain)
		return err
	})
	if err != nil {
		_ = l.Disconnect()
		if libvirt.IsNotFound(err) {
			return nil, fmt.Errorf("libvirt: domain %q: %w", o.Domain, ErrNoDomain)
		}
		return nil, fmt.Errorf("libvirt: looking up domain %q: %w", o.Domain, err)
	}
	ectx, cancel := context.WithCancel(context.Background())
	var events <-chan libvirt.DomainEvent
	err = call(ctx, l, func() error {
		var err error
		events, err = l.SubscribeQEMUEvents(ectx, o.Domain)
		return err
	})
	if err != nil {
		cancel()
		_ = l.Disconnect()
		return nil, fmt.Errorf("libvirt: subscribing to the QEMU events of %q: %w", o.Domain, err)
	}
	t := &transport{l: l, dom: dom, name: o.Domain, cancel: cancel, done: make(chan struct{})}
	p := qmp.NewPassthrough(t, qmp.Options{EventLog: o.EventLog, Logger: o.Logger})
	go func() {
		defer close(t.done)
		for ev := range events {
			raw, err := eventJSON(ev)
			if err == nil {
				err = p.Deliver(raw)
			}
			if err != nil {
				o.Logger.Warn("libvirt: dropping a QMP event", "domain", o.Domain, "event", ev.Event, "err", err)
			}
		}
	}()
	return p, nil
}

// eventJSON rebuilds the QMP event object libvirt split into fields.
func eventJSON(ev libvirt.DomainEvent) ([]byte, error) {
	obj := map[string]any{
		"event":     ev.Event,
		"timestamp": map[string]any{"seconds": ev.Seconds, "microseconds": ev.Microseconds},
	}
	if d := strings.TrimSpace(string(ev.Details)); d != "" {
		if !json.Valid([]byte(d)) {
			return nil, fmt.Errorf("event %s: details are not JSON: %.200q", ev.Event, d)
		}
		obj["data"] = json.RawMessage(d)
	}
	return json.Marshal(obj)
}

// Command implements qmp.PassthroughTransport.
func (t *transport) Command(ctx context.Context, request []byte) ([]byte, error) {
	var reply string
	err := callKeep(ctx, func() error {
		var err error
		// Flags 0: the command is QMP JSON (not HMP).
		reply, err = t.l.QEMUDomainMonitorCommand(t.dom, string(request), 0)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("libvirt: monitor command on %q: %w", t.name, err)
	}
	return []byte(reply), nil
}

// Close ends the event subscription and the libvirtd connection.
func (t *transport) Close() error {
	var err error
	t.once.Do(func() {
		t.cancel()
		err = t.l.Disconnect()
		<-t.done
	})
	return err
}

// call runs f, a blocking libvirt RPC that takes no context; when ctx
// ends first it disconnects (which fails f) and returns ctx's error.
func call(ctx context.Context, l *libvirt.Libvirt, f func() error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	res := make(chan error, 1)
	go func() { res <- f() }()
	select {
	case err := <-res:
		return err
	case <-ctx.Done():
		_ = l.Disconnect()
		<-res
		return ctx.Err()
	}
}

// callKeep is call for a command on a live connection: when ctx ends
// first it returns ctx's error and leaves f to finish on its own (the
// connection serves other callers, and QEMU runs the command anyway).
func callKeep(ctx context.Context, f func() error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	res := make(chan error, 1)
	go func() { res <- f() }()
	select {
	case err := <-res:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// QEMUUser is the user and group libvirt runs the domain's QEMU as: the
// DAC security label of the running domain's XML ("+UID:+GID"), what
// qemu.conf's user/group resolved to.
func QEMUUser(ctx context.Context, o Options) (uid, gid int, err error) {
	if o.Socket == "" {
		o.Socket = DefaultSocket
	}
	if o.URI == "" {
		o.URI = DefaultURI
	}
	timeout := 15 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(o.Socket), dialers.WithLocalTimeout(timeout)))
	if err := call(ctx, l, func() error { return l.ConnectToURI(libvirt.ConnectURI(o.URI)) }); err != nil {
		return 0, 0, fmt.Errorf("libvirt: connecting to %s (%s): %w", o.Socket, o.URI, err)
	}
	defer l.Disconnect()
	var desc string
	err = call(ctx, l, func() error {
		dom, err := l.DomainLookupByName(o.Domain)
		if err != nil {
			return err
		}
		desc, err = l.DomainGetXMLDesc(dom, 0)
		return err
	})
	if err != nil {
		if libvirt.IsNotFound(err) {
			return 0, 0, fmt.Errorf("libvirt: domain %q: %w", o.Domain, ErrNoDomain)
		}
		return 0, 0, fmt.Errorf("libvirt: domain %q: %w", o.Domain, err)
	}
	return dacLabel(desc)
}

// dacLabel reads the DAC seclabel "+UID:+GID" from a domain's XML.
func dacLabel(domainXML string) (uid, gid int, err error) {
	var d struct {
		Seclabels []struct {
			Model string `xml:"model,attr"`
			Label string `xml:"label"`
		} `xml:"seclabel"`
	}
	if err := xml.Unmarshal([]byte(domainXML), &d); err != nil {
		return 0, 0, fmt.Errorf("libvirt: domain XML: %w", err)
	}
	for _, l := range d.Seclabels {
		if l.Model != "dac" {
			continue
		}
		u, g, ok := strings.Cut(strings.TrimSpace(l.Label), ":")
		if !ok {
			break
		}
		ui, uerr := strconv.Atoi(strings.TrimPrefix(u, "+"))
		gi, gerr := strconv.Atoi(strings.TrimPrefix(g, "+"))
		if uerr != nil || gerr != nil || ui < 0 || gi < 0 {
			break
		}
		return ui, gi, nil
	}
	return 0, 0, errors.New("libvirt: the domain XML has no numeric DAC label")
}

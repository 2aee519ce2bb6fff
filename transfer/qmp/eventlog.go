package qmp

import (
	"context"
	"sync"
)

// eventLog keeps the newest events so that a waiter that starts after an
// event arrived still finds it (QEMU sends a job's completion once). Client
// and Passthrough share it.
type eventLog struct {
	max int

	mu      sync.Mutex
	events  []Event
	seq     uint64
	changed chan struct{} // closed and replaced on every event and at close
	err     error         // set once no more events can come
}

func newEventLog(max int) *eventLog {
	if max <= 0 {
		max = 4096
	}
	return &eventLog{max: max, changed: make(chan struct{})}
}

// add numbers ev and keeps it, dropping the oldest beyond max.
func (l *eventLog) add(ev Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	ev.Seq = l.seq
	l.events = append(l.events, ev)
	if len(l.events) > l.max {
		l.events = append(l.events[:0:0], l.events[len(l.events)-l.max:]...)
	}
	l.wake()
}

// close makes waiters that find no match return err.
func (l *eventLog) close(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.err = err
	l.wake()
}

func (l *eventLog) wake() {
	close(l.changed)
	l.changed = make(chan struct{})
}

func (l *eventLog) lastSeq() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq
}

// since returns the kept events with Seq > after.
func (l *eventLog) since(after uint64) []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Event
	for _, ev := range l.events {
		if ev.Seq > after {
			out = append(out, ev)
		}
	}
	return out
}

// wait returns the first kept event with Seq > after that match accepts,
// waiting for new ones until ctx ends or the log is closed.
func (l *eventLog) wait(ctx context.Context, after uint64, match func(Event) bool) (Event, error) {
	for {
		l.mu.Lock()
		for _, ev := range l.events {
			if ev.Seq > after && match(ev) {
				l.mu.Unlock()
				return ev, nil
			}
		}
		if n := len(l.events); n > 0 {
			after = max(after, l.events[n-1].Seq)
		}
		ch, err := l.changed, l.err
		l.mu.Unlock()
		if err != nil {
			return Event{}, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

package oci

import (
	"errors"
	"io"
	"sync"
)

// handoff is the body of a produced PATCH: a pipe whose writer hands its
// slice to the reader instead of copying it into a buffer. The HTTP
// transport copies a request body with WriteTo, which writes each piece
// to the connection straight from the producer's buffer; the producer's
// Write returns once the piece was written (or the body closed), so the
// slice is the producer's again. Read serves a transport that reads
// instead (copying, like io.Pipe).
//
// One producer goroutine writes and then calls CloseWrite; one consumer
// reads (Read or WriteTo); Close may come from any goroutine.
type handoff struct {
	pieces chan []byte   // the producer's pieces; closed by CloseWrite
	taken  chan int      // per piece the consumer took: how much of it went out
	done   chan struct{} // closed by Close
	once   sync.Once
	werr   error // CloseWrite's error (io.EOF for none), set before pieces closes

	mu     sync.Mutex
	cur    []byte // Read's piece in progress ...
	took   int    // ... and how much of it was read
	closed bool
}

func newHandoff() *handoff {
	return &handoff{pieces: make(chan []byte), taken: make(chan int, 1), done: make(chan struct{})}
}

// Write hands p to the consumer and waits until it went out.
func (h *handoff) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	select {
	case h.pieces <- p:
	case <-h.done:
		return 0, errBodyStopped
	}
	// A piece the consumer took is always answered: by WriteTo after its
	// write, by Read when it was read whole, by Close otherwise.
	if n := <-h.taken; n < len(p) {
		return n, errBodyStopped
	}
	return len(p), nil
}

// CloseWrite ends the body after the pieces written: with io.EOF when err
// is nil, else with err.
func (h *handoff) CloseWrite(err error) {
	if err == nil {
		err = io.EOF
	}
	h.werr = err
	close(h.pieces)
}

// Close ends the body from the consumer's side: a Write waiting or to come
// fails with errBodyStopped.
func (h *handoff) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.once.Do(func() { close(h.done) })
	h.closed = true
	if h.cur != nil {
		h.taken <- h.took
		h.cur = nil
	}
	return nil
}

// next waits for the producer's next piece; ok is false at the end, with
// the error to return.
func (h *handoff) next() ([]byte, bool, error) {
	select {
	case p, open := <-h.pieces:
		if !open {
			return nil, false, h.werr
		}
		return p, true, nil
	case <-h.done:
		return nil, false, errBodyStopped
	}
}

// Read implements io.Reader.
func (h *handoff) Read(b []byte) (int, error) {
	h.mu.Lock()
	if h.cur == nil {
		h.mu.Unlock()
		p, ok, err := h.next()
		if !ok {
			return 0, err
		}
		h.mu.Lock()
		if h.closed {
			h.mu.Unlock()
			h.taken <- 0
			return 0, errBodyStopped
		}
		h.cur, h.took = p, 0
	}
	defer h.mu.Unlock()
	n := copy(b, h.cur[h.took:])
	h.took += n
	if h.took == len(h.cur) {
		h.taken <- h.took
		h.cur = nil
	}
	return n, nil
}

// WriteTo writes every piece to w as it comes, from the producer's slice.
func (h *handoff) WriteTo(w io.Writer) (int64, error) {
	var n int64
	h.mu.Lock()
	if h.cur != nil { // the rest of a piece Read began
		k, err := w.Write(h.cur[h.took:])
		n += int64(k)
		h.took += k
		h.taken <- h.took
		h.cur = nil
		if err != nil {
			h.mu.Unlock()
			return n, err
		}
	}
	h.mu.Unlock()
	for {
		p, ok, err := h.next()
		if !ok {
			if errors.Is(err, io.EOF) {
				return n, nil
			}
			return n, err
		}
		k, err := w.Write(p)
		n += int64(k)
		h.taken <- k
		if err != nil {
			return n, err
		}
	}
}

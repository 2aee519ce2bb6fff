package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"
)

// errStalled: a GET delivered no byte for Options.ReadStall. It is not a
// context error, so the retry loop takes it as transient.
var errStalled = errors.New("s3store: the read stalled")

// stallGuard cancels one attempt of a read when it makes no progress for
// a while: no response, or a body that stops while its connection stays
// up (the server or a middlebox hung). Without it such a read would wait
// until its context ends, which for an open Blob is when it is closed,
// and for a readahead stream never. Every GET of a blob's bytes runs under
// one: ranged reads (getRange), long-range streams and readahead streams
// (openRange).
type stallGuard struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer
	d      time.Duration
}

func newStallGuard(ctx context.Context, d time.Duration) *stallGuard {
	g := &stallGuard{d: d}
	g.ctx, g.cancel = context.WithCancelCause(ctx)
	g.timer = time.AfterFunc(d, func() { g.cancel(errStalled) })
	return g
}

// reader guards each Read of r: the Read must deliver within the stall
// time. The watchdog runs only while a Read waits, so a reader that
// pauses between Reads (a readahead stream that is far enough ahead, a
// stream whose client is slow) is not taken for a stalled server.
func (g *stallGuard) reader(r io.Reader) io.Reader { return stallReader{g, r} }

type stallReader struct {
	g *stallGuard
	r io.Reader
}

func (s stallReader) Read(p []byte) (int, error) {
	s.g.timer.Reset(s.g.d)
	n, err := s.r.Read(p)
	s.g.timer.Stop()
	return n, s.g.err(err)
}

// err turns the cancellation the guard caused into errStalled (transient);
// any other error, the parent context's end included, is returned as is.
func (g *stallGuard) err(err error) error {
	if err != nil && errors.Is(context.Cause(g.ctx), errStalled) {
		return fmt.Errorf("%w: no byte for %s", errStalled, g.d)
	}
	return err
}

func (g *stallGuard) stop() {
	g.timer.Stop()
	g.cancel(nil)
}

package registry

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// stallGuard is an upload's request body whose every Read must see a byte
// within idle: it pushes the connection's read deadline ahead as the body
// arrives, so a client that stops sending mid-body (alive, or gone without
// a FIN) fails the request instead of holding the upload busy for good.
type stallGuard struct {
	r      io.ReadCloser
	rc     *http.ResponseController
	idle   time.Duration
	pushed time.Time // when the deadline was last moved
	off    bool      // the connection takes no deadline
}

// guardBody replaces r.Body with a stallGuard; the returned func clears
// the deadline once the body is done with.
func (s *Server) guardBody(w http.ResponseWriter, r *http.Request) (done func()) {
	g := &stallGuard{r: r.Body, rc: http.NewResponseController(w), idle: s.o.BodyReadIdle}
	r.Body = g
	return g.clear
}

func (g *stallGuard) Read(p []byte) (int, error) {
	// Moving the deadline costs a timer update: do it only when an eighth
	// of idle has passed, so a stall fails after 7/8 to all of idle.
	if now := time.Now(); !g.off && now.Sub(g.pushed) > g.idle/8 {
		if err := g.rc.SetReadDeadline(now.Add(g.idle)); err != nil {
			g.off = true
		} else {
			g.pushed = now
		}
	}
	n, err := g.r.Read(p)
	if err != nil {
		// The body is over: the request's work after it (a commit) must
		// not be cut by the deadline through the server's background read.
		g.clear()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("the upload's body delivered no byte for %s: %w", g.idle, err)
		}
	}
	return n, err
}

func (g *stallGuard) clear() {
	if !g.off && !g.pushed.IsZero() {
		_ = g.rc.SetReadDeadline(time.Time{})
		g.pushed = time.Time{}
	}
}

func (g *stallGuard) Close() error { return g.r.Close() }

package agent

import (
	"context"
	"time"
)

// nbdState holds the agent's NBD servers (routes_nbd.go). Its methods are
// nil-safe so an agent built without it keeps working.
type nbdState struct{}

func newNBDState(a *Agent) *nbdState { return &nbdState{} }

// expire stops target groups past their expiry.
func (s *nbdState) expire(ctx context.Context, now time.Time) {}

// close stops every server the agent runs.
func (s *nbdState) close() {}

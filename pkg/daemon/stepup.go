package daemon

import (
	"context"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/stepup"
)

// stepupKeep is how long decided step-up requests stay listed.
const stepupKeep = time.Hour

// RequestStepup asks for an extra right for the agent in slot (see stepup.Service.Request).
func (d *Daemon) RequestStepup(ctx context.Context, slot dataplane.Slot, action, resource, reason string) (stepup.Request, error) {
	return d.stepups.Request(ctx, slot, action, resource, reason)
}

// Stepups lists the requests (of one agent when slot is set).
func (d *Daemon) Stepups(slot *dataplane.Slot) []stepup.Request { return d.stepups.List(slot) }

// ApproveStepup approves pending request id once (see stepup.Service.Approve).
func (d *Daemon) ApproveStepup(id, by string, uses int64, ttl time.Duration) (stepup.Request, error) {
	return d.stepups.Approve(id, by, uses, ttl)
}

// DenyStepup settles pending request id as denied.
func (d *Daemon) DenyStepup(id, by, why string) (stepup.Request, error) {
	return d.stepups.Deny(id, by, why)
}

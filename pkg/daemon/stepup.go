package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/pkg/stepup"
)

// stepupKeep is how long decided step-up requests stay listed.
const stepupKeep = time.Hour

// stepupAnswer asks the policy in force (data.tether.stepup) whether the agent in slot may do
// action on resource: a step-up request, or a handoff.
func (d *Daemon) stepupAnswer(ctx context.Context, slot dataplane.Slot, action, resource, reason string) (stepup.Answer, error) {
	rev := d.pol.engine.Current()
	c, ok := d.registry.ContextOf(slot)
	if rev == nil || !ok {
		return stepup.Answer{}, errors.New("no policy revision is in force")
	}
	in := d.input(c)
	in.Request = &policy.Request{Action: action, Resource: resource, Reason: reason}
	dec, err := rev.Stepup(ctx, in)
	if err != nil {
		return stepup.Answer{}, fmt.Errorf("asking the policy: %w", err)
	}
	ttl, _ := time.ParseDuration(dec.TTL) // checked by the policy package
	return stepup.Answer{Allowed: dec.Allowed, NeedsApproval: dec.NeedsApproval, TTL: ttl, Reason: dec.Reason}, nil
}

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

package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/pkg/stepup"
)

// How long a pending request waits for an approver, and how long decided ones stay listed.
const (
	stepupDeadline = 15 * time.Minute
	stepupKeep     = time.Hour
)

// RequestStepup asks the stepup policy for an extra right for the agent in slot (the caller's
// own agent: the API found it from the caller's cgroup). Allowed outright, it becomes an
// approval at once; needing a human, it waits in the store for an admin; refused, the error says
// why. Only what the kernel can enforce may be asked: connect to a resource.
func (d *Daemon) RequestStepup(ctx context.Context, slot dataplane.Slot, action, resource, reason string) (stepup.Request, error) {
	if action != "connect" {
		return stepup.Request{}, fmt.Errorf("%w: action %q: the kernel enforces approvals of connect only", agents.ErrInvalid, action)
	}
	if resource == "" || len(resource) > 256 || len(reason) > 1024 {
		return stepup.Request{}, fmt.Errorf("%w: want a resource of 1-256 bytes and a reason of at most 1024", agents.ErrInvalid)
	}
	a, ok := d.registry.Get(slot)
	if !ok {
		return stepup.Request{}, fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	if a.Task == nil {
		return stepup.Request{}, fmt.Errorf("%w: agent %d has no task to ask a step-up for", agents.ErrTask, slot)
	}
	rev := d.pol.engine.Current()
	c, ok := d.registry.ContextOf(slot)
	if rev == nil || !ok {
		return stepup.Request{}, errors.New("no policy revision is in force")
	}
	in := d.input(c)
	in.Request = &policy.Request{Action: action, Resource: resource, Reason: reason}
	dec, err := rev.Stepup(ctx, in)
	if err != nil {
		return stepup.Request{}, fmt.Errorf("asking the policy: %w", err)
	}
	ttl, _ := time.ParseDuration(dec.TTL)
	if ttl <= 0 {
		ttl = 15 * time.Minute
	}
	req := stepup.Request{Slot: slot, SpiffeID: a.SpiffeID, TaskID: a.Task.ID, Action: action, Resource: resource,
		Reason: reason, Deadline: time.Now().Add(stepupDeadline), TTL: ttl}
	switch {
	case !dec.Allowed:
		d.recordStepup(req, "refused", "policy", dec.Reason)
		return req, fmt.Errorf("%w: the policy refuses %s %s for %s: %s", stepup.ErrRefused, action, resource, a.SpiffeID, dec.Reason)
	case !dec.NeedsApproval:
		if req, err = d.stepups.Add(req); err != nil {
			return req, fmt.Errorf("%w: %v", agents.ErrTask, err)
		}
		return d.stepups.Decide(req.ID, func(r stepup.Request) (stepup.Request, error) {
			return d.approve(r, "policy", 0, ttl)
		})
	}
	if req, err = d.stepups.Add(req); err != nil {
		return req, fmt.Errorf("%w: %v", agents.ErrTask, err)
	}
	d.log.Warn("step-up requested", "request", req.ID, "slot", slot, "spiffe_id", a.SpiffeID, "task", a.Task.ID, "action", action, "resource", resource, "reason", reason)
	d.recordStepup(req, stepup.Pending, "", dec.Reason)
	return req, nil
}

// Stepups lists the requests (of one agent when slot is set).
func (d *Daemon) Stepups(slot *dataplane.Slot) []stepup.Request { return d.stepups.List(slot) }

// ApproveStepup approves pending request id once: its agent's task gets an approval for uses
// connects (0: until it expires) for ttl (0: what the policy said), which the kernel counts.
func (d *Daemon) ApproveStepup(id, by string, uses int64, ttl time.Duration) (stepup.Request, error) {
	return d.stepups.Decide(id, func(r stepup.Request) (stepup.Request, error) {
		if ttl == 0 {
			ttl = r.TTL
		}
		return d.approve(r, by, uses, ttl)
	})
}

// DenyStepup settles pending request id as denied.
func (d *Daemon) DenyStepup(id, by, why string) (stepup.Request, error) {
	return d.stepups.Decide(id, func(r stepup.Request) (stepup.Request, error) {
		r.State, r.DecidedBy, r.Why = stepup.Denied, by, why
		d.log.Info("step-up denied", "request", r.ID, "slot", r.Slot, "by", by, "why", why)
		d.recordStepup(r, stepup.Denied, by, why)
		return r, nil
	})
}

// approve turns request r into an approval on its agent's task, if the agent still runs the
// task the request was made for.
func (d *Daemon) approve(r stepup.Request, by string, uses int64, ttl time.Duration) (stepup.Request, error) {
	a, ok := d.registry.Get(r.Slot)
	if !ok || a.SpiffeID != r.SpiffeID || a.Task == nil || a.Task.ID != r.TaskID {
		return r, fmt.Errorf("%w: request %s was made by %s for task %s, which has ended", agents.ErrTask, r.ID, r.SpiffeID, r.TaskID)
	}
	before := len(a.Task.Approvals)
	a, err := d.registry.AddApproval(r.Slot, r.Action, r.Resource, by, ttl, uses)
	if err != nil {
		return r, err
	}
	if a.Task != nil && len(a.Task.Approvals) > before {
		r.ApprovalID = a.Task.Approvals[len(a.Task.Approvals)-1].ID
	}
	r.State, r.DecidedBy, r.Uses = stepup.Approved, by, uses
	d.log.Info("step-up approved", "request", r.ID, "slot", r.Slot, "spiffe_id", r.SpiffeID, "approval", r.ApprovalID, "uses", uses, "ttl", ttl, "by", by)
	d.recordStepup(r, stepup.Approved, by, "")
	return r, nil
}

// recordStepup puts a step of a request in the decision log (and so on the stream and, when
// pending, to the escalation webhook).
func (d *Daemon) recordStepup(r stepup.Request, state, by, why string) {
	if d.pump == nil {
		return
	}
	a := events.Agent{SpiffeID: r.SpiffeID, Slot: r.Slot, TaskID: r.TaskID}
	d.pump.Emit(events.StepupRecord(a, state, why, events.Stepup{RequestID: r.ID, Action: r.Action, Resource: r.Resource, Reason: r.Reason,
		DecidedBy: by, ApprovalID: r.ApprovalID, Uses: r.Uses}))
}

package agents

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/identity"
)

// TaskSpec asks to start a task.
type TaskSpec struct {
	ID          string        // empty: one is made up
	Type        string        // coding, incident-response, ...
	Sensitivity string        // public, internal, confidential, restricted
	TTL         time.Duration // the task expires unless renewed
}

// MaxApprovalUses bounds an approval's use count.
const MaxApprovalUses = 1_000_000

// MaxTaskTTL bounds a task's (and an approval's) lifetime between renewals.
const MaxTaskTTL = 24 * time.Hour

var token = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$`)

func (r *Registry) newTask(s TaskSpec) (*Task, error) {
	if !token.MatchString(s.Type) {
		return nil, fmt.Errorf("%w: task type %q: want 1-128 letters, digits and ._:/-", ErrInvalid, s.Type)
	}
	if s.Sensitivity != "" && !token.MatchString(s.Sensitivity) {
		return nil, fmt.Errorf("%w: sensitivity %q: want 1-128 letters, digits and ._:/-", ErrInvalid, s.Sensitivity)
	}
	if s.TTL <= 0 || s.TTL > MaxTaskTTL {
		return nil, fmt.Errorf("%w: task ttl %s: want more than 0 and at most %s", ErrInvalid, s.TTL, MaxTaskTTL)
	}
	id := s.ID
	if id == "" {
		id = "task-" + randomSuffix()
	} else if !token.MatchString(id) {
		return nil, fmt.Errorf("%w: task id %q: want 1-128 letters, digits and ._:/-", ErrInvalid, id)
	}
	now := r.opts.Now()
	return &Task{TaskInfo: TaskInfo{ID: id, Type: s.Type, Sensitivity: s.Sensitivity, StartedAt: now, ExpiresAt: now.Add(s.TTL)}}, nil
}

// ErrTask is returned for a task verb that does not fit the agent's task.
var ErrTask = errors.New("task")

// ErrInvalid is returned for a request that is not well formed.
var ErrInvalid = errors.New("invalid request")

// StartTask gives the agent a task and evaluates its grants for it.
func (r *Registry) StartTask(slot dataplane.Slot, s TaskSpec) (Agent, error) {
	t, err := r.newTask(s)
	if err != nil {
		return Agent{}, err
	}
	return r.change(slot, func(a *agent) error {
		if a.ctx.Task != nil {
			return fmt.Errorf("%w: agent %d already has task %s: end it first", ErrTask, slot, a.ctx.Task.ID)
		}
		a.ctx.Task = t
		r.log.Info("task started", "slot", slot, "spiffe_id", a.info.SpiffeID, "task", t.ID, "type", t.Type, "sensitivity", t.Sensitivity, "expires", t.ExpiresAt)
		return nil
	})
}

// RenewTask moves the task's expiry to ttl from now, but never past its NotAfter.
func (r *Registry) RenewTask(slot dataplane.Slot, ttl time.Duration) (Agent, error) {
	if ttl <= 0 || ttl > MaxTaskTTL {
		return Agent{}, fmt.Errorf("%w: task ttl %s: want more than 0 and at most %s", ErrInvalid, ttl, MaxTaskTTL)
	}
	return r.change(slot, func(a *agent) error {
		t := a.ctx.Task
		if t == nil {
			return fmt.Errorf("%w: agent %d has no task", ErrTask, slot)
		}
		now := r.opts.Now()
		r.bound(a, a.grants)
		if !t.NotAfter.After(now) {
			return fmt.Errorf("%w: task %s of agent %d cannot be renewed past %s (its grants' max_lifetime, or the expiry of the task it was handed from): start a new task",
				ErrTask, t.ID, slot, t.NotAfter.Format(time.RFC3339))
		}
		t.ExpiresAt = minTime(now.Add(ttl), t.NotAfter)
		r.log.Info("task renewed", "slot", slot, "task", t.ID, "expires", t.ExpiresAt, "not_after", t.NotAfter)
		return nil
	})
}

// EndTask ends the agent's task; its grants are evaluated without it.
func (r *Registry) EndTask(slot dataplane.Slot) (Agent, error) {
	return r.change(slot, func(a *agent) error {
		if a.ctx.Task == nil {
			return fmt.Errorf("%w: agent %d has no task", ErrTask, slot)
		}
		r.log.Info("task ended", "slot", slot, "spiffe_id", a.info.SpiffeID, "task", a.ctx.Task.ID)
		r.dropTask(a, "task ended")
		return nil
	})
}

// AddApproval records an approved step-up on the agent's task; it expires after ttl (and with
// the task).
func (r *Registry) AddApproval(slot dataplane.Slot, action, resource, approvedBy string, ttl time.Duration, uses int64) (Agent, error) {
	if !token.MatchString(action) || resource == "" || len(resource) > 256 {
		return Agent{}, fmt.Errorf("%w: approval: want an action (letters, digits, ._:/-) and a resource of 1-256 bytes", ErrInvalid)
	}
	if ttl <= 0 || ttl > MaxTaskTTL {
		return Agent{}, fmt.Errorf("%w: approval ttl %s: want more than 0 and at most %s", ErrInvalid, ttl, MaxTaskTTL)
	}
	if uses < 0 || uses > MaxApprovalUses {
		return Agent{}, fmt.Errorf("%w: approval uses %d: want 0 (until it expires) to %d", ErrInvalid, uses, MaxApprovalUses)
	}
	return r.change(slot, func(a *agent) error {
		t := a.ctx.Task
		if t == nil {
			return fmt.Errorf("%w: agent %d has no task to approve anything for", ErrTask, slot)
		}
		expires := r.opts.Now().Add(ttl)
		if t.ExpiresAt.Before(expires) {
			expires = t.ExpiresAt
		}
		grant, err := r.openGrant(uses, expires)
		if err != nil {
			return err
		}
		ap := Approval{ApprovalInfo: ApprovalInfo{ID: "approval-" + randomSuffix(), Action: action, Resource: resource, ExpiresAt: expires, ApprovedBy: approvedBy}, Uses: uses, Grant: grant}
		t.Approvals = append(slices.Clone(t.Approvals), ap)
		r.log.Info("approval added", "slot", slot, "task", t.ID, "approval", ap.ID, "action", action, "resource", resource, "by", approvedBy, "expires", ap.ExpiresAt, "uses", uses, "grant", grant)
		return nil
	})
}

// SetIdentity gives the agent a new SPIFFE ID (its identity was rotated) and evaluates its
// grants for it.
func (r *Registry) SetIdentity(slot dataplane.Slot, spiffeID string) (Agent, error) {
	id, err := identity.Parse(spiffeID)
	if err != nil {
		return Agent{}, err
	}
	return r.change(slot, func(a *agent) error {
		r.log.Info("agent identity changed", "slot", slot, "from", a.info.SpiffeID, "to", id)
		a.ctx.SpiffeID, a.info.SpiffeID, a.ctx.Revoked = id, id, false
		if r.opts.Denied != nil && r.opts.Denied(id) {
			a.flags |= dataplane.AgentKilled
		}
		return nil
	})
}

// Revoke withdraws the agent's identity: it is granted nothing until it gets one again, and its
// task ends.
func (r *Registry) Revoke(slot dataplane.Slot) (Agent, error) {
	return r.change(slot, func(a *agent) error {
		r.log.Warn("agent identity revoked", "slot", slot, "spiffe_id", a.info.SpiffeID)
		a.ctx.Revoked = true
		// The task and its credentials go with the identity: a new one starts once the agent has
		// an identity again.
		r.dropTask(a, "identity revoked")
		return nil
	})
}

// HandoffSpec asks to hand an agent's task (or a part of it) to another agent.
type HandoffSpec struct {
	Type string        // the receiver's task type; empty: the sender's
	TTL  time.Duration // at most until the sender's task ends
}

// Handoff gives agent to a task derived from agent from's: the sender's sensitivity, an expiry
// no later than the sender's, and grants that are at most what the sender has now (whatever the
// policy gives the receiver for the task is attenuated to them). The receiver must have no task.
// Whether the policy allows the handoff is the caller's to ask first.
func (r *Registry) Handoff(from, to dataplane.Slot, s HandoffSpec) (Agent, error) {
	if from == to {
		return Agent{}, fmt.Errorf("%w: an agent cannot hand a task to itself", ErrInvalid)
	}
	if s.TTL <= 0 || s.TTL > MaxTaskTTL {
		return Agent{}, fmt.Errorf("%w: handoff ttl %s: want more than 0 and at most %s", ErrInvalid, s.TTL, MaxTaskTTL)
	}
	if s.Type != "" && !token.MatchString(s.Type) {
		return Agent{}, fmt.Errorf("%w: task type %q: want 1-128 letters, digits and ._:/-", ErrInvalid, s.Type)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	sender, ok := r.live(from)
	if !ok {
		return Agent{}, fmt.Errorf("%w: slot %d (sender)", ErrNotFound, from)
	}
	receiver, ok := r.live(to)
	if !ok {
		return Agent{}, fmt.Errorf("%w: slot %d (receiver)", ErrNotFound, to)
	}
	st := sender.ctx.Task
	switch {
	case st == nil:
		return Agent{}, fmt.Errorf("%w: agent %d has no task to hand over", ErrTask, from)
	case sender.ctx.Revoked:
		return Agent{}, fmt.Errorf("%w: agent %d has lost its identity", ErrTask, from)
	case receiver.ctx.Task != nil:
		return Agent{}, fmt.Errorf("%w: agent %d already has task %s: end it first", ErrTask, to, receiver.ctx.Task.ID)
	}
	now := r.opts.Now()
	expires := now.Add(s.TTL)
	if st.ExpiresAt.Before(expires) {
		expires = st.ExpiresAt
	}
	typ := s.Type
	if typ == "" {
		typ = st.Type
	}
	id := st.ID + "/handoff-" + randomSuffix()
	if len(id) > 128 {
		id = "handoff-" + randomSuffix()
	}
	ceiling := sender.grants // what the sender has now (itself attenuated if it was handed its task)
	receiver.ctx.Task = &Task{TaskInfo: TaskInfo{ID: id, Type: typ, Sensitivity: st.Sensitivity, StartedAt: now, ExpiresAt: expires}, HandoffFrom: sender.info.SpiffeID,
		fromSlot: from, fromTask: st.ID, senderExpires: st.ExpiresAt}
	receiver.ceiling = &ceiling
	r.log.Info("task handed over", "from_slot", from, "from", sender.info.SpiffeID, "from_task", st.ID,
		"to_slot", to, "to", receiver.info.SpiffeID, "task", id, "type", typ, "expires", expires)
	err := r.evaluate(context.Background(), receiver)
	return r.view(receiver), err
}

// bound sets the task's NotAfter: g's max_lifetime after it started and, for a handed-over
// task, no later than the sender's task expires (as long as the sender holds it; after that,
// when it expired when last seen). The expiry is kept within it. Call with r.mu held.
func (r *Registry) bound(a *agent, g grants.Grants) {
	t := a.ctx.Task
	life, _ := g.Lifetime() // an unknown one is refused when compiled, and is one minute
	t.NotAfter = t.StartedAt.Add(life)
	if t.fromTask != "" {
		if s, ok := r.live(t.fromSlot); ok && s.ctx.Task != nil && s.ctx.Task.ID == t.fromTask {
			t.senderExpires = s.ctx.Task.ExpiresAt
		}
		t.NotAfter = minTime(t.NotAfter, t.senderExpires)
	}
	t.ExpiresAt = minTime(t.ExpiresAt, t.NotAfter)
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

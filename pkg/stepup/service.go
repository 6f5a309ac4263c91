package stepup

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// How long a pending request waits for an approver, and the approval's lifetime when the policy
// names none.
const (
	Deadline   = 15 * time.Minute
	DefaultTTL = 15 * time.Minute
)

// Answer is the policy's answer to a request for an extra right.
type Answer struct {
	Allowed       bool
	NeedsApproval bool
	TTL           time.Duration // of the approval; 0: DefaultTTL
	Reason        string
}

// Decider asks the policy (data.tether.stepup) whether the agent in slot may do action on
// resource, for reason.
type Decider func(ctx context.Context, slot dataplane.Slot, action, resource, reason string) (Answer, error)

// Registry is what the service needs of the agents' registry.
type Registry interface {
	Get(slot dataplane.Slot) (agents.Agent, bool)
	AddApproval(slot dataplane.Slot, action, resource, approvedBy string, ttl time.Duration, uses int64) (agents.Agent, error)
}

// Service takes the agents' step-up requests: the policy allows one outright (an approval at
// once), refuses it, or has it wait for an admin, who approves it once or denies it. An approval
// is a counted grant on the agent's task. Every step is a decision record.
type Service struct {
	*Store
	reg    Registry
	decide Decider
	emit   func(events.Decision) // nil: no records
	log    *slog.Logger
}

// NewService returns the step-up service over store.
func NewService(store *Store, reg Registry, decide Decider, emit func(events.Decision), log *slog.Logger) *Service {
	return &Service{Store: store, reg: reg, decide: decide, emit: emit, log: log}
}

// Request asks the policy for an extra right for the agent in slot (the caller's own agent: the
// API found it from the caller's cgroup). Allowed outright, it becomes an approval at once;
// needing a human, it waits for an admin; refused, the error says why. Only what the kernel can
// enforce may be asked: connect to a resource.
func (s *Service) Request(ctx context.Context, slot dataplane.Slot, action, resource, reason string) (Request, error) {
	if action != "connect" {
		return Request{}, fmt.Errorf("%w: action %q: the kernel enforces approvals of connect only", agents.ErrInvalid, action)
	}
	if resource == "" || len(resource) > 256 || len(reason) > 1024 {
		return Request{}, fmt.Errorf("%w: want a resource of 1-256 bytes and a reason of at most 1024", agents.ErrInvalid)
	}
	a, ok := s.reg.Get(slot)
	if !ok {
		return Request{}, fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	if a.Task == nil {
		return Request{}, fmt.Errorf("%w: agent %d has no task to ask a step-up for", agents.ErrTask, slot)
	}
	ans, err := s.decide(ctx, slot, action, resource, reason)
	if err != nil {
		return Request{}, err
	}
	ttl := ans.TTL
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	req := Request{Slot: slot, SpiffeID: a.SpiffeID, TaskID: a.Task.ID, Action: action, Resource: resource,
		Reason: reason, Deadline: time.Now().Add(Deadline), TTL: ttl}
	switch {
	case !ans.Allowed:
		s.record(req, "refused", "policy", ans.Reason)
		return req, fmt.Errorf("%w: the policy refuses %s %s for %s: %s", ErrRefused, action, resource, a.SpiffeID, ans.Reason)
	case !ans.NeedsApproval:
		if req, err = s.Add(req); err != nil {
			return req, fmt.Errorf("%w: %v", agents.ErrTask, err)
		}
		return s.Decide(req.ID, func(r Request) (Request, error) { return s.approve(r, "policy", 0, ttl) })
	}
	if req, err = s.Add(req); err != nil {
		return req, fmt.Errorf("%w: %v", agents.ErrTask, err)
	}
	s.log.Warn("step-up requested", "request", req.ID, "slot", slot, "spiffe_id", a.SpiffeID, "task", a.Task.ID, "action", action, "resource", resource, "reason", reason)
	s.record(req, Pending, "", ans.Reason)
	return req, nil
}

// Approve approves pending request id once: its agent's task gets an approval for uses connects
// (0: until it expires) for ttl (0: what the policy said), which the kernel counts.
func (s *Service) Approve(id, by string, uses int64, ttl time.Duration) (Request, error) {
	return s.Decide(id, func(r Request) (Request, error) {
		if ttl == 0 {
			ttl = r.TTL
		}
		return s.approve(r, by, uses, ttl)
	})
}

// Deny settles pending request id as denied.
func (s *Service) Deny(id, by, why string) (Request, error) {
	return s.Decide(id, func(r Request) (Request, error) {
		r.State, r.DecidedBy, r.Why = Denied, by, why
		s.log.Info("step-up denied", "request", r.ID, "slot", r.Slot, "by", by, "why", why)
		s.record(r, Denied, by, why)
		return r, nil
	})
}

// approve turns request r into an approval on its agent's task, if the agent still runs the
// task the request was made for.
func (s *Service) approve(r Request, by string, uses int64, ttl time.Duration) (Request, error) {
	a, ok := s.reg.Get(r.Slot)
	if !ok || a.SpiffeID != r.SpiffeID || a.Task == nil || a.Task.ID != r.TaskID {
		return r, fmt.Errorf("%w: request %s was made by %s for task %s, which has ended", agents.ErrTask, r.ID, r.SpiffeID, r.TaskID)
	}
	before := len(a.Task.Approvals)
	a, err := s.reg.AddApproval(r.Slot, r.Action, r.Resource, by, ttl, uses)
	if err != nil {
		return r, err
	}
	if a.Task != nil && len(a.Task.Approvals) > before {
		r.ApprovalID = a.Task.Approvals[len(a.Task.Approvals)-1].ID
	}
	r.State, r.DecidedBy, r.Uses = Approved, by, uses
	s.log.Info("step-up approved", "request", r.ID, "slot", r.Slot, "spiffe_id", r.SpiffeID, "approval", r.ApprovalID, "uses", uses, "ttl", ttl, "by", by)
	s.record(r, Approved, by, "")
	return r, nil
}

// record puts a step of a request in the decision log (and so on the stream and, when pending,
// to the escalation webhook).
func (s *Service) record(r Request, state, by, why string) {
	if s.emit == nil {
		return
	}
	a := events.Agent{SpiffeID: r.SpiffeID, Slot: r.Slot, TaskID: r.TaskID}
	s.emit(events.StepupRecord(a, state, why, events.Stepup{RequestID: r.ID, Action: r.Action, Resource: r.Resource, Reason: r.Reason,
		DecidedBy: by, ApprovalID: r.ApprovalID, Uses: r.Uses}))
}

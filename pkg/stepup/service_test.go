package stepup

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

type fakeRegistry struct {
	a         agents.Agent
	approvals []string
}

func (f *fakeRegistry) Get(slot dataplane.Slot) (agents.Agent, bool) { return f.a, slot == f.a.Slot }

func (f *fakeRegistry) AddApproval(slot dataplane.Slot, action, resource, by string, ttl time.Duration, uses int64) (agents.Agent, error) {
	f.approvals = append(f.approvals, action+" "+resource+" by "+by)
	t := *f.a.Task
	t.Approvals = append(t.Approvals, agents.Approval{ApprovalInfo: agents.ApprovalInfo{ID: "ap-" + resource}})
	f.a.Task = &t
	return f.a, nil
}

// TestServiceFollowsThePolicy: a request the policy refuses is refused and recorded; one it
// allows outright is an approval at once; one that needs a human waits until an admin approves
// it, and an approval for a task that has ended is refused. Every step is a record.
func TestServiceFollowsThePolicy(t *testing.T) {
	reg := &fakeRegistry{a: agents.Agent{Slot: 2, SpiffeID: "spiffe://x/a", Task: &agents.Task{TaskInfo: agents.TaskInfo{ID: "task-1"}}}}
	answers := map[string]Answer{
		"forbidden":  {Reason: "no"},
		"open":       {Allowed: true, TTL: time.Minute},
		"production": {Allowed: true, NeedsApproval: true, Reason: "a human decides"},
	}
	var recs []events.Decision
	s := NewService(New(time.Hour, nil), reg, func(_ context.Context, _ dataplane.Slot, _, resource, _ string) (Answer, error) {
		return answers[resource], nil
	}, func(d events.Decision) { recs = append(recs, d) }, slog.New(slog.DiscardHandler))
	ctx := context.Background()

	if _, err := s.Request(ctx, 2, "connect", "forbidden", "x"); !errors.Is(err, ErrRefused) {
		t.Errorf("refused request: %v", err)
	}
	if _, err := s.Request(ctx, 2, "read-secret", "open", "x"); !errors.Is(err, agents.ErrInvalid) {
		t.Errorf("an action the kernel cannot enforce: %v", err)
	}
	r, err := s.Request(ctx, 2, "connect", "open", "x")
	if err != nil || r.State != Approved || r.ApprovalID != "ap-open" {
		t.Errorf("request allowed outright: %+v %v", r, err)
	}
	r, err = s.Request(ctx, 2, "connect", "production", "deploy")
	if err != nil || r.State != Pending || len(reg.approvals) != 1 {
		t.Fatalf("request needing approval: %+v %v (approvals %v)", r, err, reg.approvals)
	}
	if got, err := s.Approve(r.ID, "uid:0", 1, 0); err != nil || got.State != Approved || len(reg.approvals) != 2 {
		t.Errorf("approved: %+v %v (approvals %v)", got, err, reg.approvals)
	}
	r, _ = s.Request(ctx, 2, "connect", "production", "again")
	reg.a.Task = &agents.Task{TaskInfo: agents.TaskInfo{ID: "task-2"}}
	if _, err := s.Approve(r.ID, "uid:0", 1, 0); !errors.Is(err, agents.ErrTask) {
		t.Errorf("approval for an ended task: %v", err)
	}
	var states []events.Verdict
	for _, d := range recs {
		states = append(states, d.Verdict)
	}
	want := []events.Verdict{"refused", "approved", "pending", "approved", "pending"}
	if len(states) != len(want) {
		t.Fatalf("records %v, want %v", states, want)
	}
	for i := range want {
		if states[i] != want[i] {
			t.Errorf("records %v, want %v", states, want)
		}
	}
}

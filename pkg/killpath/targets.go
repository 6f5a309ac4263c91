package killpath

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// Target names the agents a kill is for: exactly one of Slot, SpiffeID (every agent with it),
// TaskID, or PID (the agent whose cgroup holds the process).
type Target struct {
	Slot     *dataplane.Slot
	SpiffeID string
	TaskID   string
	PID      int32
}

// targets are the slots of the agents t names. All but a task ID are found without the
// registry's lock (Idents), so a kill does not wait for a policy change that is being evaluated.
func (k *Killer) targets(t Target) ([]dataplane.Slot, error) {
	n := 0
	for _, set := range []bool{t.Slot != nil, t.SpiffeID != "", t.TaskID != "", t.PID != 0} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, fmt.Errorf("%w: name the agent by exactly one of slot, spiffe_id, task_id and pid", agents.ErrInvalid)
	}
	var cg string
	if t.PID != 0 {
		rel, err := cgroups.PathOf(int(t.PID))
		if err != nil {
			return nil, fmt.Errorf("%w: process %d: %v", agents.ErrNotFound, t.PID, err)
		}
		cg = filepath.Join(k.opts.Cgroup2, rel)
	}
	var out []dataplane.Slot
	if t.TaskID != "" {
		for _, a := range k.opts.Registry.List() {
			if a.Task != nil && a.Task.ID == t.TaskID {
				out = append(out, a.Slot)
			}
		}
	}
	for _, a := range k.opts.Registry.Idents() {
		switch {
		case t.Slot != nil && a.Slot == *t.Slot,
			t.SpiffeID != "" && a.SpiffeID == t.SpiffeID,
			cg != "" && (cg == a.Cgroup || strings.HasPrefix(cg, a.Cgroup+"/")):
			out = append(out, a.Slot)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no agent matches", agents.ErrNotFound)
	}
	slices.Sort(out)
	return out, nil
}

// KillTarget runs the kill path on every agent t names, for reason, asked by requester
// (terminate: halt them too). It returns the kills that started, and what failed.
func (k *Killer) KillTarget(ctx context.Context, t Target, reason, requester string, terminate bool) ([]Kill, error) {
	list, err := k.targets(t)
	if err != nil {
		return nil, err
	}
	var out []Kill
	var errs []error
	for _, slot := range list {
		x, err := k.Kill(context.WithoutCancel(ctx), Request{Slot: slot, Reason: reason, Requester: requester, Terminate: terminate})
		if err != nil {
			errs = append(errs, fmt.Errorf("agent %d: %w", slot, err))
			continue
		}
		out = append(out, x)
	}
	return out, errors.Join(errs...)
}

// Respond acts on what the respond policy said of a decision (rec.Response): freeze or kill runs
// the kill path on the decision's agent, once (an agent already killed is left alone), halting it
// for kill. It does not wait for the kill.
func (k *Killer) Respond(rec events.Decision) {
	if rec.Slot == nil || (rec.Response != events.ResponseFreeze && rec.Response != events.ResponseKill) {
		return
	}
	slot := *rec.Slot
	if a, ok := k.opts.Registry.Get(slot); !ok || a.Killed {
		return
	}
	reason := fmt.Sprintf("respond policy said %s after %s %s %s (decision %s)", rec.Response, rec.Verdict, rec.Kind, rec.Target(), rec.DecisionID)
	req := Request{Slot: slot, Reason: reason, Requester: "policy:respond", Terminate: rec.Response == events.ResponseKill}
	go func() {
		if _, err := k.Kill(context.Background(), req); err != nil {
			k.opts.Log.Error("kill by the respond policy", "slot", slot, "error", err)
		}
	}()
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/killpath"
	"github.com/tether-sh/tether/pkg/policy"
)

// targets are the slots of the agents a kill request names: by slot, SPIFFE ID (every agent
// with it), task ID, or a process (the agent whose cgroup holds it). All but the task ID are
// found without the registry's lock (Idents), so a kill does not wait for a policy change that
// is being evaluated.
func (d *Daemon) targets(req api.KillRequest) ([]dataplane.Slot, error) {
	n := 0
	for _, set := range []bool{req.Slot != nil, req.SpiffeID != "", req.TaskID != "", req.PID != 0} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, fmt.Errorf("%w: name the agent by exactly one of slot, spiffe_id, task_id and pid", agents.ErrInvalid)
	}
	var cg string
	if req.PID != 0 {
		rel, err := cgroups.PathOf(int(req.PID))
		if err != nil {
			return nil, fmt.Errorf("%w: process %d: %v", agents.ErrNotFound, req.PID, err)
		}
		cg = filepath.Join(d.root, rel)
	}
	var out []dataplane.Slot
	if req.TaskID != "" {
		for _, a := range d.registry.List() {
			if a.Task != nil && a.Task.ID == req.TaskID {
				out = append(out, a.Slot)
			}
		}
	}
	for _, a := range d.registry.Idents() {
		switch {
		case req.Slot != nil && a.Slot == *req.Slot,
			req.SpiffeID != "" && a.SpiffeID == req.SpiffeID,
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

// Kill runs the kill path on every agent req names. A SPIFFE ID is denied even when no agent
// has it now.
func (d *Daemon) Kill(ctx context.Context, req api.KillRequest, requester string) ([]killpath.Kill, error) {
	list, err := d.targets(req)
	if err != nil {
		return nil, err
	}
	var out []killpath.Kill
	var errs []error
	for _, slot := range list {
		k, err := d.killer.Kill(context.WithoutCancel(ctx), killpath.Request{Slot: slot, Reason: req.Reason, Requester: requester, Terminate: req.Terminate})
		if err != nil {
			errs = append(errs, fmt.Errorf("agent %d: %w", slot, err))
			continue
		}
		out = append(out, k)
	}
	return out, errors.Join(errs...)
}

func (d *Daemon) Resume(slot dataplane.Slot) (agents.Agent, error) { return d.killer.Resume(slot) }

func (d *Daemon) Readmit(id string) ([]agents.Agent, error) { return d.killer.Readmit(id) }

func (d *Daemon) Kills() api.KillStatus {
	return api.KillStatus{Pending: d.killer.Pending(), Denied: d.killer.DeniedIDs()}
}

// killByPolicy acts on a respond decision of freeze or kill: the kill path, once per agent
// (an agent already killed is left alone), without halting for freeze.
func (d *Daemon) killByPolicy(slot dataplane.Slot, response policy.Response, reason string) {
	a, ok := d.registry.Get(slot)
	if !ok || a.Killed {
		return
	}
	go func() {
		_, err := d.killer.Kill(context.Background(), killpath.Request{Slot: slot, Reason: reason, Requester: "policy:respond", Terminate: response == policy.RespondKill})
		if err != nil {
			d.log.Error("kill by the respond policy", "slot", slot, "error", err)
		}
	}()
}

// Subscribe follows the decision records.
func (d *Daemon) Subscribe(n int) *events.Subscription { return d.stream.Subscribe(n) }

package daemon

import (
	"context"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/killpath"
)

// Kill runs the kill path on every agent t names (see killpath.Killer.KillTarget). A SPIFFE ID
// is denied even when no agent has it now.
func (d *Daemon) Kill(ctx context.Context, t killpath.Target, reason, requester string, terminate bool) ([]killpath.Kill, error) {
	return d.killer.KillTarget(ctx, t, reason, requester, terminate)
}

func (d *Daemon) Resume(slot dataplane.Slot) (agents.Agent, error) { return d.killer.Resume(slot) }

func (d *Daemon) Readmit(id string) ([]agents.Agent, error) { return d.killer.Readmit(id) }

func (d *Daemon) Kills() api.KillStatus {
	return api.KillStatus{Pending: d.killer.Pending(), Denied: d.killer.DeniedIDs()}
}

// Subscribe follows the decision records.
func (d *Daemon) Subscribe(n int) *events.Subscription { return d.stream.Subscribe(n) }

package daemon

import (
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/policy"
)

// stepupKeep is how long decided step-up requests stay listed.
const stepupKeep = time.Hour

// newPolicy sets up the policy's revisions and the decider that answers for the agents with the
// revision in force (none yet: Revisions.Start puts one in force), measured and recorded.
func (d *Daemon) newPolicy() error {
	r, err := policy.NewRevisions(d.cfg.Load, d.log)
	if err != nil {
		return err
	}
	r.Decider.Observe = d.metrics.ObserveEvaluation
	r.Decider.Record = d.pump.Record
	r.Decider.Evaluations = func() bool { return d.cfg.Load().DecisionLog.Evaluations }
	d.policy = r
	d.responder = &policy.Responder{Decider: r.Decider, Log: d.log,
		TaskOf: func(slot dataplane.Slot) (string, string, bool) { return d.registry.TaskOf(slot) },
		Act:    func(rec events.Decision) { d.killer.Respond(rec) }}
	return nil
}

// respond names the record's pod and container (for a pod agent), hands an exec the kernel held
// for its container's root to containers.Roots, finishes in user space what a
// kernel guard began (guards.FollowUp), then completes the record and has the respond policy answer it; the kill path acts on the answer.
func (d *Daemon) respond(rec *events.Decision) {
	d.disc.Annotate(rec)
	if d.roots.Held(rec) {
		return // a container's first exec, held: decided once its root is resolved (its own record)
	}
	d.guards.FollowUp(rec)
	d.responder.Annotate(rec)
}

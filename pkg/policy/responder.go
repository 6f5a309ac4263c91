package policy

import (
	"log/slog"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// Responder completes the agents' decision records as they pass (the agent's task, the revision
// in force) and has the respond policy answer the denied and audited ones (Decider.Respond),
// writing the answer into the record; each fresh answer goes to Act, the kill path's Respond.
type Responder struct {
	Decider *Decider
	// TaskOf is the agent's task now (the registry's TaskOf).
	TaskOf func(slot dataplane.Slot) (id, typ string, ok bool)
	// Act acts on a record the policy answered (killpath.Killer.Respond): once per answer, not
	// again for the same event repeated a moment later.
	Act func(events.Decision)
	Log *slog.Logger
}

// Annotate completes rec and answers it; a record with no agent (a depth denial) is left as it is.
func (r *Responder) Annotate(rec *events.Decision) {
	if rec.Slot == nil {
		return
	}
	if id, typ, ok := r.TaskOf(*rec.Slot); ok {
		rec.TaskID, rec.TaskType = id, typ
	}
	resp, fresh, err := r.Decider.Respond(rec)
	if err != nil {
		r.Log.Error("respond policy", "error", err)
		return
	}
	if resp == "" {
		return // the agent is gone
	}
	rec.Response = resp
	if !fresh {
		return // the answer to the same event a moment ago: already logged and acted on
	}
	if resp != events.ResponseNone {
		r.Log.Warn("policy response", "response", resp, "slot", *rec.Slot, "spiffe_id", rec.SpiffeID,
			"kind", rec.Kind, "verdict", rec.Verdict, "decision_id", rec.DecisionID)
	}
	r.Act(*rec)
}

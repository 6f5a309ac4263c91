package policy

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/policies"
)

// TestDeciderAnswersWithTheRevisionInForce: without a revision the decider grants nothing and
// responds nothing; with one it evaluates grants (recorded only while evaluations are asked
// for), answers step-ups for an agent it knows, and names the revision in a denial's record.
func TestDeciderAnswersWithTheRevisionInForce(t *testing.T) {
	schema, _ := policies.FS.ReadFile("input.schema.json")
	engine := NewEngine(schema, slog.New(slog.DiscardHandler))
	d := NewDecider(engine, Env{Node: "n", Environment: "dev"}, time.UTC)
	agent := agents.Context{Slot: 1, SpiffeID: "spiffe://example.org/agent/coder"}
	d.Contexts = func(s dataplane.Slot) (agents.Context, bool) { return agent, s == 1 }
	var recs []events.Decision
	recording := false
	d.Record, d.Evaluations = func(r events.Decision) { recs = append(recs, r) }, func() bool { return recording }
	ctx := context.Background()

	if _, err := d.Grants(ctx, agent); err == nil {
		t.Error("grants without a revision in force")
	}
	slot := dataplane.Slot(1)
	deny := &events.Decision{Slot: &slot, SpiffeID: agent.SpiffeID, Kind: "connect4", Verdict: events.VerdictDeny, Timestamp: time.Now()}
	if resp, _, err := d.Respond(deny); resp != "" || err != nil || deny.PolicyRevision != "" {
		t.Errorf("respond without a revision: %q %v (revision %q)", resp, err, deny.PolicyRevision)
	}
	f, err := FromFS(policies.FS, "shipped policies")
	if err != nil {
		t.Fatal(err)
	}
	rev, err := engine.Offer(ctx, f, StandardProbes(time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Grants(ctx, agent); err != nil || len(recs) != 0 {
		t.Errorf("grants: %v (%d records while evaluations are off)", err, len(recs))
	}
	recording = true
	if _, err := d.Grants(ctx, agent); err != nil || len(recs) != 1 || recs[0].Kind != events.KindPolicy || recs[0].PolicyRevision != rev.ID {
		t.Errorf("grants recorded: %v %+v", err, recs)
	}
	if _, err := d.Stepup(ctx, 1, "connect", "production", "deploy"); err != nil {
		t.Errorf("step-up for a known agent: %v", err)
	}
	if _, err := d.Stepup(ctx, 2, "connect", "production", "deploy"); err == nil {
		t.Error("step-up for an agent the registry does not know")
	}
	if resp, fresh, err := d.Respond(deny); err != nil || !fresh || resp == "" || deny.PolicyRevision != rev.ID {
		t.Errorf("respond: %q fresh %v %v (revision %q)", resp, fresh, err, deny.PolicyRevision)
	}
}

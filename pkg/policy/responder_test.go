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

// TestResponderActsOncePerAnswer: a denial gets the agent's task, the revision and the policy's
// answer, and the kill path is told once; the same denial a moment later gets the same answer but
// is not acted on again; an allow and a record without an agent are not acted on.
func TestResponderActsOncePerAnswer(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	schema, _ := policies.FS.ReadFile("input.schema.json")
	engine := NewEngine(schema, log)
	f, err := FromFS(policies.FS, "shipped policies")
	if err != nil {
		t.Fatal(err)
	}
	f.Data["tether_settings"].(map[string]any)["respond"] = map[string]any{"freeze_after_denied_egress": 2}
	if _, err := engine.Offer(context.Background(), f, StandardProbes(time.Now())); err != nil {
		t.Fatal(err)
	}
	dec := NewDecider(engine, Env{Node: "n"}, time.UTC)
	dec.Contexts = func(slot dataplane.Slot) (agents.Context, bool) {
		return agents.Context{SpiffeID: "spiffe://x/a"}, slot == 1
	}
	var acted []events.Decision
	r := &Responder{Decider: dec, Log: log, Act: func(rec events.Decision) { acted = append(acted, rec) },
		TaskOf: func(slot dataplane.Slot) (string, string, bool) { return "t1", "research", slot == 1 }}

	now := time.Now()
	first := deny("192.0.2.1:443", now)
	r.Annotate(first)
	if first.TaskID != "t1" || first.TaskType != "research" || first.PolicyRevision == "" || first.Response != events.ResponseNone || len(acted) != 1 {
		t.Fatalf("first denial: task %q/%q revision %q response %q, acted on %d", first.TaskID, first.TaskType, first.PolicyRevision, first.Response, len(acted))
	}
	again := deny("192.0.2.1:443", now)
	r.Annotate(again)
	if again.Response != events.ResponseNone || len(acted) != 1 {
		t.Fatalf("the same denial again: response %q, acted on %d times, want once", again.Response, len(acted))
	}
	second := deny("192.0.2.2:443", now)
	r.Annotate(second)
	if second.Response != events.ResponseFreeze || len(acted) != 2 || acted[1].Response != events.ResponseFreeze {
		t.Fatalf("the second denial: response %q, acted on %d", second.Response, len(acted))
	}
	allow := deny("192.0.2.3:443", now)
	allow.Verdict = events.VerdictAllow
	r.Annotate(allow)
	noAgent := &events.Decision{Kind: "connect4", Verdict: events.VerdictDeny}
	r.Annotate(noAgent)
	if len(acted) != 2 || allow.Response != "" || noAgent.PolicyRevision != "" {
		t.Fatalf("an allow and a record without agent: acted on %d, responses %q %q", len(acted), allow.Response, noAgent.Response)
	}
}

package policy

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/policies"
)

func shippedWith(t *testing.T, freezeAfter int) *Revision {
	t.Helper()
	f, err := FromFS(policies.FS, "shipped policies")
	if err != nil {
		t.Fatal(err)
	}
	f.Data["tether_settings"].(map[string]any)["respond"] = map[string]any{"freeze_after_denied_egress": freezeAfter}
	f.Revision = fmt.Sprintf("test-%d", freezeAfter)
	schema, _ := policies.FS.ReadFile("input.schema.json")
	rev, err := Compile(context.Background(), f, schema)
	if err != nil {
		t.Fatal(err)
	}
	return rev
}

func deny(dest string, at time.Time) *events.Decision {
	slot := dataplane.Slot(1)
	return &events.Decision{DecisionID: fmt.Sprintf("%s-%d", dest, at.UnixNano()), Timestamp: at, SpiffeID: "spiffe://x/a",
		Slot: &slot, Kind: "connect4", Verdict: "deny", Destination: dest}
}

// TestRespondCountsEveryDenial: the policy is told every denial of the last minute (counts),
// however many; the records it gets stop at recentMax; an identical event within a second takes
// the memo's answer without an evaluation, a new one is evaluated.
func TestRespondCountsEveryDenial(t *testing.T) {
	rev := shippedWith(t, 100)
	r := newRecent()
	evaluations := 0
	input := func() (Input, bool) {
		evaluations++
		return Input{Agent: Agent{SpiffeID: "spiffe://x/a", TrustDomain: "x", Path: "/a"}, Time: TimeAt(time.Now(), time.UTC)}, true
	}
	now := time.Now()
	// 99 distinct destinations: each is evaluated; no freeze below 100.
	for i := range 99 {
		resp, fresh, err := r.respond(deny(fmt.Sprintf("192.0.2.%d:443", i), now), rev, input)
		if err != nil || !fresh || resp != events.ResponseNone {
			t.Fatalf("denial %d: %q fresh %v %v", i, resp, fresh, err)
		}
	}
	// The same destination again within the second: the memo answers (none), not the policy,
	// although it is the 100th denial.
	resp, fresh, err := r.respond(deny("192.0.2.0:443", now), rev, input)
	if err != nil || fresh || resp != events.ResponseNone || evaluations != 99 {
		t.Fatalf("repeat: %q fresh %v evaluations %d %v", resp, fresh, evaluations, err)
	}
	// A new destination: evaluated with all 101 counted, the records capped.
	resp, fresh, err = r.respond(deny("198.51.100.1:443", now), rev, input)
	if err != nil || !fresh || resp != events.ResponseFreeze {
		t.Fatalf("101st denial: %q fresh %v %v", resp, fresh, err)
	}
	p := r.agents[1]
	if c := p.window(now)["connect4/deny"]; c != 101 {
		t.Errorf("counted %d denials, want 101", c)
	}
	if len(p.last) != recentMax {
		t.Errorf("%d records kept, want %d", len(p.last), recentMax)
	}
	// A minute later the old denials no longer count.
	resp, _, _ = r.respond(deny("203.0.113.1:443", now.Add(61*time.Second)), rev, input)
	if resp != events.ResponseNone {
		t.Errorf("a minute later: %q, want none", resp)
	}
}

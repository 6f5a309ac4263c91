package agents

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/grants"
)

// The rule set the kernel gets carries the task's expiry, or the grants' valid_until when that
// comes first, so that the kernel ends it with tetherd stopped. A renewal moves the expiry in place
// (SetExpiry), without writing the rule set again; when that write fails for good, the next
// evaluation installs the whole rule set.
func TestRuleSetCarriesItsExpiry(t *testing.T) {
	e := newEnv(t)
	c := newClock()
	e.reg = e.withClock(c)
	a := e.register(t, "spiffe://example.org/a")
	if rs, _ := e.dp.RuleSet(a.Slot); !rs.Expires.IsZero() {
		t.Fatalf("no task, no valid_until: expires %v, want never", rs.Expires)
	}
	started, err := e.reg.StartTask(a.Slot, TaskSpec{Type: "coding", TTL: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	rs, _ := e.dp.RuleSet(a.Slot)
	if !rs.Expires.Equal(started.Task.ExpiresAt) {
		t.Fatalf("with a task: the rule set expires %v, want the task's expiry %v", rs.Expires, started.Task.ExpiresAt)
	}
	gen := rs.Generation

	c.advance(time.Minute)
	calls := len(e.dp.Calls)
	renewed, err := e.reg.RenewTask(a.Slot, 30*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	rs, _ = e.dp.RuleSet(a.Slot)
	if got := e.dp.Calls[calls:]; slices.Contains(got, "Install") || !slices.Contains(got, "SetExpiry") {
		t.Errorf("a renewal made the kernel calls %v: want SetExpiry and no Install", got)
	}
	if !rs.Expires.Equal(renewed.Task.ExpiresAt) || rs.Generation != gen {
		t.Errorf("after the renewal: expires %v at generation %d, want %v at %d", rs.Expires, rs.Generation, renewed.Task.ExpiresAt, gen)
	}

	// valid_until before the task's end.
	until := c.Now().Add(5 * time.Minute)
	e.ev.set("spiffe://example.org/a", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}}, ValidUntil: &until})
	if err := e.reg.Refresh(t.Context()); err != nil {
		t.Fatal(err)
	}
	if rs, _ = e.dp.RuleSet(a.Slot); !rs.Expires.Equal(until) {
		t.Errorf("valid_until %v before the task's expiry: the rule set expires %v", until, rs.Expires)
	}

	// A failed move leaves the agent out of sync: the next evaluation writes it all.
	e.ev.set("spiffe://example.org/a", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}}})
	if err := e.reg.Refresh(t.Context()); err != nil {
		t.Fatal(err)
	}
	e.dp.Fail("SetExpiry", 4)
	if _, err := e.reg.RenewTask(a.Slot, 20*time.Minute); err == nil {
		t.Fatal("a renewal whose expiry the kernel refused four times: no error")
	}
	if got, _ := e.reg.Get(a.Slot); got.Synced {
		t.Error("the agent reads as synced with the kernel's expiry not moved")
	}
	calls = len(e.dp.Calls)
	renewed, err = e.reg.RenewTask(a.Slot, 25*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	rs, _ = e.dp.RuleSet(a.Slot)
	if !slices.Contains(e.dp.Calls[calls:], "Install") || !rs.Expires.Equal(renewed.Task.ExpiresAt) {
		t.Errorf("the renewal after a failed move: calls %v, expires %v; want an Install with %v", e.dp.Calls[calls:], rs.Expires, renewed.Task.ExpiresAt)
	}
}

// TestRecompileKeepsTheExpiry: compiling the grants again without the policy (a file a rule
// names changed on the host) keeps the rule set's expiry. Without it the recompiled rule set
// never expired: the kernel allowed a task's destinations past the task's expiry until tetherd
// evaluated the agent again (seen when a stopped tetherd came back just past a task's expiry).
func TestRecompileKeepsTheExpiry(t *testing.T) {
	dir := t.TempDir()
	bin := dir + "/tool"
	os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755)
	e := newEnv(t)
	c := newClock()
	e.reg = e.withClock(c)
	e.ev.set("spiffe://example.org/a", grants.Grants{Exec: []grants.Exec{{Path: bin}}})
	a := e.register(t, "spiffe://example.org/a")
	started, err := e.reg.StartTask(a.Slot, TaskSpec{Type: "coding", TTL: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	// What the grants name changes: the recompiled rule set differs and is installed.
	os.WriteFile(bin+".new", []byte("#!/bin/sh\n"), 0o755)
	os.Rename(bin+".new", bin)
	gen := func() uint64 { rs, _ := e.dp.RuleSet(a.Slot); return rs.Generation }
	before := gen()
	e.reg.Recompile(context.Background())
	rs, _ := e.dp.RuleSet(a.Slot)
	if rs.Generation == before {
		t.Fatal("the recompiled rule set was not installed: the test checks nothing")
	}
	if !rs.Expires.Equal(started.Task.ExpiresAt) {
		t.Errorf("recompiled: the rule set expires %v, want the task's expiry %v", rs.Expires, started.Task.ExpiresAt)
	}
	// Recompiling again with nothing changed installs nothing (the expiry is not a change).
	before = gen()
	e.reg.Recompile(context.Background())
	if gen() != before {
		t.Error("recompiling with nothing changed installed a new generation")
	}
}

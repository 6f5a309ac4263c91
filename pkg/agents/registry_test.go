package agents

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/dataplane/dataplanetest"
	"github.com/tether-sh/tether/pkg/grants"
)

type fakeCgroups struct {
	mu      sync.Mutex
	ids     map[string]uint64
	next    uint64
	removed []string
}

func (c *fakeCgroups) ID(path string) (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if id, ok := c.ids[path]; ok {
		return id, nil
	}
	return 0, os.ErrNotExist
}

func (c *fakeCgroups) Mkdir(path string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.ids[path]; ok {
		return os.ErrExist
	}
	c.next++
	c.ids[path] = 1000 + c.next
	return nil
}

func (c *fakeCgroups) DepthLimited(path string) bool { return true }

func (c *fakeCgroups) Remove(path string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.ids, path)
	c.removed = append(c.removed, path)
	return nil
}

// fakeEval decides with f, or from the grants table by SPIFFE ID, and records what it saw.
type fakeEval struct {
	mu     sync.Mutex
	grants map[string]grants.Grants
	fail   map[string]error
	seen   []Context
}

func (f *fakeEval) Grants(_ context.Context, c Context) (grants.Grants, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seen = append(f.seen, c)
	if err := f.fail[c.SpiffeID]; err != nil {
		return grants.Grants{}, err
	}
	g := f.grants[c.SpiffeID]
	if c.Task != nil {
		// The task type decides the egress: what a policy would do.
		g.Egress = append(slices.Clone(g.Egress), grants.Egress{CIDR: "192.0.2.0/24", Ports: []grants.PortRange{{Lo: 1, Hi: 1}}})
		for _, ap := range c.Task.Approvals {
			g.Egress = append(g.Egress, grants.Egress{CIDR: "198.51.100.0/24", Ports: []grants.PortRange{{Lo: 1, Hi: 1}}, Protocol: ap.Action, Approval: ap.ID})
		}
	}
	return g, nil
}

func (f *fakeEval) set(id string, g grants.Grants) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.grants[id] = g
}

func (f *fakeEval) calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.seen)
}

func (f *fakeEval) last() Context {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seen[len(f.seen)-1]
}

type env struct {
	dp  *dataplanetest.Fake
	cg  *fakeCgroups
	ev  *fakeEval
	reg *Registry
}

var compiler = CompileOn(compile.Options{Files: compile.OS{}})

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{
		dp: dataplanetest.New(),
		cg: &fakeCgroups{ids: map[string]uint64{"/cg/tether": 10, "/cg/tether/existing": 11, "/cg/other": 12}},
		ev: &fakeEval{grants: map[string]grants.Grants{"spiffe://example.org/a": {Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}}}},
			fail: map[string]error{}},
	}
	e.reg = e.registry([]string{"/cg/tether"})
	return e
}

func (e *env) registry(parents []string) *Registry {
	r := New(Options{Dataplane: e.dp, Evaluator: e.ev, Compile: compiler, Parents: parents, LaunchParent: parents[0], Cgroups: e.cg})
	return r
}

func (e *env) register(t *testing.T, id string) Agent {
	t.Helper()
	a, err := e.reg.Register(Registration{SpiffeID: id, Cgroup: "/cg/tether/existing"})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestRegisterOrder(t *testing.T) {
	e := newEnv(t)
	a, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Launch: true, Selectors: []string{"launch:uid:0"}, Labels: map[string]string{"team": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(a.Cgroup, "/cg/tether/a-") || !a.Launched || a.Generation != 1 || !a.Synced {
		t.Errorf("agent %+v", a)
	}
	// The binding comes last: the cgroup is the agent only once its rules are in place.
	if i := slices.Index(e.dp.Calls, "Bind"); i != len(e.dp.Calls)-1 || !slices.Contains(e.dp.Calls[:i], "Install") {
		t.Errorf("kernel calls %v: want Install before Bind, Bind last", e.dp.Calls)
	}
	rs, _ := e.dp.RuleSet(a.Slot)
	if len(rs.Egress) != 1 || rs.Generation != 1 {
		t.Errorf("installed %+v", rs)
	}
	c := e.ev.last()
	if c.SpiffeID != "spiffe://example.org/a" || c.Labels["team"] != "x" || !slices.Contains(c.Selectors, "launch:uid:0") || !slices.Contains(c.Selectors, "cgroup:"+a.Cgroup) {
		t.Errorf("context the policy saw: %+v", c)
	}
}

func TestRegisterRefusals(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name string
		req  Registration
		want string
	}{
		{"bad ID", Registration{SpiffeID: "agent-a", Cgroup: "/cg/tether/existing"}, "SPIFFE ID"},
		{"outside parents", Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/other"}, "not below an agent parent"},
		{"the parent itself", Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether"}, "not below an agent parent"},
		{"relative", Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "tether/existing"}, "absolute"},
		{"missing cgroup", Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/nope"}, "not exist"},
		{"launch with a cgroup", Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing", Launch: true}, "do not name one"},
		{"bad task", Registration{SpiffeID: "spiffe://example.org/a", Launch: true, Task: &TaskSpec{Type: "a b", TTL: time.Hour}}, "task type"},
		{"task without ttl", Registration{SpiffeID: "spiffe://example.org/a", Launch: true, Task: &TaskSpec{Type: "coding"}}, "ttl"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.reg.Register(tt.req)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want %q", err, tt.want)
			}
		})
	}
	if len(e.dp.Calls) != 0 {
		t.Errorf("refused registrations touched the kernel: %v", e.dp.Calls)
	}
	e.register(t, "spiffe://example.org/a")
	if _, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/b", Cgroup: "/cg/tether/existing"}); err == nil || !strings.Contains(err.Error(), "already agent") {
		t.Errorf("second registration of one cgroup: %v", err)
	}
}

func TestUnknownIdentityIsDeniedEverything(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/nobody")
	rs, _ := e.dp.RuleSet(a.Slot)
	if len(rs.Egress)+len(rs.Exec)+len(rs.Unix) != 0 || rs.Mode != dataplane.ModeEnforce {
		t.Errorf("an identity without grants got %+v", rs)
	}
}

// TestPolicyErrorGrantsNothing: an evaluation that fails for an agent denies it everything
// (deny by default), with the error on the agent.
func TestPolicyErrorGrantsNothing(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	e.ev.fail["spiffe://example.org/a"] = errors.New("p.rego:7: eval_conflict_error")
	if err := e.reg.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	rs, _ := e.dp.RuleSet(a.Slot)
	got, _ := e.reg.Get(a.Slot)
	if len(rs.Egress) != 0 || rs.Generation != 2 || !strings.Contains(got.Error, "p.rego:7") || e.reg.Stats().EvalErrors != 1 {
		t.Errorf("installed %+v, agent %+v", rs, got)
	}
}

// TestRefusedRulesAreListed: rules that do not compile stay out, listed; the rest is installed.
func TestRefusedRulesAreListed(t *testing.T) {
	e := newEnv(t)
	e.ev.set("spiffe://example.org/a", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}, {CIDR: "10.0.0.1/8"}}})
	a := e.register(t, "spiffe://example.org/a")
	rs, _ := e.dp.RuleSet(a.Slot)
	if len(rs.Egress) != 1 || len(a.Refused) != 1 || !strings.Contains(a.Refused[0], "host bits") {
		t.Errorf("installed %+v, refused %v", rs.Egress, a.Refused)
	}
}

func TestWritesAreRetriedAndCounted(t *testing.T) {
	e := newEnv(t)
	e.dp.Fail("Install", 2)
	a := e.register(t, "spiffe://example.org/a")
	if s := e.reg.Stats(); s.MapWriteFailures != 2 || s.MapWriteRetries != 2 {
		t.Errorf("stats %+v: want 2 failures, 2 retries", s)
	}
	if !a.Synced {
		t.Error("agent not synced after successful retries")
	}
}

func TestFailedRegistrationRollsBack(t *testing.T) {
	e := newEnv(t)
	e.dp.Fail("Bind", 10)
	_, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Launch: true})
	if !errors.Is(err, dataplanetest.ErrInjected) {
		t.Fatalf("error %v", err)
	}
	if len(e.reg.List()) != 0 {
		t.Error("a failed registration left an agent")
	}
	if _, ok := e.dp.RuleSet(0); ok {
		t.Error("a failed registration left a rule set in the kernel")
	}
	if len(e.cg.removed) != 1 {
		t.Errorf("the launched cgroup was not removed: %v", e.cg.removed)
	}
}

func TestReconcileRetriesUntilSynced(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	e.dp.Fail("Install", 100)
	if _, err := e.reg.SetMode(a.Slot, ptr(dataplane.ModeAudit)); err == nil {
		t.Fatal("SetMode succeeded while every install fails")
	}
	if got, _ := e.reg.Get(a.Slot); got.Synced {
		t.Error("agent reported synced after a failed write")
	}
	e.dp.Fail("Install", 0)
	e.reg.Reconcile()
	got, _ := e.reg.Get(a.Slot)
	rs, _ := e.dp.RuleSet(a.Slot)
	if !got.Synced || rs.Mode != dataplane.ModeAudit || rs.Generation != 2 {
		t.Errorf("after reconcile: %+v, installed %+v", got, rs)
	}
}

func TestUnchangedGrantsAreNotInstalledAgain(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	installs := e.reg.Stats().Installs
	if err := e.reg.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	rs, _ := e.dp.RuleSet(a.Slot)
	if e.reg.Stats().Installs != installs || rs.Generation != 1 {
		t.Errorf("an evaluation that changed nothing installed generation %d", rs.Generation)
	}
}

func TestExpiredGrantsDenyEverything(t *testing.T) {
	e := newEnv(t)
	past := time.Now().Add(-time.Minute)
	e.ev.set("spiffe://example.org/a", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}}, ValidUntil: &past})
	a := e.register(t, "spiffe://example.org/a")
	if rs, _ := e.dp.RuleSet(a.Slot); len(rs.Egress) != 0 {
		t.Errorf("expired grants installed %+v", rs)
	}
}

func TestKilledAndMode(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	if _, err := e.reg.SetKilled(a.Slot, true); err != nil {
		t.Fatal(err)
	}
	if f, _ := e.dp.Flags(a.Slot); f != dataplane.AgentActive|dataplane.AgentKilled {
		t.Errorf("flags %v", f)
	}
	// A new rule set leaves the killed flag alone.
	if _, err := e.reg.SetMode(a.Slot, ptr(dataplane.ModeAudit)); err != nil {
		t.Fatal(err)
	}
	if f, _ := e.dp.Flags(a.Slot); f&dataplane.AgentKilled == 0 {
		t.Error("mode change cleared the killed flag")
	}
	if _, err := e.reg.SetKilled(99, true); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown slot: %v", err)
	}
}

// TestDenyWithoutTheLock: the kill path's first step finds the agent and sets the kernel's killed
// flag while the registry's lock is held (a policy change being evaluated); the registry's own
// flag follows with SetKilled, and a resume ends the kernel's latch.
func TestDenyWithoutTheLock(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	if id, ok := e.reg.Peek(a.Slot); !ok || id.SpiffeID != a.SpiffeID || id.Cgroup != a.Cgroup {
		t.Fatalf("Peek: %+v %v", id, ok)
	}
	e.reg.mu.Lock()
	done := make(chan error, 1)
	go func() { done <- e.reg.Deny(a.Slot) }()
	select {
	case err := <-done:
		if err != nil {
			e.reg.mu.Unlock()
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		e.reg.mu.Unlock()
		t.Fatal("Deny waited for the registry's lock")
	}
	if ids := e.reg.Idents(); len(ids) != 1 || ids[0].Slot != a.Slot {
		e.reg.mu.Unlock()
		t.Fatalf("Idents under the lock: %+v", ids)
	}
	e.reg.mu.Unlock()
	if f, _ := e.dp.Flags(a.Slot); f&dataplane.AgentKilled == 0 {
		t.Fatalf("flags %v after Deny: want killed", f)
	}
	// A write of the registry's flags, which do not say killed yet, keeps the kernel's flag.
	if _, err := e.reg.SetMode(a.Slot, ptr(dataplane.ModeAudit)); err != nil {
		t.Fatal(err)
	}
	if f, _ := e.dp.Flags(a.Slot); f&dataplane.AgentKilled == 0 {
		t.Fatal("a registry write cleared the flag Deny set")
	}
	if _, err := e.reg.SetKilled(a.Slot, true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.SetKilled(a.Slot, false); err != nil {
		t.Fatal(err)
	}
	if f, _ := e.dp.Flags(a.Slot); f&dataplane.AgentKilled != 0 {
		t.Fatalf("flags %v after a resume: want not killed", f)
	}
	if err := e.reg.Deny(99); !errors.Is(err, ErrNotFound) {
		t.Errorf("Deny of an empty slot: %v", err)
	}
	if err := e.reg.Unregister(a.Slot); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.reg.Peek(a.Slot); ok {
		t.Error("Peek finds an unregistered agent")
	}
}

func TestAdopt(t *testing.T) {
	e := newEnv(t)
	live := e.register(t, "spiffe://example.org/a")
	e.reg.SetKilled(live.Slot, true)
	e.cg.ids["/cg/tether/gone"] = 50
	gone, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/gone"})
	delete(e.cg.ids, "/cg/tether/gone")
	e.dp.Bind(777, 3) // a binding nobody recorded

	// A new daemon: same kernel, new registry.
	reg := e.registry([]string{"/cg/tether"})
	if err := reg.Adopt(); err != nil {
		t.Fatal(err)
	}
	list := reg.List()
	// What the earlier tetherd installed is compiled again and installed as the next generation.
	if len(list) != 1 || list[0].Slot != live.Slot || !list[0].Killed || list[0].Generation != 2 {
		t.Fatalf("adopted %+v", list)
	}
	if _, ok := e.dp.RuleSet(gone.Slot); ok {
		t.Error("the agent whose cgroup is gone was not cleared")
	}
	bindings, _ := e.dp.Bindings()
	if _, ok := bindings[777]; ok {
		t.Error("orphan binding kept")
	}
}

func TestAdoptDropsAgentsOutsideParents(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	reg := e.registry([]string{"/cg/other"})
	reg.Adopt()
	if len(reg.List()) != 0 {
		t.Errorf("kept %+v", reg.List())
	}
	if _, ok := e.dp.RuleSet(a.Slot); ok {
		t.Error("slot not cleared")
	}
}

func TestUnregisterRemovesLaunchedCgroup(t *testing.T) {
	e := newEnv(t)
	a, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Launch: true})
	if err := e.reg.Unregister(a.Slot); err != nil {
		t.Fatal(err)
	}
	if len(e.cg.removed) != 1 || e.cg.removed[0] != a.Cgroup {
		t.Errorf("removed %v", e.cg.removed)
	}
	if _, ok := e.dp.RuleSet(a.Slot); ok {
		t.Error("slot not cleared")
	}
	if err := e.reg.Unregister(a.Slot); !errors.Is(err, ErrNotFound) {
		t.Errorf("second unregister: %v", err)
	}
}

func TestSlotsAreReusedLast(t *testing.T) {
	e := newEnv(t)
	a, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Launch: true})
	if err := e.reg.Unregister(a.Slot); err != nil {
		t.Fatal(err)
	}
	b, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/b", Launch: true})
	if b.Slot == a.Slot {
		t.Errorf("slot %d reused at once", a.Slot)
	}
	if id, _, ok := e.reg.Identity(a.Slot); !ok || id != "spiffe://example.org/a" {
		t.Errorf("identity of the retired slot: %q %v", id, ok)
	}
}

// TestUnregisterRacingRefresh: a reload that runs while an agent is being removed must not write
// it back into the kernel.
func TestUnregisterRacingRefresh(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	done := make(chan struct{})
	e.dp.BeforeClear = func() {
		go func() { e.reg.Refresh(context.Background()); e.reg.Reconcile(); close(done) }()
		time.Sleep(20 * time.Millisecond)
	}
	if err := e.reg.Unregister(a.Slot); err != nil {
		t.Fatal(err)
	}
	<-done
	if _, ok := e.dp.RuleSet(a.Slot); ok {
		t.Error("the removed agent's rule set is back in the kernel")
	}
	if b, _ := e.dp.Bindings(); len(b) != 0 {
		t.Errorf("bindings %v", b)
	}
}

// Every change of context is evaluated: task start, renewal, end; approvals; identity.
func TestTaskLifecycleReevaluates(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	egress := func() int { rs, _ := e.dp.RuleSet(a.Slot); return len(rs.Egress) }

	got, err := e.reg.StartTask(a.Slot, TaskSpec{Type: "coding", Sensitivity: "internal", TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if c := e.ev.last(); c.Task == nil || c.Task.Type != "coding" || c.Task.Sensitivity != "internal" || egress() != 2 || got.Generation != 2 {
		t.Errorf("after start: context %+v, %d egress entries, generation %d", c.Task, egress(), got.Generation)
	}
	if _, err := e.reg.StartTask(a.Slot, TaskSpec{Type: "coding", TTL: time.Hour}); !errors.Is(err, ErrTask) {
		t.Errorf("a second task: %v", err)
	}
	n := e.ev.calls()
	if _, err := e.reg.RenewTask(a.Slot, 2*time.Hour); err != nil || e.ev.calls() != n+1 {
		t.Errorf("renew: %v, %d evaluations", err, e.ev.calls()-n)
	}
	if !e.ev.last().Task.ExpiresAt.After(time.Now().Add(90 * time.Minute)) {
		t.Error("renewal did not move the expiry")
	}
	if _, err := e.reg.AddApproval(a.Slot, "tcp", "production", "uid:0", time.Hour, 0); err != nil {
		t.Fatal(err)
	}
	if c := e.ev.last(); len(c.Task.Approvals) != 1 || c.Task.Approvals[0].ApprovedBy != "uid:0" || egress() != 3 {
		t.Errorf("after approval: %+v, %d egress entries", c.Task, egress())
	}
	if _, err := e.reg.EndTask(a.Slot); err != nil {
		t.Fatal(err)
	}
	if c := e.ev.last(); c.Task != nil || egress() != 1 {
		t.Errorf("after end: %+v, %d egress entries", c.Task, egress())
	}
	if _, err := e.reg.EndTask(a.Slot); !errors.Is(err, ErrTask) {
		t.Errorf("ending no task: %v", err)
	}
	if _, err := e.reg.SetIdentity(a.Slot, "spiffe://example.org/b"); err != nil || e.ev.last().SpiffeID != "spiffe://example.org/b" {
		t.Errorf("rotation: %v %+v", err, e.ev.last())
	}
	if _, err := e.reg.Revoke(a.Slot); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.reg.Get(a.Slot); egress() != 0 || !got.Revoked || !strings.Contains(got.Error, "revoked") {
		t.Errorf("after revoke: %d egress entries, %+v", egress(), got)
	}
}

// TestScheduledEvaluations: valid_until, approval expiry and task expiry each bring an
// evaluation at that moment, without polling.
func TestScheduledEvaluations(t *testing.T) {
	e := newEnv(t)
	until := time.Now().Add(300 * time.Millisecond)
	e.ev.set("spiffe://example.org/w", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}}, ValidUntil: &until})
	w := e.register(t, "spiffe://example.org/w")
	if rs, _ := e.dp.RuleSet(w.Slot); len(rs.Egress) != 1 {
		t.Fatal("window grants not installed")
	}
	waitFor(t, "valid_until", func() bool { rs, _ := e.dp.RuleSet(w.Slot); return len(rs.Egress) == 0 })

	e.cg.ids["/cg/tether/t"] = 60
	tk, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/t",
		Task: &TaskSpec{Type: "coding", TTL: 600 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.AddApproval(tk.Slot, "udp", "x", "uid:0", 300*time.Millisecond, 0); err != nil {
		t.Fatal(err)
	}
	entries := func() int { rs, _ := e.dp.RuleSet(tk.Slot); return len(rs.Egress) }
	if entries() != 3 {
		t.Fatalf("task with approval: %d entries", entries())
	}
	waitFor(t, "approval expiry", func() bool { return entries() == 2 })
	waitFor(t, "task expiry", func() bool { return entries() == 1 })
	if got, _ := e.reg.Get(tk.Slot); got.Task != nil {
		t.Errorf("expired task still there: %+v", got.Task)
	}
}

func TestRefreshManyAgents(t *testing.T) {
	e := newEnv(t)
	for i := range 200 {
		path := fmt.Sprintf("/cg/tether/a%d", i)
		e.cg.ids[path] = uint64(5000 + i)
		if _, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: path}); err != nil {
			t.Fatal(err)
		}
	}
	e.ev.set("spiffe://example.org/a", grants.Grants{Egress: []grants.Egress{{CIDR: "10.1.0.0/16"}}})
	if err := e.reg.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, a := range e.reg.List() {
		rs, _ := e.dp.RuleSet(a.Slot)
		if len(rs.Egress) != 1 || rs.Egress[0].Prefix.String() != "::ffff:10.1.0.0/112" || a.Generation != 2 {
			t.Fatalf("agent %d: %+v", a.Slot, rs)
		}
	}
}

func TestRecheckFollowsReplacedFiles(t *testing.T) {
	dir := t.TempDir()
	bin := dir + "/tool"
	os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755)
	e := newEnv(t)
	e.ev.set("spiffe://example.org/a", grants.Grants{Exec: []grants.Exec{{Path: bin}}})
	a := e.register(t, "spiffe://example.org/a")
	before, _ := e.dp.RuleSet(a.Slot)
	calls := e.ev.calls()
	e.reg.Recompile(context.Background())
	if rs, _ := e.dp.RuleSet(a.Slot); rs.Generation != 1 {
		t.Fatalf("recompiling without changes installed generation %d", rs.Generation)
	}
	// A package upgrade: the new file replaces the old one under the same name.
	os.WriteFile(bin+".new", []byte("#!/bin/sh\n"), 0o755)
	os.Rename(bin+".new", bin)
	e.reg.Recompile(context.Background())
	if e.ev.calls() != calls {
		t.Error("recompiling evaluated the policy")
	}
	after, _ := e.dp.RuleSet(a.Slot)
	if after.Generation != 2 || reflect.DeepEqual(after.Exec, before.Exec) {
		t.Errorf("after the upgrade: %+v (before %+v)", after, before)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func ptr[T any](v T) *T { return &v }

// TestHandoffAttenuates: the receiver of a handed task gets at most the sender's grants, whatever
// the policy gives it; the task keeps the sender's sensitivity and ends no later; the ceiling
// goes with the task; ended tasks are reported.
func TestHandoffAttenuates(t *testing.T) {
	e := newEnv(t)
	var mu sync.Mutex
	var ended []string
	e.reg = New(Options{Dataplane: e.dp, Evaluator: e.ev, Compile: compiler, Parents: []string{"/cg/tether"}, LaunchParent: "/cg/tether", Cgroups: e.cg,
		TaskEnded: func(slot dataplane.Slot, id string, task Task, reason string) {
			mu.Lock()
			ended = append(ended, fmt.Sprintf("%d %s %s", slot, task.ID, reason))
			mu.Unlock()
		}})
	e.cg.ids["/cg/tether/receiver"] = 13
	sender := e.register(t, "spiffe://example.org/a") // 10.0.0.0/8, plus 192.0.2.0/24:1 with a task
	e.ev.set("spiffe://example.org/b", grants.Grants{Egress: []grants.Egress{{CIDR: "10.1.0.0/16"}, {CIDR: "172.16.0.0/12"}}})
	receiver, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/b", Cgroup: "/cg/tether/receiver"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.Handoff(sender.Slot, receiver.Slot, HandoffSpec{TTL: time.Hour}); !errors.Is(err, ErrTask) {
		t.Errorf("handoff without a task: %v", err)
	}
	st, err := e.reg.StartTask(sender.Slot, TaskSpec{Type: "coding", Sensitivity: "confidential", TTL: 30 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.Handoff(sender.Slot, sender.Slot, HandoffSpec{TTL: time.Hour}); !errors.Is(err, ErrInvalid) {
		t.Errorf("handoff to itself: %v", err)
	}
	got, err := e.reg.Handoff(sender.Slot, receiver.Slot, HandoffSpec{TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if got.Task == nil || got.Task.HandoffFrom != "spiffe://example.org/a" || got.Task.Sensitivity != "confidential" ||
		got.Task.Type != "coding" || got.Task.ExpiresAt.After(st.Task.ExpiresAt) || !strings.HasPrefix(got.Task.ID, st.Task.ID+"/handoff-") {
		t.Errorf("handed task %+v (sender's %+v)", got.Task, st.Task)
	}
	// The policy gives b 10.1/16, 172.16/12 and (with the task) 192.0.2.0/24:1; a has 10/8 and
	// 192.0.2.0/24:1: b keeps 10.1/16 and 192.0.2.0/24:1, not 172.16/12.
	rs, _ := e.dp.RuleSet(receiver.Slot)
	var have []string
	for _, eg := range rs.Egress {
		p := eg.Prefix
		if p.Addr().Is4In6() { // the kernel's v4 rules are v4-mapped
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		have = append(have, p.String())
	}
	slices.Sort(have)
	if !slices.Equal(have, []string{"10.1.0.0/16", "192.0.2.0/24"}) {
		t.Errorf("receiver's egress %v, want 10.1.0.0/16 and 192.0.2.0/24", have)
	}
	if _, err := e.reg.Handoff(sender.Slot, receiver.Slot, HandoffSpec{TTL: time.Hour}); !errors.Is(err, ErrTask) {
		t.Errorf("a second handoff to a receiver with a task: %v", err)
	}
	// The task ends: the ceiling goes with it.
	if _, err := e.reg.EndTask(receiver.Slot); err != nil {
		t.Fatal(err)
	}
	rs, _ = e.dp.RuleSet(receiver.Slot)
	if len(rs.Egress) != 2 {
		t.Errorf("after the handed task ended: %d egress entries, want b's own 2", len(rs.Egress))
	}
	waitUntil(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(ended) == 1 && strings.HasSuffix(ended[0], "task ended")
	})
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	for range 200 {
		if cond() {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("condition not met within 1 s")
}

// TestApprovalsAreCountedGrants: an approval is a counted grant in the kernel with its uses and
// expiry, written before the rule that names it; the view shows the uses the kernel has left;
// the grant is cleared when the task ends or the approval expires; a bad use count or a failed
// kernel write changes nothing.
func TestApprovalsAreCountedGrants(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	if _, err := e.reg.StartTask(a.Slot, TaskSpec{Type: "coding", TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.AddApproval(a.Slot, "tcp", "production", "uid:0", time.Hour, -1); !errors.Is(err, ErrInvalid) {
		t.Errorf("negative uses: %v", err)
	}
	e.dp.Fail("SetGrant", 4)
	if _, err := e.reg.AddApproval(a.Slot, "tcp", "production", "uid:0", time.Hour, 2); err == nil {
		t.Error("an approval whose grant the kernel refused was added")
	}
	if got, _ := e.reg.Get(a.Slot); len(got.Task.Approvals) != 0 || len(e.dp.Grants()) != 0 {
		t.Fatalf("after a failed write: approvals %+v, grants %v", got.Task.Approvals, e.dp.Grants())
	}
	got, err := e.reg.AddApproval(a.Slot, "tcp", "production", "uid:0", time.Hour, 2)
	if err != nil {
		t.Fatal(err)
	}
	ap := got.Task.Approvals[0]
	g, ok := e.dp.Grants()[ap.Grant]
	if ap.Grant == 0 || !ok || g.Left != 2 || !g.Expires.Equal(ap.ExpiresAt) {
		t.Fatalf("approval %+v, kernel grants %v", ap, e.dp.Grants())
	}
	rs, _ := e.dp.RuleSet(a.Slot)
	named := 0
	for _, eg := range rs.Egress {
		for _, p := range eg.Ports {
			if p.Grant == ap.Grant {
				named++
			}
		}
	}
	if named != 1 || ap.UsesLeft == nil || *ap.UsesLeft != 2 {
		t.Errorf("%d kernel rules name the grant, uses left %v", named, ap.UsesLeft)
	}
	e.dp.Use(ap.Grant)
	if v, _ := e.reg.Get(a.Slot); *v.Task.Approvals[0].UsesLeft != 1 {
		t.Errorf("after a use: %d left", *v.Task.Approvals[0].UsesLeft)
	}
	e.dp.Use(ap.Grant) // the last: the kernel denies further connects itself
	// Used up, the approval stays until it expires: the connections its uses opened live as
	// long as it does, and an evaluation meanwhile does not end them.
	if _, err := e.reg.RenewTask(a.Slot, time.Hour); err != nil {
		t.Fatal(err)
	}
	v, _ := e.reg.Get(a.Slot)
	if len(v.Task.Approvals) != 1 || *v.Task.Approvals[0].UsesLeft != 0 || len(e.dp.Grants()) != 1 {
		t.Errorf("used up: approvals %+v, grants %v; want the approval kept with no uses left", v.Task.Approvals, e.dp.Grants())
	}
	if rs, _ := e.dp.RuleSet(a.Slot); !slices.ContainsFunc(rs.Egress, func(eg dataplane.Egress) bool {
		return slices.ContainsFunc(eg.Ports, func(p dataplane.PortRule) bool { return p.Grant == ap.Grant })
	}) {
		t.Errorf("no rule names the used-up grant before it expires: %+v", rs.Egress)
	}
	if _, err := e.reg.EndTask(a.Slot); err != nil {
		t.Fatal(err)
	}
	if len(e.dp.Grants()) != 0 {
		t.Errorf("task ended, grants still in force: %v", e.dp.Grants())
	}

}

// TestExpiredApprovalTakesItsGrant: an approval that expires takes its counted grant with it.
func TestExpiredApprovalTakesItsGrant(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	if _, err := e.reg.StartTask(a.Slot, TaskSpec{Type: "coding", TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.AddApproval(a.Slot, "udp", "x", "uid:0", 200*time.Millisecond, 0); err != nil {
		t.Fatal(err)
	}
	if n := len(e.dp.Grants()); n != 1 {
		t.Fatalf("%d grants, want 1", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(e.dp.Grants()) != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if len(e.dp.Grants()) != 0 {
		t.Errorf("approval expired, grant still in force: %v", e.dp.Grants())
	}
}

// TestPolicyChangeWritesOnlyTheRuleSet checks that a policy change rewrites an agent's rule set
// and info but not its flags or binding (a binding walks the cgroup's processes: at 10,000 agents
// that was most of a policy change), that a change of flags is still written, and that after a
// failed write everything is written again.
func TestPolicyChangeWritesOnlyTheRuleSet(t *testing.T) {
	e := newEnv(t)
	a := e.register(t, "spiffe://example.org/a")
	calls := func(do func()) []string {
		t.Helper()
		e.dp.Calls = nil
		do()
		return slices.Clone(e.dp.Calls)
	}
	refresh := func() {
		if err := e.reg.Refresh(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	e.ev.set("spiffe://example.org/a", grants.Grants{Egress: []grants.Egress{{CIDR: "10.1.0.0/16"}}})
	if got := calls(refresh); !slices.Equal(got, []string{"Install", "PutInfo"}) {
		t.Errorf("policy change: kernel calls %v, want [Install PutInfo]", got)
	}
	if got := calls(func() {
		if _, err := e.reg.SetKilled(a.Slot, true); err != nil {
			t.Fatal(err)
		}
	}); !slices.Contains(got, "SetFlags") {
		t.Errorf("kill: kernel calls %v, want SetFlags", got)
	}
	if f, _ := e.dp.Flags(a.Slot); f&dataplane.AgentKilled == 0 {
		t.Errorf("flags after the kill %v", f)
	}
	e.dp.Fail("Install", 4) // every attempt of one write
	e.ev.set("spiffe://example.org/a", grants.Grants{Egress: []grants.Egress{{CIDR: "10.2.0.0/16"}}})
	if err := e.reg.Refresh(context.Background()); err == nil {
		t.Fatal("a policy change whose install failed returned no error")
	}
	if got := calls(e.reg.Reconcile); !slices.Contains(got, "Bind") || !slices.Contains(got, "SetFlags") {
		t.Errorf("after a failed write: kernel calls %v, want everything written again", got)
	}
}

// TestUnregisterTellsBeforeReturning: when Unregister returns, the task's end and the agent's
// removal have been told (the credentials are revoked and the directory gone), so a later agent
// in the same slot never loses its credentials to the earlier one's end.
func TestUnregisterTellsBeforeReturning(t *testing.T) {
	e := newEnv(t)
	var told []string
	e.reg = New(Options{Dataplane: e.dp, Evaluator: e.ev, Compile: compiler, Parents: []string{"/cg/tether"}, LaunchParent: "/cg/tether", Cgroups: e.cg,
		TaskEnded: func(slot dataplane.Slot, id string, task Task, reason string) {
			told = append(told, "ended "+reason)
		},
		Unregistered: func(slot dataplane.Slot) { told = append(told, "unregistered") }})
	a := e.register(t, "spiffe://example.org/a")
	if _, err := e.reg.StartTask(a.Slot, TaskSpec{Type: "coding", TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if err := e.reg.Unregister(a.Slot); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(told, []string{"ended agent unregistered", "unregistered"}) {
		t.Errorf("told by the time Unregister returned: %q", told)
	}
}

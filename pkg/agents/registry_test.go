package agents

import (
	"errors"
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

type source map[string]grants.Grants

func (s source) Grants(id string) (grants.Grants, bool) {
	g, ok := s[id]
	return g, ok
}

type env struct {
	dp  *dataplanetest.Fake
	cg  *fakeCgroups
	src source
	reg *Registry
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{
		dp:  dataplanetest.New(),
		cg:  &fakeCgroups{ids: map[string]uint64{"/cg/tether": 10, "/cg/tether/existing": 11, "/cg/other": 12}},
		src: source{"spiffe://example.org/a": {Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}}}},
	}
	e.reg = New(Options{Dataplane: e.dp, Source: e.src, Compile: compile.RuleSet, Parents: []string{"/cg/tether"},
		LaunchParent: "/cg/tether", Cgroups: e.cg})
	return e
}

func TestRegisterOrder(t *testing.T) {
	e := newEnv(t)
	a, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Launch: true})
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

	if _, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/b", Cgroup: "/cg/tether/existing"}); err == nil || !strings.Contains(err.Error(), "already agent") {
		t.Errorf("second registration of one cgroup: %v", err)
	}
}

func TestUnknownIdentityIsDeniedEverything(t *testing.T) {
	e := newEnv(t)
	a, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/nobody", Cgroup: "/cg/tether/existing"})
	if err != nil {
		t.Fatal(err)
	}
	rs, _ := e.dp.RuleSet(a.Slot)
	if len(rs.Egress)+len(rs.Exec)+len(rs.Unix) != 0 || rs.Mode != dataplane.ModeEnforce {
		t.Errorf("an identity without grants got %+v", rs)
	}
}

func TestWritesAreRetriedAndCounted(t *testing.T) {
	e := newEnv(t)
	e.dp.Fail("Install", 2)
	a, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	if err != nil {
		t.Fatal(err)
	}
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
	a, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	if err != nil {
		t.Fatal(err)
	}
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

func TestBrokenGrantsKeepLastGood(t *testing.T) {
	e := newEnv(t)
	a, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	if err != nil {
		t.Fatal(err)
	}
	e.src["spiffe://example.org/a"] = grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.1/8"}}}
	if err := e.reg.Refresh(); err == nil {
		t.Fatal("refresh with grants that do not compile succeeded")
	}
	rs, _ := e.dp.RuleSet(a.Slot)
	got, _ := e.reg.Get(a.Slot)
	if rs.Generation != 1 || len(rs.Egress) != 1 || got.Generation != 1 || !strings.Contains(got.Error, "stays in force") {
		t.Errorf("installed %+v, agent %+v", rs, got)
	}
	if e.reg.Stats().CompileErrors != 1 {
		t.Errorf("stats %+v", e.reg.Stats())
	}
}

func TestExpiredGrantsDenyEverything(t *testing.T) {
	e := newEnv(t)
	past := time.Now().Add(-time.Minute)
	e.src["spiffe://example.org/a"] = grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}}, ValidUntil: &past}
	a, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	if err != nil {
		t.Fatal(err)
	}
	if rs, _ := e.dp.RuleSet(a.Slot); len(rs.Egress) != 0 {
		t.Errorf("expired grants installed %+v", rs)
	}
}

func TestKilledAndMode(t *testing.T) {
	e := newEnv(t)
	a, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
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

func TestAdopt(t *testing.T) {
	e := newEnv(t)
	live, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	e.reg.SetKilled(live.Slot, true)
	e.cg.ids["/cg/tether/gone"] = 50
	gone, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/gone"})
	delete(e.cg.ids, "/cg/tether/gone")
	e.dp.Bind(777, 3) // a binding nobody recorded

	// A new daemon: same kernel, new registry.
	reg := New(Options{Dataplane: e.dp, Source: e.src, Compile: compile.RuleSet, Parents: []string{"/cg/tether"}, LaunchParent: "/cg/tether", Cgroups: e.cg})
	if err := reg.Adopt(); err != nil {
		t.Fatal(err)
	}
	list := reg.List()
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

func ptr[T any](v T) *T { return &v }

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
	// Late events of the ended agent are still its own.
	if id, _, ok := e.reg.Identity(a.Slot); !ok || id != "spiffe://example.org/a" {
		t.Errorf("identity of the retired slot: %q %v", id, ok)
	}
}

func TestRecheckFollowsReplacedFiles(t *testing.T) {
	dir := t.TempDir()
	bin := dir + "/tool"
	os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755)
	e := newEnv(t)
	e.src["spiffe://example.org/a"] = grants.Grants{Exec: []grants.Exec{{Path: bin}}}
	a, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := e.dp.RuleSet(a.Slot)
	e.reg.Recheck()
	if rs, _ := e.dp.RuleSet(a.Slot); rs.Generation != 1 {
		t.Fatalf("recheck without changes installed generation %d", rs.Generation)
	}
	// A package upgrade: the new file replaces the old one under the same name.
	os.WriteFile(bin+".new", []byte("#!/bin/sh\n"), 0o755)
	os.Rename(bin+".new", bin)
	e.reg.Recheck()
	after, _ := e.dp.RuleSet(a.Slot)
	if after.Generation != 2 || reflect.DeepEqual(after.Exec, before.Exec) {
		t.Errorf("after the upgrade: %+v (before %+v)", after, before)
	}
}

// TestUnregisterRacingRefresh: a reload that runs while an agent is being removed must not write
// it back into the kernel.
func TestUnregisterRacingRefresh(t *testing.T) {
	e := newEnv(t)
	a, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	done := make(chan struct{})
	e.dp.BeforeClear = func() {
		go func() { e.reg.Refresh(); e.reg.Reconcile(); e.reg.Recheck(); close(done) }()
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

// TestAdoptWithBrokenGrants: grants that no longer compile after a restart leave the pinned rule
// set in force, and nothing later tries to install a missing one.
func TestAdoptWithBrokenGrants(t *testing.T) {
	e := newEnv(t)
	a, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	e.src["spiffe://example.org/a"] = grants.Grants{Egress: []grants.Egress{{FQDN: "example.com"}}}
	reg := New(Options{Dataplane: e.dp, Source: e.src, Compile: compile.RuleSet, Parents: []string{"/cg/tether"}, LaunchParent: "/cg/tether", Cgroups: e.cg})
	if err := reg.Adopt(); err == nil {
		t.Fatal("adopting with grants that do not compile reported no error")
	}
	reg.Reconcile()
	reg.Recheck()
	rs, _ := e.dp.RuleSet(a.Slot)
	got, _ := reg.Get(a.Slot)
	if rs.Generation != 1 || len(rs.Egress) != 1 || !got.Synced || got.Error == "" {
		t.Errorf("installed %+v, agent %+v", rs, got)
	}
}

// TestAdoptDropsAgentsOutsideParents: an agent whose parent is no longer configured is not
// hooked any more, so it is not kept.
func TestAdoptDropsAgentsOutsideParents(t *testing.T) {
	e := newEnv(t)
	a, _ := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/existing"})
	reg := New(Options{Dataplane: e.dp, Source: e.src, Compile: compile.RuleSet, Parents: []string{"/cg/other"}, LaunchParent: "/cg/other", Cgroups: e.cg})
	reg.Adopt()
	if len(reg.List()) != 0 {
		t.Errorf("kept %+v", reg.List())
	}
	if _, ok := e.dp.RuleSet(a.Slot); ok {
		t.Error("slot not cleared")
	}
}

package killpath

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// fakeRegistry holds agents in memory.
type fakeRegistry struct {
	mu     sync.Mutex
	agents map[dataplane.Slot]agents.Agent
	ended  []dataplane.Slot
	denied []dataplane.Slot // Deny's calls
}

func (f *fakeRegistry) Get(s dataplane.Slot) (agents.Agent, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, ok := f.agents[s]
	return a, ok
}

func (f *fakeRegistry) Peek(s dataplane.Slot) (agents.Ident, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, ok := f.agents[s]
	return agents.Ident{Slot: a.Slot, SpiffeID: a.SpiffeID, Cgroup: a.Cgroup}, ok
}

func (f *fakeRegistry) Deny(s dataplane.Slot) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.denied = append(f.denied, s)
	return nil
}

func (f *fakeRegistry) List() []agents.Agent {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []agents.Agent
	for _, a := range f.agents {
		out = append(out, a)
	}
	return out
}

func (f *fakeRegistry) Idents() []agents.Ident {
	var out []agents.Ident
	for _, a := range f.List() {
		out = append(out, agents.Ident{Slot: a.Slot, SpiffeID: a.SpiffeID, Cgroup: a.Cgroup})
	}
	return out
}

func (f *fakeRegistry) SetKilled(s dataplane.Slot, k bool) (agents.Agent, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a := f.agents[s]
	a.Killed = k
	f.agents[s] = a
	return a, nil
}

func (f *fakeRegistry) EndTask(s dataplane.Slot) (agents.Agent, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a := f.agents[s]
	if a.Task == nil {
		return a, agents.ErrTask
	}
	a.Task = nil
	f.agents[s] = a
	f.ended = append(f.ended, s)
	return a, nil
}

// TestKillPersistsAndContinues: the revoke step cannot reach SPIRE; the kill is persisted as
// unfinished; a new Killer (a restarted tetherd) on the same state file finishes it once SPIRE
// answers; the SPIFFE ID stays denied; readmit lifts it. No cgroup is touched: the agent's cgroup
// does not exist, so freeze and halt have nothing to do.
// checkKilledButRevokePending: kill x of agent 2 denied, froze and halted it, ended its task and
// denied its identity, recorded one kill record, and left the revoke step (SPIRE down) pending.
func checkKilledButRevokePending(t *testing.T, k *Killer, reg *fakeRegistry, x Kill, recs []events.Decision) {
	t.Helper()
	steps := map[string]StepResult{}
	for _, s := range x.Steps {
		steps[s.Name] = s
	}
	if !steps[StepDeny].Done || !steps[StepFreeze].Done || steps[StepRevoke].Done || !steps[StepHalt].Done || x.Done {
		t.Errorf("steps %+v", x.Steps)
	}
	if a, _ := reg.Get(2); !a.Killed || a.Task != nil {
		t.Errorf("agent after kill: %+v", a)
	}
	// The kernel's flag went through Deny (no registry lock), before the registry recorded it.
	if len(reg.denied) != 1 || reg.denied[0] != 2 {
		t.Errorf("Deny calls %v, want [2]", reg.denied)
	}
	if b, _ := reg.Get(3); b.Killed {
		t.Error("another agent was killed")
	}
	if !k.IsDenied("spiffe://x.org/a") || k.IsDenied("spiffe://x.org/b") {
		t.Error("deny list")
	}
	if len(recs) != 1 || recs[0].Kind != "kill" || recs[0].Kill == nil || len(recs[0].Kill.Steps) != 4 || recs[0].Kill.Done {
		t.Errorf("records %+v", recs)
	}
	if p := k.Pending(); len(p) != 1 || p[0].ID != x.ID {
		t.Fatalf("pending %+v", p)
	}
}

func TestKillPersistsAndContinues(t *testing.T) {
	dir := t.TempDir()
	reg := &fakeRegistry{agents: map[dataplane.Slot]agents.Agent{
		2: {Slot: 2, SpiffeID: "spiffe://x.org/a", Cgroup: filepath.Join(dir, "no-such-cgroup"), Task: &agents.Task{TaskInfo: agents.TaskInfo{ID: "t1"}}},
		3: {Slot: 3, SpiffeID: "spiffe://x.org/b", Cgroup: filepath.Join(dir, "other")},
	}}
	var mu sync.Mutex
	spireUp := false
	deleted := 0
	del := func(ctx context.Context, id string) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		if !spireUp {
			return 0, errors.New("SPIRE server unreachable")
		}
		deleted++
		return 1, nil
	}
	var recs []events.Decision
	state := filepath.Join(dir, "kill-state.json")
	k, err := New(Options{Registry: reg, StateFile: state, DeleteEntries: del, Retry: time.Hour, Emit: func(e events.Decision) { recs = append(recs, e) }})
	if err != nil {
		t.Fatal(err)
	}
	x, err := k.Kill(context.Background(), Request{Slot: 2, Reason: "exfiltration", Requester: "uid:0", Terminate: true})
	if err != nil {
		t.Fatal(err)
	}
	checkKilledButRevokePending(t, k, reg, x, recs)

	// tetherd dies; a new one starts with SPIRE back.
	mu.Lock()
	spireUp = true
	mu.Unlock()
	k2, err := New(Options{Registry: reg, StateFile: state, DeleteEntries: del, Retry: time.Hour, Emit: func(e events.Decision) { recs = append(recs, e) }})
	if err != nil {
		t.Fatal(err)
	}
	if !k2.IsDenied("spiffe://x.org/a") {
		t.Error("the deny list did not survive the restart")
	}
	reg.SetKilled(2, false) // as if the kernel had lost the flag: Continue sets it again
	k2.Continue(context.Background())
	deadline := time.Now().Add(5 * time.Second)
	for len(k2.Pending()) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if len(k2.Pending()) != 0 || deleted != 1 {
		t.Fatalf("the restarted killer did not finish: pending %+v, %d deletions", k2.Pending(), deleted)
	}
	if a, _ := reg.Get(2); !a.Killed {
		t.Error("a denied identity's agent is not killed after the restart")
	}
	// Killing again is harmless: every step is done again, and done.
	x2, err := k2.Kill(context.Background(), Request{Slot: 2, Reason: "again", Requester: "uid:0"})
	if err != nil || !x2.Done {
		t.Errorf("second kill: %+v %v", x2, err)
	}
	if _, err := k2.Readmit("spiffe://x.org/a"); err != nil {
		t.Fatal(err)
	}
	if a, _ := reg.Get(2); a.Killed || k2.IsDenied("spiffe://x.org/a") {
		t.Error("readmit did not lift the kill")
	}
	if _, err := k2.Readmit("spiffe://x.org/a"); err == nil {
		t.Error("readmitting an identity that is not denied")
	}
	if _, err := k2.Kill(context.Background(), Request{Slot: 9, Reason: "x"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("kill of no agent: %v", err)
	}
	if _, err := k2.Kill(context.Background(), Request{Slot: 2}); err == nil {
		t.Error("kill without a reason")
	}
}

// TestPrivilegedFreezeForkBomb: a fork bomb (bounded, see below) is frozen while it forks, within
// the deadline; it forks no more; a sibling cgroup's process keeps running; halt empties it.
func TestPrivilegedFreezeForkBomb(t *testing.T) {
	privtest.Gate(t)
	root := privtest.Cgroup(t)
	bomb, _ := privtest.SubCgroup(t, root, "bomb")
	sibling, _ := privtest.SubCgroup(t, root, "sibling")
	// Bounded twice: pids.max where the pids controller is on this hierarchy (on a hybrid
	// layout it may be on v1), and by construction: the recursion stops at depth 9 (1,023
	// shells at most).
	if os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+pids"), 0) == nil {
		os.WriteFile(filepath.Join(bomb, "pids.max"), []byte("1100"), 0)
	}
	// Every shell forks two more as fast as it can, down to depth 9, then they all sleep.
	privtest.Start(t, bomb, "sh", "-c", `f() { if [ "$1" -gt 0 ]; then f $(($1-1)) & f $(($1-1)) & fi; sleep 30; wait; }; f 9`)
	sib := privtest.Start(t, sibling, "sleep", "60")
	t.Cleanup(func() {
		cgroups.Kill(bomb)
		writeFreeze(bomb, false)
	})
	time.Sleep(100 * time.Millisecond) // freeze it while it grows
	t0 := time.Now()
	detail, err := Freeze(bomb, 5*time.Second)
	took := time.Since(t0)
	if err != nil {
		t.Fatal(err)
	}
	n := len(cgroups.Procs(bomb))
	time.Sleep(200 * time.Millisecond)
	if m := len(cgroups.Procs(bomb)); m != n {
		t.Errorf("the frozen fork bomb went from %d to %d processes", n, m)
	}
	t.Logf("froze a fork bomb of %d processes in %s (%s)", n, took, detail)
	if frozen, _ := isFrozen(sibling); frozen {
		t.Error("the sibling cgroup was frozen")
	}
	if err := sib.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the sibling's process: %v", err)
	}
	// Halt: a frozen subtree dies on cgroup.kill.
	if err := cgroups.Kill(bomb); err != nil {
		t.Fatal(err)
	}
	writeFreeze(bomb, false)
	if err := cgroups.WaitEmpty(bomb, 5*time.Second); err != nil {
		t.Errorf("after halt: %v", err)
	}
}

// TestTargetsNameAgents: a kill names its agents by exactly one of slot, SPIFFE ID (every agent
// with it), task ID or process; nothing else, and no agent, is an error.
func TestTargetsNameAgents(t *testing.T) {
	dir := t.TempDir()
	reg := &fakeRegistry{agents: map[dataplane.Slot]agents.Agent{
		2: {Slot: 2, SpiffeID: "spiffe://x.org/a", Cgroup: filepath.Join(dir, "a"), Task: &agents.Task{TaskInfo: agents.TaskInfo{ID: "t1"}}},
		3: {Slot: 3, SpiffeID: "spiffe://x.org/a", Cgroup: filepath.Join(dir, "b")},
		4: {Slot: 4, SpiffeID: "spiffe://x.org/c", Cgroup: filepath.Join(dir, "c")},
	}}
	k, err := New(Options{Registry: reg, StateFile: filepath.Join(dir, "state.json")})
	if err != nil {
		t.Fatal(err)
	}
	four := dataplane.Slot(4)
	for _, tc := range []struct {
		t    Target
		want []dataplane.Slot
		err  error
	}{
		{Target{SpiffeID: "spiffe://x.org/a"}, []dataplane.Slot{2, 3}, nil},
		{Target{TaskID: "t1"}, []dataplane.Slot{2}, nil},
		{Target{Slot: &four}, []dataplane.Slot{4}, nil},
		{Target{SpiffeID: "spiffe://x.org/none"}, nil, agents.ErrNotFound},
		{Target{Slot: &four, TaskID: "t1"}, nil, agents.ErrInvalid},
		{Target{}, nil, agents.ErrInvalid},
	} {
		got, err := k.targets(tc.t)
		if !errors.Is(err, tc.err) || !slices.Equal(got, tc.want) {
			t.Errorf("%+v: %v %v, want %v %v", tc.t, got, err, tc.want, tc.err)
		}
	}
}

// TestRespondKillsOnce: a decision the respond policy answered with freeze or kill runs the kill
// path on its agent (halting it for kill only); none does nothing, and an agent already killed
// is left alone.
func TestRespondKillsOnce(t *testing.T) {
	dir := t.TempDir()
	reg := &fakeRegistry{agents: map[dataplane.Slot]agents.Agent{
		2: {Slot: 2, SpiffeID: "spiffe://x.org/a", Cgroup: filepath.Join(dir, "a")},
		3: {Slot: 3, SpiffeID: "spiffe://x.org/b", Cgroup: filepath.Join(dir, "b"), Killed: true},
	}}
	kills := make(chan events.Decision, 4)
	k, err := New(Options{Registry: reg, StateFile: filepath.Join(dir, "state.json"), Emit: func(e events.Decision) { kills <- e }})
	if err != nil {
		t.Fatal(err)
	}
	rec := func(slot dataplane.Slot, resp events.Response) events.Decision {
		return events.Decision{Slot: &slot, Kind: "connect4", Verdict: events.VerdictDeny, Destination: "192.0.2.1:443", DecisionID: "d1", Response: resp}
	}
	k.Respond(rec(2, events.ResponseNone))
	k.Respond(rec(3, events.ResponseKill))
	k.Respond(rec(2, events.ResponseFreeze))
	select {
	case e := <-kills:
		if *e.Slot != 2 || e.Kill == nil || e.Kill.Terminate || e.Kill.Requester != "policy:respond" ||
			e.Reason != "respond policy said freeze after deny connect4 192.0.2.1:443 (decision d1)" {
			t.Errorf("kill record %+v %+v", e, e.Kill)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no kill after a freeze response")
	}
	select {
	case e := <-kills:
		t.Errorf("another kill: %+v", e)
	case <-time.After(200 * time.Millisecond):
	}
}

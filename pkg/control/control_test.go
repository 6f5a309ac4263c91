package control

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/confine"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/dataplane/dataplanetest"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/stepup"
)

// memCgroups are agent cgroups in memory: every path below /cg exists once made.
type memCgroups struct {
	mu  sync.Mutex
	ids map[string]uint64
}

func (c *memCgroups) ID(path string) (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if id, ok := c.ids[path]; ok {
		return id, nil
	}
	return 0, os.ErrNotExist
}

func (c *memCgroups) Mkdir(path string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.ids[path]; ok {
		return os.ErrExist
	}
	c.ids[path] = uint64(100 + len(c.ids))
	return nil
}

func (c *memCgroups) Remove(path string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.ids, path)
	return nil
}

func (c *memCgroups) DepthLimited(string) bool { return true }

// strict grants every agent an address and the strict sandbox.
type strict struct{}

func (strict) Grants(context.Context, agents.Context) (grants.Grants, error) {
	return grants.Grants{Egress: []grants.Egress{{CIDR: "192.0.2.0/24"}}, Sandbox: "strict"}, nil
}

type env struct {
	ctl      *Agents
	creds    *credentials.Lifecycle
	answer   stepup.Answer
	recorded []events.Decision
	asked    []string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	iss, err := credentials.New(credentials.Options{KeyFile: filepath.Join(dir, "key.pem"), Dir: filepath.Join(dir, "creds"), Issuer: "tether://test", TTL: time.Minute, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{creds: credentials.NewLifecycle(iss, log)}
	reg := agents.New(agents.Options{Dataplane: dataplanetest.New(), Evaluator: strict{}, Compile: agents.CompileOn(compile.Options{Files: compile.OS{}}),
		Parents: []string{"/cg/tether"}, LaunchParent: "/cg/tether", Cgroups: &memCgroups{ids: map[string]uint64{"/cg/tether": 10, "/cg/tether/bound": 11}},
		TaskEnded: e.creds.Ended, Unregistered: e.creds.Unregistered, UIDs: agents.UIDRange{First: 70000, Last: 70100}, Logger: log})
	t.Cleanup(reg.Close)
	e.creds.Tasks = reg
	cfg := &config.Loaded{}
	cfg.Identity.TrustDomains = []string{"example.org"}
	cfg.Credentials.Dir = filepath.Join(dir, "creds")
	cfg.API.Socket, cfg.API.AgentSocket = "/run/tether/api.sock", "/run/tether/agent.sock"
	e.ctl = New(Options{Registry: reg, Credentials: e.creds, Config: func() *config.Loaded { return cfg }, Log: log,
		Stepup: func(_ context.Context, _ dataplane.Slot, action, resource, _ string) (stepup.Answer, error) {
			e.asked = append(e.asked, action+" "+resource)
			return e.answer, nil
		},
		Respond: func(rec *events.Decision) { rec.Response = events.Response("kill") },
		Emit:    func(rec events.Decision) { e.recorded = append(e.recorded, rec) },
	})
	t.Cleanup(e.ctl.Close)
	return e
}

var task = &agents.TaskSpec{Type: "research", TTL: time.Hour}

// TestRegisterChecksTheTrustDomainAndIssues: an identity outside the configured trust domains is
// refused before the registry sees it; an agent registered with a task has its credential when
// Register returns, and so has a task started later.
func TestRegisterChecksTheTrustDomainAndIssues(t *testing.T) {
	e := newEnv(t)
	if _, err := e.ctl.Register(agents.Registration{SpiffeID: "spiffe://elsewhere.org/a", Cgroup: "/cg/tether/bound"}); err == nil {
		t.Fatal("an identity of another trust domain was registered")
	}
	if n := len(e.ctl.List()); n != 0 {
		t.Fatalf("a refused registration left %d agents", n)
	}
	a, err := e.ctl.Register(agents.Registration{SpiffeID: "spiffe://example.org/a", Cgroup: "/cg/tether/bound", Task: task})
	if err != nil {
		t.Fatal(err)
	}
	first, err := e.creds.TaskCredential(a.Slot)
	if err != nil {
		t.Fatalf("registered with a task, no credential: %v", err)
	}
	if _, err := e.ctl.EndTask(a.Slot); err != nil {
		t.Fatal(err)
	}
	// The ended task's credential is revoked (the registry tells it after EndTask returns).
	for deadline := time.Now().Add(5 * time.Second); !slices.ContainsFunc(e.creds.Revoked(), func(r credentials.Revocation) bool { return r.ID == first.ID }); {
		if time.Now().After(deadline) {
			t.Fatalf("the ended task's credential %s was not revoked", first.ID)
		}
		time.Sleep(10 * time.Millisecond)
	}
	a, err = e.ctl.StartTask(a.Slot, *task)
	if err != nil {
		t.Fatal(err)
	}
	cred, err := e.creds.TaskCredential(a.Slot)
	if err != nil || cred.TaskID != a.Task.ID {
		t.Fatalf("the started task's credential: %+v, %v (task %s)", cred, err, a.Task.ID)
	}
}

// TestHandoffFollowsThePolicy: a handoff the policy refuses (or would have wait for an approver)
// changes nothing and is stepup.ErrRefused; an allowed one gives the receiver the task and its
// credential; a stale sender credential is refused before the policy is asked.
func TestHandoffFollowsThePolicy(t *testing.T) {
	e := newEnv(t)
	sender, err := e.ctl.Register(agents.Registration{SpiffeID: "spiffe://example.org/sender", Cgroup: "/cg/tether/bound", Task: task})
	if err != nil {
		t.Fatal(err)
	}
	receiver, err := e.ctl.Register(agents.Registration{SpiffeID: "spiffe://example.org/receiver", Launch: true, UID: 70001})
	if err != nil {
		t.Fatal(err)
	}
	cred, err := e.creds.TaskCredential(sender.Slot)
	if err != nil {
		t.Fatal(err)
	}
	spec := agents.HandoffSpec{Type: "research", TTL: 10 * time.Minute}
	if _, _, err := e.ctl.Handoff(context.Background(), sender.Slot, receiver.Slot, "not-the-token", spec); err == nil || len(e.asked) != 0 {
		t.Fatalf("a wrong credential: err %v, policy asked %v", err, e.asked)
	}
	for _, refuse := range []stepup.Answer{{Reason: "no"}, {Allowed: true, NeedsApproval: true}} {
		e.answer = refuse
		if _, _, err := e.ctl.Handoff(context.Background(), sender.Slot, receiver.Slot, cred.Token, spec); !errors.Is(err, stepup.ErrRefused) {
			t.Fatalf("policy answer %+v: err %v, want stepup.ErrRefused", refuse, err)
		}
		if a, _ := e.ctl.Get(receiver.Slot); a.Task != nil {
			t.Fatalf("a refused handoff gave the receiver task %s", a.Task.ID)
		}
	}
	if want := "handoff " + receiver.SpiffeID; e.asked[0] != want {
		t.Fatalf("the policy was asked %q, want %q", e.asked[0], want)
	}
	e.answer = stepup.Answer{Allowed: true}
	got, gotCred, err := e.ctl.Handoff(context.Background(), sender.Slot, receiver.Slot, cred.Token, spec)
	if err != nil {
		t.Fatal(err)
	}
	if got.Task == nil || got.Task.HandoffFrom != sender.SpiffeID || gotCred.TaskID != got.Task.ID {
		t.Fatalf("handed over: task %+v, credential %+v", got.Task, gotCred)
	}
}

// TestLaunchedOnly: the confinement plan and the refusal records are for launched agents only; a
// launched agent's plan has its profile, uid, credential directory and hides tether's sockets but
// not the agent socket; a refusal is answered by the respond policy and then recorded.
func TestLaunchedOnly(t *testing.T) {
	e := newEnv(t)
	bound, err := e.ctl.Register(agents.Registration{SpiffeID: "spiffe://example.org/bound", Cgroup: "/cg/tether/bound"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.ctl.Confinement(bound.Slot); !errors.Is(err, agents.ErrInvalid) {
		t.Fatalf("the plan of an agent tetherctl did not launch: %v, want agents.ErrInvalid", err)
	}
	if err := e.ctl.RecordRefusal(bound.Slot, 1, "bpf", "", "EPERM"); !errors.Is(err, agents.ErrInvalid) || len(e.recorded) != 0 {
		t.Fatalf("a refusal for an agent tetherctl did not launch: %v, %d records", err, len(e.recorded))
	}
	if _, err := e.ctl.Confinement(99); !errors.Is(err, agents.ErrNotFound) {
		t.Fatalf("no agent: %v, want agents.ErrNotFound", err)
	}
	launched, err := e.ctl.Register(agents.Registration{SpiffeID: "spiffe://example.org/launched", Launch: true, UID: 70002})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := e.ctl.Confinement(launched.Slot)
	if err != nil {
		t.Fatal(err)
	}
	if plan.Profile != confine.Strict || plan.UID != 70002 || plan.Credentials == "" ||
		!slices.Contains(plan.Hide, "/run/tether/api.sock") || slices.Contains(plan.Hide, "/run/tether/agent.sock") {
		t.Fatalf("plan %+v", plan)
	}
	if err := e.ctl.RecordRefusal(launched.Slot, 1234, "bpf", "BPF_PROG_LOAD", "EPERM"); err != nil {
		t.Fatal(err)
	}
	if len(e.recorded) != 1 || e.recorded[0].Kind != events.KindSyscall || e.recorded[0].Response != "kill" || e.recorded[0].PID != 1234 {
		t.Fatalf("records %+v", e.recorded)
	}
}

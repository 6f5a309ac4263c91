package agents

import (
	"errors"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/grants"
)

// clock is a settable clock for Options.Now.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time          { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }
func newClock() *clock                   { return &clock{now: time.Date(2026, 12, 6, 9, 0, 0, 0, time.UTC)} }
func (e *env) withClock(c *clock) *Registry {
	return New(Options{Dataplane: e.dp, Evaluator: e.ev, Compile: compiler, Parents: []string{"/cg/tether"}, LaunchParent: "/cg/tether", Cgroups: e.cg, Now: c.Now})
}

// A task lives at most its grants' max_lifetime, however often it is renewed.
func TestRenewalsStopAtMaxLifetime(t *testing.T) {
	e := newEnv(t)
	c := newClock()
	e.reg = e.withClock(c)
	e.ev.set("spiffe://example.org/a", grants.Grants{MaxLifetime: "1h"})
	a := e.register(t, "spiffe://example.org/a")
	started, err := e.reg.StartTask(a.Slot, TaskSpec{Type: "coding", TTL: 2 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	end := c.Now().Add(time.Hour)
	if !started.Task.NotAfter.Equal(end) || !started.Task.ExpiresAt.Equal(end) {
		t.Fatalf("task started with a 2h ttl and a 1h max_lifetime: expires %v, not after %v; want both %v", started.Task.ExpiresAt, started.Task.NotAfter, end)
	}
	for range 5 {
		c.advance(10 * time.Minute)
		got, err := e.reg.RenewTask(a.Slot, 30*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if got.Task.ExpiresAt.After(end) {
			t.Fatalf("renewed past max_lifetime: %v", got.Task.ExpiresAt)
		}
	}
	c.advance(10 * time.Minute) // the hour is up
	// Refused as past the lifetime, or, when the task's expiry timer (real time, due at once on
	// the advanced clock) has ended it first, as no task: either way no renewal past the hour.
	if _, err := e.reg.RenewTask(a.Slot, time.Minute); !errors.Is(err, ErrTask) ||
		!strings.Contains(err.Error(), "cannot be renewed past") && !strings.Contains(err.Error(), "has no task") {
		t.Errorf("renewal at the end of the lifetime: %v", err)
	}
	// A policy that shortens the lifetime shortens the running task.
	c2 := newClock()
	e2 := newEnv(t)
	e2.reg = e2.withClock(c2)
	b := e2.register(t, "spiffe://example.org/a")
	if _, err := e2.reg.StartTask(b.Slot, TaskSpec{Type: "coding", TTL: 20 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	c2.advance(2 * time.Hour)
	e2.ev.set("spiffe://example.org/a", grants.Grants{MaxLifetime: "90m"})
	e2.reg.Refresh(t.Context())
	if got, _ := e2.reg.Get(b.Slot); got.Task != nil {
		t.Errorf("task past a shortened lifetime still runs: %+v", got.Task)
	}
	// An unknown lifetime is refused, and is one minute.
	e2.ev.set("spiffe://example.org/a", grants.Grants{MaxLifetime: "forever"})
	got, err := e2.reg.StartTask(b.Slot, TaskSpec{Type: "coding", TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !got.Task.NotAfter.Equal(c2.Now().Add(time.Minute)) || !strings.Contains(strings.Join(got.Refused, " "), "max_lifetime") {
		t.Errorf("max_lifetime forever: not after %v, refused %v", got.Task.NotAfter, got.Refused)
	}
}

// A handed-over task is never renewed past its sender's task.
func TestHandedTaskEndsWithSender(t *testing.T) {
	e := newEnv(t)
	c := newClock()
	e.reg = e.withClock(c)
	e.cg.ids["/cg/tether/receiver"] = 13
	sender := e.register(t, "spiffe://example.org/a")
	receiver, err := e.reg.Register(Registration{SpiffeID: "spiffe://example.org/b", Cgroup: "/cg/tether/receiver"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.StartTask(sender.Slot, TaskSpec{Type: "coding", TTL: 10 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.Handoff(sender.Slot, receiver.Slot, HandoffSpec{TTL: 10 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	// The sender renews: the receiver may follow it, never pass it.
	c.advance(5 * time.Minute)
	if _, err := e.reg.RenewTask(sender.Slot, 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	got, err := e.reg.RenewTask(receiver.Slot, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if want := c.Now().Add(10 * time.Minute); !got.Task.ExpiresAt.Equal(want) {
		t.Errorf("receiver renewed to %v, want the sender's expiry %v", got.Task.ExpiresAt, want)
	}
	// The sender's task ends: the receiver's cannot be renewed past its last expiry.
	if _, err := e.reg.EndTask(sender.Slot); err != nil {
		t.Fatal(err)
	}
	c.advance(9 * time.Minute)
	got, err = e.reg.RenewTask(receiver.Slot, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if want := c.Now().Add(time.Minute); !got.Task.ExpiresAt.Equal(want) {
		t.Errorf("receiver renewed to %v after the sender's task ended, want %v", got.Task.ExpiresAt, want)
	}
	c.advance(time.Minute)
	if _, err := e.reg.RenewTask(receiver.Slot, time.Hour); err == nil {
		t.Error("receiver renewed past its sender's task")
	}
}

// Launched agents without a user get a uid of their own; a uid is shared only when asked.
func TestDynamicUIDs(t *testing.T) {
	e := newEnv(t)
	hostTaken := map[uint32]bool{5001: true} // a user or a process has it
	e.reg = New(Options{Dataplane: e.dp, Evaluator: e.ev, Compile: compiler, Parents: []string{"/cg/tether"}, LaunchParent: "/cg/tether", Cgroups: e.cg,
		UIDs: UIDRange{First: 5000, Last: 5003}, UIDsInUse: func() (map[uint32]bool, error) {
			out := map[uint32]bool{}
			for k, v := range hostTaken {
				out[k] = v
			}
			return out, nil
		}})
	launch := func(r Registration) (Agent, error) {
		r.SpiffeID, r.Launch = "spiffe://example.org/a", true
		return e.reg.Register(r)
	}
	var uids []uint32
	var slots []Agent
	for range 3 {
		a, err := launch(Registration{DynamicUID: true})
		if err != nil {
			t.Fatal(err)
		}
		if !a.DynamicUID {
			t.Error("view does not say the uid is dynamic")
		}
		uids, slots = append(uids, a.UID), append(slots, a)
	}
	if uids[0] != 5000 || uids[1] != 5002 || uids[2] != 5003 {
		t.Fatalf("dynamic uids %v, want 5000 5002 5003 (5001 is the host's)", uids)
	}
	if _, err := launch(Registration{DynamicUID: true}); err == nil || !strings.Contains(err.Error(), "no free uid") {
		t.Errorf("a fourth agent in a range of three free uids: %v", err)
	}
	// A uid comes back when its agent is gone, and is handed out as late as possible.
	if err := e.reg.Unregister(slots[0].Slot); err != nil {
		t.Fatal(err)
	}
	if a, err := launch(Registration{DynamicUID: true}); err != nil || a.UID != 5000 {
		t.Errorf("after the first agent ended: uid %d (%v), want 5000", a.UID, err)
	}
	// A named uid another live agent has: refused unless shared.
	if _, err := launch(Registration{UID: 5002}); !errors.Is(err, ErrUIDTaken) {
		t.Errorf("launch as another agent's uid: %v", err)
	}
	if _, err := launch(Registration{UID: 5002, ShareUID: true}); err != nil {
		t.Errorf("launch sharing a uid on purpose: %v", err)
	}
	if _, err := launch(Registration{UID: 65534}); err != nil {
		t.Errorf("launch as a uid no agent has: %v", err)
	}
	// No range: no dynamic uids.
	e2 := newEnv(t)
	if _, err := e2.reg.Register(Registration{SpiffeID: "spiffe://example.org/a", Launch: true, DynamicUID: true}); !errors.Is(err, ErrInvalid) {
		t.Errorf("dynamic uid without a range: %v", err)
	}
}

// TestHostUIDs: the uids in use are those of /etc/passwd and those of every running process, of
// any of its four uids: a process running as a uid no account has makes that uid taken.
func TestHostUIDs(t *testing.T) {
	got, err := hostUIDs()
	if err != nil {
		t.Fatal(err)
	}
	if !got[0] {
		t.Error("root's uid is not in use on this host")
	}
	privtest.Gate(t)
	const stray = 3999771 // in no /etc/passwd
	if got[stray] {
		t.Fatalf("uid %d is in use before the test's process runs", stray)
	}
	cmd := exec.Command("/bin/sh", "-c", "sleep 30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: stray, Gid: 0, NoSetGroups: true}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if got, err = hostUIDs(); err != nil || !got[stray] {
		t.Errorf("the uid %d of running process %d is not taken (%v)", stray, cmd.Process.Pid, err)
	}
}

// Package control is what the API does to agents where the registry alone does not say it all:
// a registration checked against the trust domains and its launcher watched, every started task
// (at registration, by StartTask, by a handoff) given its credential before the call returns, a
// handoff the policy allowed, a launched agent's confinement plan and the system calls its
// launcher's filter refused, and launched agents whose launcher is gone removed.
package control

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/confine"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/stepup"
)

// Options are what the agents' control acts through.
type Options struct {
	Registry    *agents.Registry
	Credentials *credentials.Lifecycle
	// Stepup asks the policy whether a handoff may be made (action "handoff").
	Stepup stepup.Decider
	// Config is the configuration in force (trust domains, the paths launched agents do not see).
	Config func() *config.Loaded
	// Respond completes a record and has the respond policy answer it; Emit logs it.
	Respond func(*events.Decision)
	Emit    func(events.Decision)
	Log     *slog.Logger
}

// Agents is the registry as the API acts on it.
type Agents struct {
	*agents.Registry
	o      Options
	reaper *reaper
}

// New returns the agents' control; Close releases the launchers it watches.
func New(o Options) *Agents {
	return &Agents{Registry: o.Registry, o: o, reaper: newReaper()}
}

// Close stops watching launchers.
func (c *Agents) Close() { c.reaper.close() }

// Sweep removes the launched agents that ended without their launcher removing them.
func (c *Agents) Sweep() { c.reaper.sweep(c.Registry, c.o.Log) }

// Register registers an agent (see agents.Registry.Register) whose SPIFFE ID is in a configured
// trust domain, watches its launcher, and issues its task's credential when it has a task.
func (c *Agents) Register(r agents.Registration) (agents.Agent, error) {
	if err := c.o.Config().Identity.CheckTrustDomain(r.SpiffeID); err != nil {
		return agents.Agent{}, err
	}
	a, err := c.Registry.Register(r)
	if err != nil {
		return a, err
	}
	if r.Launch && r.LauncherPID > 0 {
		c.reaper.watch(a.Slot, r.LauncherPID)
	}
	if a.Task != nil {
		if _, err := c.o.Credentials.IssueFor(context.Background(), a); err != nil {
			c.o.Log.Error("issuing a task credential", "slot", a.Slot, "error", err)
			return a, fmt.Errorf("agent %d registered, but its task credential was not issued: %w", a.Slot, err)
		}
	}
	return a, nil
}

// StartTask starts a task (see agents.Registry.StartTask) and issues its credential.
func (c *Agents) StartTask(slot dataplane.Slot, t agents.TaskSpec) (agents.Agent, error) {
	a, err := c.Registry.StartTask(slot, t)
	if err != nil {
		return a, err
	}
	if _, err := c.o.Credentials.IssueFor(context.Background(), a); err != nil {
		c.o.Log.Error("issuing a task credential", "slot", a.Slot, "error", err)
		return a, fmt.Errorf("task %s started, but its credential was not issued: %w", a.Task.ID, err)
	}
	return a, nil
}

// Handoff hands agent from's task (or a part of it) to agent to. The caller presents the
// sender's current task credential; the policy must allow the handoff (data.tether.stepup with
// action "handoff" and the receiver's SPIFFE ID as resource, for the sender's context); the
// receiver then gets a task derived from the sender's, a credential for it, and grants that are at
// most what the sender has. Both identities are in the log.
func (c *Agents) Handoff(ctx context.Context, from, to dataplane.Slot, presented string, spec agents.HandoffSpec) (agents.Agent, credentials.Credential, error) {
	sender, ok := c.Get(from)
	if !ok {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("%w: slot %d (sender)", agents.ErrNotFound, from)
	}
	receiver, ok := c.Get(to)
	if !ok {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("%w: slot %d (receiver)", agents.ErrNotFound, to)
	}
	if err := c.o.Credentials.CheckAgent(sender, presented); err != nil {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("the sender's credential: %w", err)
	}
	dec, err := c.o.Stepup(ctx, from, "handoff", receiver.SpiffeID, "handoff of task "+sender.Task.ID)
	if err != nil {
		return agents.Agent{}, credentials.Credential{}, err
	}
	if !dec.Allowed || dec.NeedsApproval {
		c.o.Log.Warn("handoff refused", "from", sender.SpiffeID, "to", receiver.SpiffeID, "task", sender.Task.ID, "reason", dec.Reason)
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("%w: the policy does not allow %s to hand task %s to %s: %s",
			stepup.ErrRefused, sender.SpiffeID, sender.Task.ID, receiver.SpiffeID, dec.Reason)
	}
	a, err := c.Registry.Handoff(from, to, spec)
	if err != nil {
		return a, credentials.Credential{}, err
	}
	cred, err := c.o.Credentials.IssueFor(ctx, a)
	if err != nil {
		return a, credentials.Credential{}, fmt.Errorf("task handed over, but its credential was not issued: %w", err)
	}
	c.o.Log.Info("handoff", "from_slot", from, "from", sender.SpiffeID, "from_task", sender.Task.ID, "to_slot", to, "to", a.SpiffeID, "task", a.Task.ID, "credential", cred.ID)
	return a, cred, nil
}

// launched is the agent in slot, when tetherctl run launched it (what, says why another is refused).
func (c *Agents) launched(slot dataplane.Slot, what string) (agents.Agent, error) {
	a, ok := c.Get(slot)
	if !ok {
		return a, fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	if !a.Launched {
		return a, fmt.Errorf("%w: agent %d was not launched by tetherctl run: %s", agents.ErrInvalid, slot, what)
	}
	return a, nil
}

// Confinement is what `tetherctl run` does to the launched agent in slot before its command
// runs: the profile its grants name, its uid, and the paths to hide and to make read-only. The
// launcher asks right after registering the agent; the agent's own credential directory is made
// then, so that it is there to be bound into the agent's view.
func (c *Agents) Confinement(slot dataplane.Slot) (confine.Plan, error) {
	a, err := c.launched(slot, "its processes are not tether's to confine")
	if err != nil {
		return confine.Plan{}, err
	}
	profile, err := confine.ParseProfile(a.Sandbox)
	if err != nil {
		return confine.Plan{}, err
	}
	cfg := c.o.Config()
	plan := confine.Plan{Profile: profile, Cgroup: a.Cgroup, UID: a.UID, GID: a.UID, Hide: cfg.HiddenPaths(), ReadOnly: c.ExecFiles(slot)}
	own, err := c.o.Credentials.Prepare(slot, a.UID)
	if err != nil {
		return confine.Plan{}, err
	}
	plan.CredentialDir, plan.Credentials = filepath.Clean(cfg.Credentials.Dir), own
	return plan, plan.Validate()
}

// RecordRefusal records a system call the launcher's seccomp filter refused to the launched agent
// in slot (its launcher reports it): a decision of kind "syscall", verdict deny, reason the
// sandbox profile. The respond policy is asked about it like about the kernel's denials.
func (c *Agents) RecordRefusal(slot dataplane.Slot, pid uint32, syscall, detail, errno string) error {
	a, err := c.launched(slot, "no launcher filters its calls")
	if err != nil {
		return err
	}
	rec := events.SyscallRefused(events.Agent{SpiffeID: a.SpiffeID, Slot: slot, CgroupID: a.CgroupID}, pid, a.UID, syscall, detail, a.Sandbox, errno)
	rec.DecisionID, rec.Timestamp = events.NewID(), time.Now().UTC()
	c.o.Respond(&rec) // the task, the revision, and what the respond policy says
	c.o.Emit(rec)
	return nil
}

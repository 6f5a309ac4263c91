package daemon

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/confine"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// launchUIDs is the range dynamic agent uids come from (checked by config.Load).
func launchUIDs(cfg *config.Loaded) agents.UIDRange {
	first, last, _ := cfg.Confinement.UIDRange()
	return agents.UIDRange{First: first, Last: last}
}

// Confinement is what `tetherctl run` does to the launched agent in slot before its command
// runs: the profile its grants name, its uid, and the paths to hide and to make read-only. The
// launcher asks right after registering the agent; the agent's own credential directory is made
// then, so that it is there to be bound into the agent's view.
func (d *Daemon) Confinement(slot dataplane.Slot) (confine.Plan, error) {
	a, ok := d.registry.Get(slot)
	if !ok {
		return confine.Plan{}, fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	if !a.Launched {
		return confine.Plan{}, fmt.Errorf("%w: agent %d was not launched by tetherctl run: its processes are not tether's to confine", agents.ErrInvalid, slot)
	}
	profile, err := confine.ParseProfile(a.Sandbox)
	if err != nil {
		return confine.Plan{}, err
	}
	cfg := d.cfg.Load()
	plan := confine.Plan{Profile: profile, Cgroup: a.Cgroup, UID: a.UID, GID: a.UID, Hide: hiddenPaths(cfg), ReadOnly: d.registry.ExecFiles(slot)}
	own, err := d.creds.Prepare(slot, a.UID)
	if err != nil {
		return confine.Plan{}, err
	}
	plan.CredentialDir, plan.Credentials = filepath.Clean(cfg.Credentials.Dir), own
	return plan, plan.Validate()
}

// RecordRefusal records a system call the launcher's seccomp filter refused to the launched agent
// in slot (its launcher reports it): a decision of kind "syscall", verdict deny, reason the
// sandbox profile. The respond policy is asked about it like about the kernel's denials.
func (d *Daemon) RecordRefusal(slot dataplane.Slot, r api.RefusalRequest) error {
	a, ok := d.registry.Get(slot)
	if !ok {
		return fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	if !a.Launched {
		return fmt.Errorf("%w: agent %d was not launched by tetherctl run: no launcher filters its calls", agents.ErrInvalid, slot)
	}
	rec := events.SyscallRefused(events.Agent{SpiffeID: a.SpiffeID, Slot: slot, CgroupID: a.CgroupID}, r.PID, a.UID, r.Syscall, r.Detail, a.Sandbox, r.Errno)
	rec.DecisionID, rec.Timestamp = events.NewID(), time.Now().UTC()
	d.respond(&rec) // the task, the revision, and what the respond policy says
	d.pump.Emit(rec)
	return nil
}

// hiddenPaths are what no launched agent sees: tether's admin socket, key, state and
// configuration, the SPIRE sockets, api.sensitive_sockets and confinement.hide. The agent socket
// stays (it is every agent's).
func hiddenPaths(cfg *config.Loaded) []string {
	out := append([]string{cfg.API.Socket, cfg.Credentials.KeyFile, cfg.Kill.StateFile}, sensitiveSockets(cfg)...)
	if filepath.IsAbs(cfg.Source) {
		out = append(out, cfg.Source)
	}
	out = append(out, cfg.Confinement.Hide...)
	seen := map[string]bool{}
	kept := out[:0]
	for _, p := range out {
		if p != "" && filepath.IsAbs(p) && !seen[p] && p != cfg.API.AgentSocket {
			seen[p] = true
			kept = append(kept, p)
		}
	}
	return kept
}

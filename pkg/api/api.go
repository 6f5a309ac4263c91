// Package api is tetherd's control API: HTTP with JSON bodies over a unix socket. The caller is
// identified by the kernel (SO_PEERCRED, SO_PEERGROUPS), never by what the request says: admins
// may call every verb, other users may launch the identities a launch rule gives them and end
// agents they launched, and processes inside agents may call nothing. The Client is what
// tetherctl uses.
package api

import (
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// RegisterRequest asks to make a cgroup an agent (admin), or to launch a new one.
type RegisterRequest struct {
	SpiffeID string `json:"spiffe_id"`
	// Cgroup is an existing cgroup directory to bind (admins only).
	Cgroup string `json:"cgroup,omitempty"`
	// Launch asks tetherd to create a fresh cgroup under the launch parent; `tetherctl run`
	// then starts the command directly inside it.
	Launch bool `json:"launch,omitempty"`
}

// ModeRequest sets an agent's mode: "enforce", "audit", or null to follow its grants again.
type ModeRequest struct {
	Mode *string `json:"mode"`
}

// KilledRequest sets or clears an agent's killed flag.
type KilledRequest struct {
	Killed *bool `json:"killed"`
}

// Hook is one BPF program and whether it runs.
type Hook struct {
	Name    string `json:"name"`
	Section string `json:"section"`
	Active  bool   `json:"active"`
	Reason  string `json:"reason,omitempty"`
}

// Status is what `tetherctl status` shows.
type Status struct {
	Version      string             `json:"version"`
	Started      time.Time          `json:"started"`
	ConfigSource string             `json:"config_source"`
	PinDir       string             `json:"pin_dir"`
	Cgroup2      string             `json:"cgroup2"`
	AgentParents []string           `json:"agent_parents"`
	LaunchParent string             `json:"launch_parent"`
	ExecMode     string             `json:"exec_mode"`
	ExecReason   string             `json:"exec_reason"`
	ActiveLSMs   string             `json:"active_lsms"`
	Hooks        []Hook             `json:"hooks"`
	Agents       int                `json:"agents"`
	Kernel       dataplane.Counters `json:"kernel_counters"`
	Registry     agents.Stats       `json:"registry"`
	Events       events.Stats       `json:"events"`
	Warnings     []string           `json:"warnings,omitempty"`
}

// Error is the body of every refused request.
type Error struct {
	Error string `json:"error"`
}

// Service is what the API serves; the daemon implements it.
type Service interface {
	Status() Status
	Agents() []agents.Agent
	Agent(slot dataplane.Slot) (agents.Agent, bool)
	Register(agents.Registration) (agents.Agent, error)
	Unregister(slot dataplane.Slot) error
	SetMode(slot dataplane.Slot, mode *dataplane.Mode) (agents.Agent, error)
	SetKilled(slot dataplane.Slot, killed bool) (agents.Agent, error)
}

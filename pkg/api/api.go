// Package api is tetherd's control API: HTTP with JSON bodies over a unix socket. The caller is
// identified by the kernel (SO_PEERCRED, SO_PEERGROUPS), never by what the request says: admins
// may call every verb, other users may launch the identities a launch rule gives them and end
// agents they launched, and processes inside agents may call nothing. The Client is what
// tetherctl uses.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/confine"
	"github.com/tether-sh/tether/pkg/containers"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/discovery"
	"github.com/tether-sh/tether/pkg/dnsproxy"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/killpath"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/pkg/stepup"
)

// RegisterRequest asks to make a cgroup an agent (admin), or to launch a new one.
type RegisterRequest struct {
	SpiffeID string `json:"spiffe_id"`
	// Cgroup is an existing cgroup directory to bind (admins only).
	Cgroup string `json:"cgroup,omitempty"`
	// Launch asks tetherd to create a fresh cgroup under the launch parent; `tetherctl run`
	// then starts the command directly inside it.
	Launch bool `json:"launch,omitempty"`
	// Labels are given to the policy (input.agent.labels).
	Labels map[string]string `json:"labels,omitempty"`
	// Task starts with the agent.
	Task *TaskRequest `json:"task,omitempty"`
	// UID is the uid the agent runs as (its task credential file is readable by it only).
	// Launched agents without one get a uid of their own (confinement.uids), or uid 0 with
	// AllowRoot; registered cgroups default to the caller's.
	UID *uint32 `json:"uid,omitempty"`
	// AllowRoot asks for uid 0, which a launch rule with root: true must allow.
	AllowRoot bool `json:"allow_root,omitempty"`
	// ShareUID lets the launched agent run as a uid another live agent runs as.
	ShareUID bool `json:"share_uid,omitempty"`
}

// TaskRequest starts a task.
type TaskRequest struct {
	ID          string `json:"id,omitempty"`
	Type        string `json:"type"`
	Sensitivity string `json:"sensitivity,omitempty"`
	TTL         string `json:"ttl"` // "1h"
}

// HeartbeatRequest is the launcher's heartbeat: it presents the task's current credential and
// renews the task for ttl from now; the answer is the next credential.
type HeartbeatRequest struct {
	Credential string `json:"credential"`
	TTL        string `json:"ttl"`
}

// RefusalRequest is a system call the launcher's seccomp filter refused to a launched agent,
// reported by its launcher to be recorded (a decision of kind "syscall", verdict deny).
type RefusalRequest struct {
	PID     uint32 `json:"pid"`     // in the launcher's PID namespace (the host's)
	Syscall string `json:"syscall"` // bpf, ptrace, socket, ...
	Detail  string `json:"detail,omitempty"`
	Errno   string `json:"errno"` // what the call returned: EPERM, EAFNOSUPPORT
}

// VerifyRequest asks whether a task credential is valid now.
type VerifyRequest struct {
	Token string `json:"token"`
}

// RenewRequest renews a task for ttl from now.
type RenewRequest struct {
	TTL string `json:"ttl"`
}

// ApprovalRequest records an approved step-up on an agent's task.
type ApprovalRequest struct {
	Action   string `json:"action"`
	Resource string `json:"resource"`
	TTL      string `json:"ttl"`
	// Uses bounds the connects the approval allows (the kernel counts them); 0: until it
	// expires.
	Uses int64 `json:"uses,omitempty"`
}

// PolicyEvalRequest evaluates one decision of the policy in force.
type PolicyEvalRequest struct {
	Query string          `json:"query"` // grants, allow, stepup or respond
	Input json.RawMessage `json:"input"`
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
	Version      string              `json:"version"`
	Started      time.Time           `json:"started"`
	ConfigSource string              `json:"config_source"`
	PinDir       string              `json:"pin_dir"`
	Cgroup2      string              `json:"cgroup2"`
	AgentParents []string            `json:"agent_parents"`
	LaunchParent string              `json:"launch_parent"`
	ExecMode     string              `json:"exec_mode"`
	ExecReason   string              `json:"exec_reason"`
	ActiveLSMs   string              `json:"active_lsms"`
	Hooks        []Hook              `json:"hooks"`
	Sockets      SocketStatus        `json:"live_sockets"`
	Agents       int                 `json:"agents"`
	Kernel       dataplane.Counters  `json:"kernel_counters"`
	Registry     agents.Stats        `json:"registry"`
	Events       events.Stats        `json:"events"`
	Policy       policy.EngineStatus `json:"policy"`
	Identity     discovery.Status    `json:"identity"`
	// Containers counts pod agents' container execs held until their container's root was
	// resolved, and the roots resolved or not.
	Containers containers.Stats `json:"containers"`
	// DNSProxy counts what the DNS proxy answered agents; absent when it is off.
	DNSProxy   *dnsproxy.Stats  `json:"dns_proxy,omitempty"`
	Escalation EscalationStatus `json:"escalation"`
	// DecisionLogHTTP counts the decision log's HTTP sink, when configured.
	DecisionLogHTTP *events.HTTPStats `json:"decision_log_http,omitempty"`
	Warnings        []string          `json:"warnings,omitempty"`
}

// SocketStatus says how live sockets follow their agent's rule set on this kernel.
type SocketStatus struct {
	// Terminate: revoked sockets are terminated (bpf_sock_destroy); without it their packets
	// are only dropped. Reason says which and why.
	Terminate bool                 `json:"terminate"`
	Reason    string               `json:"reason"`
	Sweeps    dataplane.SweepStats `json:"sweeps"`
}

// EscalationStatus counts the alerts of the escalation webhook.
type EscalationStatus struct {
	Sent    uint64 `json:"sent"`
	Dropped uint64 `json:"dropped"` // queue full, or every retry failed
	Failed  uint64 `json:"failed_attempts"`
}

// Error is the body of every refused request: why, and a code (Code*) a client acts on instead
// of matching the text.
type Error struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// The codes of a refused request: one per error a client may act on, else the HTTP status's.
const (
	CodeBadRequest         = "bad_request"
	CodeForbidden          = "forbidden"
	CodeNotFound           = "not_found"
	CodeConflict           = "conflict"
	CodeInternal           = "internal"
	CodeNoTask             = "no_task"   // the agent has no task (or it ended)
	CodeUIDTaken           = "uid_taken" // another live agent runs as that uid
	CodeInvalid            = "invalid"   // a request the agent's state refuses
	CodeCredentialExpired  = "credential_expired"
	CodeCredentialRevoked  = "credential_revoked"
	CodeCredentialReplayed = "credential_replayed" // superseded by a newer one
	CodeCredentialInvalid  = "credential_invalid"
	CodeStepupDecided      = "stepup_decided" // approved or denied already
	CodeStepupRefused      = "stepup_refused" // the policy refuses to ask for it
)

// Backend is what the API serves, by resource: tetherd composes it from its domain services
// (the agents' control, the credentials' lifecycle, the kill path, the step-up service, the
// policy's revisions, the decision stream).
type Backend struct {
	// Status is tetherd's status as a whole.
	Status      func() Status
	Agents      AgentService
	Credentials CredentialService
	Kills       KillService
	Stepups     StepupService
	Policy      PolicyService
	// Events follows the decision records from now on.
	Events interface {
		Subscribe(n int) *events.Subscription
	}
}

// AgentService is the agents and their tasks.
type AgentService interface {
	List() []agents.Agent
	Get(slot dataplane.Slot) (agents.Agent, bool)
	Register(agents.Registration) (agents.Agent, error)
	Unregister(slot dataplane.Slot) error
	SetMode(slot dataplane.Slot, mode *dataplane.Mode) (agents.Agent, error)
	SetKilled(slot dataplane.Slot, killed bool) (agents.Agent, error)
	StartTask(slot dataplane.Slot, t agents.TaskSpec) (agents.Agent, error)
	RenewTask(slot dataplane.Slot, ttl time.Duration) (agents.Agent, error)
	EndTask(slot dataplane.Slot) (agents.Agent, error)
	AddApproval(slot dataplane.Slot, action, resource, approvedBy string, ttl time.Duration, uses int64) (agents.Agent, error)
	Handoff(ctx context.Context, from, to dataplane.Slot, presented string, spec agents.HandoffSpec) (agents.Agent, credentials.Credential, error)
	// Confinement is what tetherctl run does to the launched agent in slot before its command runs.
	Confinement(slot dataplane.Slot) (confine.Plan, error)
	// RecordRefusal records a system call the launcher's filter refused to the agent in slot.
	RecordRefusal(slot dataplane.Slot, pid uint32, syscall, detail, errno string) error
}

// CredentialService is the task credentials.
type CredentialService interface {
	TaskCredential(slot dataplane.Slot) (credentials.Credential, error)
	Heartbeat(ctx context.Context, slot dataplane.Slot, presented string, ttl time.Duration) (credentials.Credential, error)
	Keys() jose.JSONWebKeySet
	Revoked() []credentials.Revocation
	Verify(token string) (credentials.Claims, error)
}

// KillService is the kill path.
type KillService interface {
	KillTarget(ctx context.Context, t killpath.Target, reason, requester string, terminate bool) ([]killpath.Kill, error)
	Resume(slot dataplane.Slot) (agents.Agent, error)
	Readmit(spiffeID string) ([]agents.Agent, error)
	Pending() []killpath.Kill
	DeniedIDs() []killpath.Denied
}

// StepupService is the agents' requests for extra rights.
type StepupService interface {
	// Request asks for an extra right for the agent in slot (the caller's own).
	Request(ctx context.Context, slot dataplane.Slot, action, resource, reason string) (stepup.Request, error)
	List(slot *dataplane.Slot) []stepup.Request
	Approve(id, by string, uses int64, ttl time.Duration) (stepup.Request, error)
	Deny(id, by, why string) (stepup.Request, error)
}

// PolicyService is the policy's revisions.
type PolicyService interface {
	Reload(ctx context.Context, why string) (policy.EngineStatus, error)
	Eval(ctx context.Context, query string, input []byte) (any, error)
}

// StepupRequest is an agent's request for an extra right (agent socket).
type StepupRequest struct {
	Action   string `json:"action"`
	Resource string `json:"resource"`
	Reason   string `json:"reason,omitempty"`
}

// ApproveRequest approves a pending step-up request (admin socket): uses connects (0: until it
// expires), for ttl (empty: what the policy said).
type ApproveRequest struct {
	Uses int64  `json:"uses,omitempty"`
	TTL  string `json:"ttl,omitempty"`
}

// DenyRequest denies a pending step-up request.
type DenyRequest struct {
	Why string `json:"why,omitempty"`
}

// KillRequest names the agents to kill (exactly one of Slot, SpiffeID, TaskID, PID) and why.
type KillRequest struct {
	Slot      *dataplane.Slot `json:"slot,omitempty"`
	SpiffeID  string          `json:"spiffe_id,omitempty"`
	TaskID    string          `json:"task_id,omitempty"`
	PID       int32           `json:"pid,omitempty"`
	Reason    string          `json:"reason"`
	Terminate bool            `json:"terminate,omitempty"`
}

// ReadmitRequest takes a SPIFFE ID off the kill path's deny list.
type ReadmitRequest struct {
	SpiffeID string `json:"spiffe_id"`
}

// KillStatus is the kills still being finished and the denied SPIFFE IDs.
type KillStatus struct {
	Pending []killpath.Kill   `json:"pending"`
	Denied  []killpath.Denied `json:"denied"`
}

// HandoffRequest hands the agent's task to another agent. Credential is the sender's current
// task credential.
type HandoffRequest struct {
	To         dataplane.Slot `json:"to"`
	Credential string         `json:"credential"`
	Type       string         `json:"type,omitempty"`
	TTL        string         `json:"ttl"`
}

// HandoffResult is the receiving agent and its task credential.
type HandoffResult struct {
	Agent      agents.Agent           `json:"agent"`
	Credential credentials.Credential `json:"credential"`
}

// check refuses a report no filter makes: a system call name is a short identifier.
func (r RefusalRequest) check() error {
	switch {
	case r.Syscall == "" || len(r.Syscall) > 64:
		return errors.New("a refusal names the refused system call (syscall)")
	case strings.IndexFunc(r.Syscall, func(c rune) bool { return !(c == '_' || c == ' ' || '0' <= c && c <= '9' || 'a' <= c && c <= 'z') }) >= 0:
		return fmt.Errorf("syscall %q is not a system call's name", r.Syscall)
	case len(r.Detail) > 256 || len(r.Errno) > 32:
		return errors.New("a refusal's detail is at most 256 bytes, its errno 32")
	}
	return nil
}

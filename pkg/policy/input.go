package policy

import (
	"strings"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
)

// Input is what the policy reads (policies/input.schema.json). Grants reads Agent, Task, Env
// and Time; the other decisions add Request, Event or Recent.
type Input struct {
	Agent   Agent          `json:"agent"`
	Task    *Task          `json:"task,omitempty"`
	Env     Env            `json:"env"`
	Time    Time           `json:"time"`
	Request *Request       `json:"request,omitempty"`
	Event   map[string]any `json:"event,omitempty"`
	Recent  []any          `json:"recent,omitempty"`
	// Counts are the agent's decisions of the last minute by "kind/verdict" (respond).
	Counts map[string]int `json:"counts,omitempty"`
}

// Agent is who the agent is.
type Agent struct {
	SpiffeID    string            `json:"spiffe_id"`
	TrustDomain string            `json:"trust_domain"`
	Path        string            `json:"path"`
	Selectors   []string          `json:"selectors,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
}

// Task is what the agent is doing, as the policy is told: the registry's task without what
// tether keeps for itself (the approvals' counts, the renewal bound).
type Task struct {
	agents.TaskInfo
	Approvals   []Approval `json:"approvals,omitempty"`
	HandoffFrom string     `json:"handoff_from,omitempty"`
}

// Approval is a step-up a human approved for the task.
type Approval = agents.ApprovalInfo

// Env is where the agent runs.
type Env struct {
	Node        string            `json:"node"`
	Cluster     string            `json:"cluster,omitempty"`
	Environment string            `json:"environment,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
}

// Time is when the decision is made, in the configured time zone.
type Time struct {
	Now      string `json:"now"`
	Weekday  string `json:"weekday"`
	Hour     int    `json:"hour"`
	Timezone string `json:"timezone"`
}

// Request is what stepup and allow decide.
type Request struct {
	// stepup
	Action   string `json:"action,omitempty"`
	Resource string `json:"resource,omitempty"`
	Reason   string `json:"reason,omitempty"`
	// allow
	Kind     string `json:"kind,omitempty"` // connect, exec, unix, bind or dns
	IP       string `json:"ip,omitempty"`
	Port     int    `json:"port,omitempty"`
	Protocol string `json:"protocol,omitempty"`
	Path     string `json:"path,omitempty"`
	Binary   string `json:"binary,omitempty"`
	SHA256   string `json:"sha256,omitempty"` // exec: the file's content
	Name     string `json:"name,omitempty"`   // dns: the name queried
}

// TimeAt is t in loc, the way the policy sees it.
func TimeAt(t time.Time, loc *time.Location) Time {
	t = t.In(loc)
	return Time{Now: t.Format(time.RFC3339Nano), Weekday: t.Weekday().String(), Hour: t.Hour(), Timezone: loc.String()}
}

// AgentOf splits a SPIFFE ID into the agent fields.
func AgentOf(spiffeID string, selectors []string, labels map[string]string) Agent {
	rest, _ := strings.CutPrefix(spiffeID, "spiffe://")
	td, path, _ := strings.Cut(rest, "/")
	return Agent{SpiffeID: spiffeID, TrustDomain: td, Path: "/" + path, Selectors: selectors, Labels: labels}
}

// ContextInput is what the policy is told of an agent with context c in env at time t.
func ContextInput(c agents.Context, env Env, t Time) Input {
	in := Input{Agent: AgentOf(c.SpiffeID, c.Selectors, c.Labels), Env: env, Time: t}
	if ct := c.Task; ct != nil {
		pt := &Task{TaskInfo: ct.TaskInfo, HandoffFrom: ct.HandoffFrom}
		for _, a := range ct.Approvals {
			pt.Approvals = append(pt.Approvals, a.ApprovalInfo)
		}
		in.Task = pt
	}
	return in
}

package policy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/panics"
)

// Engine holds the revision in force. A new revision takes effect only if it compiles and gives
// well-formed decisions for every probe input (the standard ones and the contexts of the agents
// that are running); otherwise the revision in force stays, and the refusal is counted and kept.
type Engine struct {
	schema []byte
	log    *slog.Logger
	cur    atomic.Pointer[Revision]

	refused   atomic.Uint64
	mu        sync.Mutex
	lastError string
	lastAt    time.Time
}

// NewEngine returns an engine with no revision; Offer the first.
func NewEngine(inputSchema []byte, log *slog.Logger) *Engine {
	return &Engine{schema: inputSchema, log: log}
}

// Current is the revision in force, or nil before the first one.
func (e *Engine) Current() *Revision { return e.cur.Load() }

// EngineStatus is what status shows of the policy.
type EngineStatus struct {
	Revision  string    `json:"revision"`
	Source    string    `json:"source"`
	Loaded    time.Time `json:"loaded"`
	Refused   uint64    `json:"refused_revisions"`
	LastError string    `json:"last_error,omitempty"`
	LastAt    time.Time `json:"last_error_at,omitzero"`
}

func (e *Engine) Status() EngineStatus {
	st := EngineStatus{Refused: e.refused.Load()}
	if r := e.Current(); r != nil {
		st.Revision, st.Source, st.Loaded = r.ID, r.Source, r.Loaded
	}
	e.mu.Lock()
	st.LastError, st.LastAt = e.lastError, e.lastAt
	e.mu.Unlock()
	return st
}

// Offer compiles f and puts it in force if it passes Check with probes. It returns the revision
// in force afterwards and, when f was refused, why.
func (e *Engine) Offer(ctx context.Context, f *Files, probes []Input) (*Revision, error) {
	if cur := e.Current(); cur != nil && cur.ID == f.Revision {
		return cur, nil // nothing changed
	}
	var rev *Revision
	// A revision is outside input (a directory, a bundle server): a panic compiling or checking
	// it refuses it like an error.
	err := panics.Run(BoundaryBundle, func() (err error) {
		if rev, err = Compile(ctx, f, e.schema); err == nil {
			err = Check(ctx, rev, probes)
		}
		return err
	})
	if err != nil {
		e.refused.Add(1)
		e.mu.Lock()
		e.lastError, e.lastAt = err.Error(), time.Now()
		e.mu.Unlock()
		in := "none yet"
		if cur := e.Current(); cur != nil {
			in = cur.ID
		}
		e.log.Error("policy revision refused; the revision in force stays", "source", f.Source, "revision", f.Revision, "in_force", in, "error", err)
		return e.Current(), err
	}
	e.cur.Store(rev)
	e.log.Info("policy revision in force", "source", f.Source, "revision", rev.ID)
	return rev, nil
}

// StandardProbes are inputs every revision must decide well: an agent without a task and with
// one, in production and not.
func StandardProbes(now time.Time) []Input {
	t := TimeAt(now, time.UTC)
	agent := AgentOf("spiffe://probe.tether.invalid/agent", []string{"probe"}, nil)
	task := &Task{TaskInfo: agents.TaskInfo{ID: "probe", Type: "probe", Sensitivity: "restricted", StartedAt: now, ExpiresAt: now.Add(time.Hour)},
		Approvals: []Approval{{ID: "probe", Action: "connect", Resource: "probe", ExpiresAt: now.Add(time.Minute)}}}
	return []Input{
		{Agent: agent, Env: Env{Node: "probe"}, Time: t},
		{Agent: agent, Task: task, Env: Env{Node: "probe", Environment: "production"}, Time: t},
	}
}

// Check evaluates every decision of rev for each probe: each must be defined and of the right
// type. A runtime error (such as conflicting values) fails it, with the file and line.
func Check(ctx context.Context, rev *Revision, probes []Input) error {
	var errs []error
	for i, in := range probes {
		who := fmt.Sprintf("probe %d (%s)", i, in.Agent.SpiffeID)
		if _, err := rev.Grants(ctx, in); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", who, err))
		}
		req := in
		req.Request = &Request{Kind: "connect", IP: "192.0.2.1", Port: 443, Protocol: "tcp", Action: "connect", Resource: "probe", Reason: "probe"}
		if _, err := rev.Allow(ctx, req); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", who, err))
		}
		if _, err := rev.Stepup(ctx, req); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", who, err))
		}
		ev := in
		ev.Event = map[string]any{"decision_id": "probe", "timestamp": in.Time.Now, "kind": "connect4",
			"verdict": "deny", "destination": "192.0.2.1:443"}
		if _, err := rev.Respond(ctx, ev); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", who, err))
		}
	}
	return errors.Join(errs...)
}

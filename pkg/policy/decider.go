package policy

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/stepup"
)

// Decider answers for the agents with the revision in force: their grants (it is the registry's
// agents.Evaluator), their step-up requests and handoffs, and what to do about their denials
// (respond). What it tells the policy of an agent is its context, the environment and the time.
type Decider struct {
	Engine *Engine
	// Contexts is an agent's context now (the registry's ContextOf); set before use.
	Contexts func(slot dataplane.Slot) (agents.Context, bool)
	// Observe, if set, is told how long each grants evaluation took.
	Observe func(time.Duration)
	// Record, if set, gets a record of each grants evaluation when Evaluations says so
	// (decision_log.evaluations; asked each time, a reload may change it).
	Record      func(events.Decision)
	Evaluations func() bool

	where  atomic.Pointer[whereWhen]
	recent *recent
}

// whereWhen is what the policy is told of the node: its environment and its time zone.
type whereWhen struct {
	env Env
	loc *time.Location
}

// NewDecider returns a decider over engine for agents on a node in env, whose time windows are
// in loc.
func NewDecider(engine *Engine, env Env, loc *time.Location) *Decider {
	d := &Decider{Engine: engine, recent: newRecent()}
	d.SetEnv(env, loc)
	return d
}

// SetEnv changes the environment and the time zone (a configuration reload).
func (d *Decider) SetEnv(env Env, loc *time.Location) { d.where.Store(&whereWhen{env, loc}) }

// Input is what the policy is told of an agent, now.
func (d *Decider) Input(c agents.Context) Input {
	w := d.where.Load()
	return ContextInput(c, w.env, TimeAt(time.Now(), w.loc))
}

// Grants implements agents.Evaluator with the revision in force.
func (d *Decider) Grants(ctx context.Context, c agents.Context) (grants.Grants, error) {
	rev := d.Engine.Current()
	if rev == nil {
		return grants.Grants{}, errors.New("no policy revision is in force yet")
	}
	in := d.Input(c)
	start := time.Now()
	g, err := rev.Grants(ctx, in)
	took := time.Since(start)
	if d.Observe != nil {
		d.Observe(took)
	}
	d.recordEvaluation(QueryGrants, rev.ID, c, in, g, err, took)
	return g, err
}

// recordEvaluation puts a policy evaluation in the decision log (the input masked by the pump,
// off this goroutine: the agent's lock is held here).
func (d *Decider) recordEvaluation(query, revision string, c agents.Context, in Input, result any, err error, took time.Duration) {
	if d.Record == nil || d.Evaluations == nil || !d.Evaluations() {
		return
	}
	a := events.Agent{SpiffeID: c.SpiffeID, Slot: c.Slot}
	if c.Task != nil {
		a.TaskID, a.TaskType = c.Task.ID, c.Task.Type
	}
	d.Record(events.PolicyRecord(a, query, revision, in, result, err, took))
}

// Stepup asks data.tether.stepup whether the agent in slot may do action on resource: a step-up
// request, or a handoff (a stepup.Decider).
func (d *Decider) Stepup(ctx context.Context, slot dataplane.Slot, action, resource, reason string) (stepup.Answer, error) {
	rev := d.Engine.Current()
	c, ok := d.Contexts(slot)
	if rev == nil || !ok {
		return stepup.Answer{}, errors.New("no policy revision is in force")
	}
	in := d.Input(c)
	in.Request = &Request{Action: action, Resource: resource, Reason: reason}
	dec, err := rev.Stepup(ctx, in)
	if err != nil {
		return stepup.Answer{}, fmt.Errorf("asking the policy: %w", err)
	}
	ttl, _ := time.ParseDuration(dec.TTL) // checked by Stepup
	return stepup.Answer{Allowed: dec.Allowed, NeedsApproval: dec.NeedsApproval, TTL: ttl, Reason: dec.Reason}, nil
}

// Respond has the policy say what to do about rec, a denied or audited decision of an agent
// (rec.Slot set), given the agent's decisions of the last minute: from a memo of the same event
// a moment ago (fresh false: already acted on), or evaluated (fresh true). It also puts the
// revision in force into rec. It returns "" when the agent is gone or no revision is in force.
func (d *Decider) Respond(rec *events.Decision) (resp events.Response, fresh bool, err error) {
	rev := d.Engine.Current()
	if rev == nil {
		return "", false, nil
	}
	rec.PolicyRevision = rev.ID
	if rec.Verdict == events.VerdictAllow {
		return "", false, nil
	}
	slot := *rec.Slot
	return d.recent.respond(rec, rev, func() (Input, bool) {
		c, ok := d.Contexts(slot)
		return d.Input(c), ok
	})
}

// Eval evaluates query (grants, allow, stepup or respond) for input with the revision in force;
// for grants it also compiles the result as the agent would get it, with opts.
func (d *Decider) Eval(ctx context.Context, query string, input []byte, opts compile.Options) (any, error) {
	rev := d.Engine.Current()
	if rev == nil {
		return nil, errors.New("no policy revision is in force")
	}
	return Eval(ctx, rev, query, input, opts)
}

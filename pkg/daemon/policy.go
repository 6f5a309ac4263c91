package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/policies"
)

// policyState is the daemon's side of the policy: where revisions come from, what the policy
// is told of the environment, and the agents' recent decisions for respond.
type policyState struct {
	engine *policy.Engine
	env    policy.Env
	loc    *time.Location
	stop   func() // the bundle downloader

	reloadMu sync.Mutex // one reload at a time

	recent *recent // what respond is told of each agent's recent decisions
}

// startPolicy puts the first revision in force (a directory or the shipped policies), or starts
// the bundle downloader (agents are granted nothing until a bundle is in force), and starts
// watching the directory.
func (d *Daemon) startPolicy(ctx context.Context, cfg *config.Loaded) error {
	schema, err := policies.FS.ReadFile("input.schema.json")
	if err != nil {
		return err
	}
	loc, err := time.LoadLocation(cfg.Policy.Timezone)
	if err != nil {
		return err
	}
	env := policy.Env{Node: nodeName(cfg.Env.Node), Cluster: cfg.Env.Cluster, Environment: cfg.Env.Environment, Labels: cfg.Env.Labels}
	d.pol = &policyState{engine: policy.NewEngine(schema, d.log), env: env, loc: loc, recent: newRecent()}

	if b := cfg.Policy.Bundle; b != nil {
		o := policy.BundleOptions{Service: b.Service, Resource: b.Resource, MinDelay: b.MinDelay, MaxDelay: b.MaxDelay,
			KeyID: b.KeyID, Algorithm: b.Algorithm, Scope: b.Scope}
		if b.MinDelay == 0 {
			o.MinDelay, o.MaxDelay = 10*time.Second, max(b.MaxDelay, 30*time.Second)
		}
		if b.PublicKeyFile != "" {
			key, err := os.ReadFile(b.PublicKeyFile)
			if err != nil {
				return err
			}
			o.PublicKey = string(key)
		}
		stop, err := policy.StartBundle(ctx, o, d.log, func(f *policy.Files, err error) {
			if err != nil {
				d.log.Error("policy bundle", "error", err)
				return
			}
			d.offer(ctx, f, "bundle revision")
		})
		if err != nil {
			return err
		}
		d.pol.stop = stop
		return nil
	}
	f, err := loadPolicy(cfg)
	if err != nil {
		return err
	}
	if _, err := d.pol.engine.Offer(ctx, f, policy.StandardProbes(time.Now())); err != nil {
		return fmt.Errorf("no policy can be put in force: %w", err)
	}
	if cfg.Policy.Dir != "" {
		err := policy.WatchDir(ctx, cfg.Policy.Dir, 300*time.Millisecond, d.log, func() {
			d.ReloadPolicy(ctx, "policy files changed")
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func loadPolicy(cfg *config.Loaded) (*policy.Files, error) {
	if cfg.Policy.Dir != "" {
		return policy.FromDir(cfg.Policy.Dir)
	}
	return policy.FromFS(shipped(), "shipped policies")
}

// shipped is the embedded policy without its input schema (which is not data).
func shipped() fs.FS { return policies.FS }

// ReloadPolicy reads the policy source again and, when a new revision goes into force,
// evaluates every agent again. A revision that is refused changes nothing.
func (d *Daemon) ReloadPolicy(ctx context.Context, why string) (api.PolicyStatus, error) {
	cfg := d.cfg.Load()
	if cfg.Policy.Bundle != nil {
		return d.policyStatus(), errors.New("the policy comes from a bundle service: it is downloaded when it changes")
	}
	f, err := loadPolicy(cfg)
	if err != nil {
		d.log.Error("policy refused; the revision in force stays", "why", why, "error", err)
		return d.policyStatus(), err
	}
	err = d.offer(ctx, f, why)
	return d.policyStatus(), err
}

func (d *Daemon) policyStatus() api.PolicyStatus {
	st := d.pol.engine.Status()
	return api.PolicyStatus{Revision: st.Revision, Source: st.Source, Loaded: st.Loaded, Refused: st.Refused,
		LastError: st.LastError, LastAt: st.LastAt}
}

// offer puts f in force if the engine accepts it, then evaluates every agent again.
func (d *Daemon) offer(ctx context.Context, f *policy.Files, why string) error {
	d.pol.reloadMu.Lock()
	defer d.pol.reloadMu.Unlock()
	before := d.pol.engine.Current()
	probes := policy.StandardProbes(time.Now())
	for _, c := range d.registry.Contexts() {
		probes = append(probes, d.input(c))
	}
	rev, err := d.pol.engine.Offer(ctx, f, probes)
	if err != nil {
		return err
	}
	if before != nil && rev.ID == before.ID {
		return nil
	}
	d.log.Info("policy changed; evaluating every agent", "why", why, "revision", rev.ID)
	return d.registry.Refresh(ctx)
}

// Grants implements agents.Evaluator with the revision in force.
func (d *Daemon) Grants(ctx context.Context, c agents.Context) (grants.Grants, error) {
	rev := d.pol.engine.Current()
	if rev == nil {
		return grants.Grants{}, errors.New("no policy revision is in force yet")
	}
	in := d.input(c)
	start := time.Now()
	g, err := rev.Grants(ctx, in)
	took := time.Since(start)
	if d.metrics != nil {
		d.metrics.ObserveEvaluation(took)
	}
	d.recordEvaluation(policy.QueryGrants, rev.ID, c, in, g, err, took)
	return g, err
}

// recordEvaluation puts a policy evaluation in the decision log (input masked by the pump, off
// this goroutine: the agent's lock is held here).
func (d *Daemon) recordEvaluation(query, revision string, c agents.Context, in policy.Input, result any, err error, took time.Duration) {
	if d.pump == nil || !d.cfg.Load().DecisionLog.Evaluations {
		return
	}
	a := events.Agent{SpiffeID: c.SpiffeID, Slot: c.Slot}
	if c.Task != nil {
		a.TaskID, a.TaskType = c.Task.ID, c.Task.Type
	}
	d.pump.Record(events.PolicyRecord(a, query, revision, in, result, err, took))
}

// input is what the policy is told of an agent, now.
func (d *Daemon) input(c agents.Context) policy.Input {
	return policy.ContextInput(c, d.pol.env, policy.TimeAt(time.Now(), d.pol.loc))
}

// respond completes a decision record (the agent's task, the policy revision in force) and has
// the policy say what to do about an agent's denied or audited decision, given its
// decisions of the last minute, and writes the answer into the record. The kill path acts on it;
// here it is logged and counted.
func (d *Daemon) respond(rec *events.Decision) {
	d.guardFollowUp(rec) // a depth deny has no agent (no slot)
	if rec.Slot == nil {
		return
	}
	rev := d.pol.engine.Current()
	if id, typ, ok := d.registry.TaskOf(*rec.Slot); ok {
		rec.TaskID, rec.TaskType = id, typ
	}
	if rev != nil {
		rec.PolicyRevision = rev.ID
	}
	if rev == nil || rec.Verdict == events.VerdictAllow {
		return
	}
	slot := *rec.Slot
	resp, fresh, err := d.pol.recent.respond(rec, rev, func() (policy.Input, bool) {
		c, ok := d.registry.ContextOf(slot)
		return d.input(c), ok
	})
	if err != nil {
		d.log.Error("respond policy", "error", err)
		return
	}
	if resp == "" {
		return // the agent is gone
	}
	rec.Response = events.Response(resp)
	if !fresh {
		return // the answer to the same event a moment ago: already logged and acted on
	}
	if resp != policy.RespondNone {
		d.log.Warn("policy response", "response", resp, "slot", *rec.Slot, "spiffe_id", rec.SpiffeID,
			"kind", rec.Kind, "verdict", rec.Verdict, "decision_id", rec.DecisionID)
	}
	if resp == policy.RespondFreeze || resp == policy.RespondKill {
		d.killByPolicy(slot, resp, fmt.Sprintf("respond policy said %s after %s %s %s (decision %s)", resp, rec.Verdict, rec.Kind, rec.Target(), rec.DecisionID))
	}
}

// toMap is v's JSON form.
func toMap(v any) map[string]any {
	b, _ := json.Marshal(v)
	var m map[string]any
	json.Unmarshal(b, &m)
	return m
}

// EvalPolicy evaluates query (grants, allow, stepup or respond) for input with the revision in
// force; for grants it also compiles the result, as the agent would get it.
func (d *Daemon) EvalPolicy(ctx context.Context, query string, input json.RawMessage) (any, error) {
	rev := d.pol.engine.Current()
	if rev == nil {
		return nil, errors.New("no policy revision is in force")
	}
	return policy.Eval(ctx, rev, query, input, d.compileOpts)
}

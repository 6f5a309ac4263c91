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

	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/policies"
)

// policyState is the daemon's side of the policy: where revisions come from, and the decider
// that answers for the agents with the revision in force.
type policyState struct {
	engine  *policy.Engine
	decider *policy.Decider
	stop    func() // the bundle downloader

	reloadMu sync.Mutex // one reload at a time
}

// newPolicy sets up the policy engine and the decider that answers for the agents with the
// revision in force (none yet: startPolicy puts one in force).
func (d *Daemon) newPolicy(cfg *config.Loaded) error {
	schema, err := policies.FS.ReadFile("input.schema.json")
	if err != nil {
		return err
	}
	env := policy.Env{Node: nodeName(cfg.Env.Node), Cluster: cfg.Env.Cluster, Environment: cfg.Env.Environment, Labels: cfg.Env.Labels}
	engine := policy.NewEngine(schema, d.log)
	dec := policy.NewDecider(engine, env, cfg.Location)
	dec.Observe = d.metrics.ObserveEvaluation
	dec.Record = d.pump.Record
	dec.Evaluations = func() bool { return d.cfg.Load().DecisionLog.Evaluations }
	d.pol = &policyState{engine: engine, decider: dec}
	return nil
}

// startPolicy puts the first revision in force (a directory or the shipped policies), or starts
// the bundle downloader (agents are granted nothing until a bundle is in force), and starts
// watching the directory.
func (d *Daemon) startPolicy(ctx context.Context, cfg *config.Loaded) error {
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
		probes = append(probes, d.pol.decider.Input(c))
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

// respond completes a decision record (the agent's task, the policy revision in force) and has
// the policy say what to do about an agent's denied or audited decision, given its
// decisions of the last minute, and writes the answer into the record; the kill path acts on it.
func (d *Daemon) respond(rec *events.Decision) {
	d.guardFollowUp(rec) // a depth deny has no agent (no slot)
	if rec.Slot == nil {
		return
	}
	if id, typ, ok := d.registry.TaskOf(*rec.Slot); ok {
		rec.TaskID, rec.TaskType = id, typ
	}
	resp, fresh, err := d.pol.decider.Respond(rec)
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
	d.killer.Respond(*rec)
}

// EvalPolicy evaluates query (grants, allow, stepup or respond) for input with the revision in
// force; for grants it also compiles the result, as the agent would get it.
func (d *Daemon) EvalPolicy(ctx context.Context, query string, input json.RawMessage) (any, error) {
	return d.pol.decider.Eval(ctx, query, input, d.compileOpts)
}

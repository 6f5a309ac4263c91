package policy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/policies"
)

// AgentSet is what a new revision is checked against and then applied to: the agents' contexts
// (probes of the revision) and their evaluation again.
type AgentSet interface {
	Contexts() []agents.Context
	Refresh(ctx context.Context) error
}

// Revisions is where the policy's revisions come from (policy.dir, the shipped policies, or a
// bundle service), and what follows one going into force: every agent is evaluated again. A
// revision the engine refuses changes nothing.
type Revisions struct {
	Engine  *Engine
	Decider *Decider
	// Agents is set once the registry exists (before Start).
	Agents AgentSet
	// Compile is how EvalPolicy compiles grants, as the agents get them.
	Compile compile.Options

	config func() *config.Loaded
	log    *slog.Logger
	stop   func() // the bundle downloader

	mu sync.Mutex // one revision offered at a time
}

// NewRevisions sets up the engine (it checks inputs against policies/input.schema.json) and the
// decider that answers for the agents with the revision in force: none until Start.
func NewRevisions(cfg func() *config.Loaded, log *slog.Logger) (*Revisions, error) {
	schema, err := policies.FS.ReadFile("input.schema.json")
	if err != nil {
		return nil, err
	}
	c := cfg()
	engine := NewEngine(schema, log)
	return &Revisions{Engine: engine, Decider: NewDecider(engine, EnvOf(c), c.Location), config: cfg, log: log}, nil
}

// EnvOf is where the agents run, as the configuration says.
func EnvOf(cfg *config.Loaded) Env {
	return Env{Node: config.NodeName(cfg.Env.Node), Cluster: cfg.Env.Cluster, Environment: cfg.Env.Environment, Labels: cfg.Env.Labels}
}

// Start puts the first revision in force (policy.dir or the shipped policies) and watches the
// directory, or starts the bundle downloader (agents are granted nothing until a bundle is in
// force).
func (r *Revisions) Start(ctx context.Context) error {
	cfg := r.config()
	if b := cfg.Policy.Bundle; b != nil {
		return r.startBundle(ctx, b)
	}
	f, err := r.load(cfg)
	if err != nil {
		return err
	}
	if _, err := r.Engine.Offer(ctx, f, StandardProbes(time.Now())); err != nil {
		return fmt.Errorf("no policy can be put in force: %w", err)
	}
	watch := cfg.Policy.Dir
	if watch == "" {
		watch = cfg.Policy.DataDir
	}
	if watch == "" {
		return nil
	}
	return WatchDir(ctx, watch, 300*time.Millisecond, r.log, func() {
		r.Reload(ctx, "policy files changed")
	})
}

// bundleOptions are the downloader's options of the configured bundle.
func bundleOptions(b *config.PolicyBundle) BundleOptions {
	return BundleOptions{Service: b.Service, Resource: b.Resource, MinDelay: b.MinDelay, MaxDelay: b.MaxDelay,
		KeyID: b.KeyID, Algorithm: b.Algorithm, Scope: b.Scope, Credentials: b.Credentials, TLS: b.TLS, Headers: b.Headers}
}

func (r *Revisions) startBundle(ctx context.Context, b *config.PolicyBundle) error {
	o := bundleOptions(b)
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
	stop, err := StartBundle(ctx, o, r.log, func(f *Files, err error) {
		if err != nil {
			r.log.Error("policy bundle", "error", err)
			return
		}
		r.offer(ctx, f, "bundle revision")
	})
	r.stop = stop
	return err
}

// Stop stops the bundle downloader (the directory's watch ends with Start's ctx).
func (r *Revisions) Stop() {
	if r.stop != nil {
		r.stop()
	}
}

func (r *Revisions) load(cfg *config.Loaded) (*Files, error) {
	if cfg.Policy.Dir != "" {
		return FromDir(cfg.Policy.Dir)
	}
	f, err := FromFS(policies.FS, "shipped policies")
	if err != nil || cfg.Policy.DataDir == "" {
		return f, err
	}
	return f.WithDataOf(cfg.Policy.DataDir)
}

// CheckConfigured checks, offline, the policy cfg names (policy.dir, or the shipped policies) as
// Start would put it in force: compiled, type-checked against the input schema, and every decision
// evaluated for the standard probe inputs. A bundle is downloaded at run time: not checked here.
func CheckConfigured(ctx context.Context, cfg *config.Loaded) (string, error) {
	if b := cfg.Policy.Bundle; b != nil {
		if _, err := BundleClient(bundleOptions(b)); err != nil {
			return "", err
		}
		return fmt.Sprintf("policy: from the bundle service %s (%s), its client configuration valid; the bundle is downloaded at run time: not checked here", b.Service, b.Resource), nil
	}
	schema, err := policies.FS.ReadFile("input.schema.json")
	if err != nil {
		return "", err
	}
	f, err := (&Revisions{}).load(cfg)
	if err != nil {
		return "", err
	}
	rev, err := Compile(ctx, f, schema)
	if err != nil {
		return "", err
	}
	probes := StandardProbes(time.Now())
	if err := Check(ctx, rev, probes); err != nil {
		return "", err
	}
	return fmt.Sprintf("policy: revision %s from %s compiles and decides %d probe inputs", rev.ID, f.Source, len(probes)), nil
}

// Reload reads the policy source again and, when a new revision goes into force, evaluates
// every agent again. A revision that is refused changes nothing.
func (r *Revisions) Reload(ctx context.Context, why string) (EngineStatus, error) {
	cfg := r.config()
	if cfg.Policy.Bundle != nil {
		return r.Engine.Status(), errors.New("the policy comes from a bundle service: it is downloaded when it changes")
	}
	f, err := r.load(cfg)
	if err != nil {
		r.log.Error("policy refused; the revision in force stays", "why", why, "error", err)
		return r.Engine.Status(), err
	}
	err = r.offer(ctx, f, why)
	return r.Engine.Status(), err
}

// offer puts f in force if the engine accepts it (the agents' inputs are among its probes), then
// evaluates every agent again.
func (r *Revisions) offer(ctx context.Context, f *Files, why string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	before := r.Engine.Current()
	probes := StandardProbes(time.Now())
	for _, c := range r.Agents.Contexts() {
		probes = append(probes, r.Decider.Input(c))
	}
	rev, err := r.Engine.Offer(ctx, f, probes)
	if err != nil {
		return err
	}
	if before != nil && rev.ID == before.ID {
		return nil
	}
	r.log.Info("policy changed; evaluating every agent", "why", why, "revision", rev.ID)
	return r.Agents.Refresh(ctx)
}

// Eval evaluates query (grants, allow, stepup or respond) for input with the revision in force;
// for grants it also compiles the result, as the agent would get it.
func (r *Revisions) Eval(ctx context.Context, query string, input []byte) (any, error) {
	return r.Decider.Eval(ctx, query, input, r.Compile)
}

package agents

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/panics"
)

// evaluate has the policy decide a's grants for its current context, compiles them and installs
// the result as the next generation when it differs from what is installed, then schedules the
// next evaluation the context calls for. Call with r.mu held.
//
// An evaluation that fails (the policy errs for this context) grants nothing: deny by default,
// and the error is kept on the agent. Rules that do not compile are left out and listed.
func (r *Registry) evaluate(ctx context.Context, a *agent) error {
	rs, c, err := r.decide(ctx, a)
	return r.install(a, rs, c, err)
}

// decide is the part of evaluate that needs no lock on the kernel: policy and compiler.
func (r *Registry) decide(ctx context.Context, a *agent) (*dataplane.RuleSet, Compiled, error) {
	var rs *dataplane.RuleSet
	var c Compiled
	var err error
	// What the policy and the compiler read comes from outside (the agent's context, policy data,
	// DNS answers, the file system): a panic in them grants the agent nothing, as an error does.
	if perr := panics.Run(BoundaryEvaluation, func() error {
		rs, c, err = r.decideUnguarded(ctx, a)
		return nil
	}); perr != nil {
		r.evalErrors.Add(1)
		c = Compiled{RuleSet: &dataplane.RuleSet{Mode: dataplane.ModeEnforce}}
		return c.RuleSet, c, perr
	}
	return rs, c, err
}

// BoundaryEvaluation counts the agent evaluations that panicked (see panics).
var BoundaryEvaluation = panics.Declare("agent evaluation")

func (r *Registry) decideUnguarded(ctx context.Context, a *agent) (*dataplane.RuleSet, Compiled, error) {
	now := r.opts.Now()
	r.expire(a, now)
	g, err := r.grantsOf(ctx, a, now)
	if t := a.ctx.Task; t != nil {
		// The grants for the task say how long it may live: past that, it is over, and the
		// grants are those without it.
		r.bound(a, g)
		if !t.ExpiresAt.After(now) {
			r.expire(a, now)
			g, err = r.grantsOf(ctx, a, now)
		}
	}
	a.grants = g
	c := r.compile(ctx, a, g)
	if a.info.ModeOverride != nil {
		c.RuleSet.Mode = *a.info.ModeOverride
	}
	a.next = nextEvaluation(a, g, c)
	c.RuleSet.Expires = ruleSetExpiry(a, g, c.RuleSet.Expires)
	return c.RuleSet, c, err
}

// compile compiles a's grants g; a pod's exec rules in its containers' roots.
func (r *Registry) compile(ctx context.Context, a *agent, g grants.Grants) Compiled {
	if a.flags&dataplane.AgentContainers != 0 {
		var roots []compile.Files
		if r.opts.ExecRoots != nil {
			roots = r.opts.ExecRoots(a.slot)
		}
		ctx = compile.WithExecRoots(ctx, roots)
	}
	if r.opts.Names != nil {
		ctx = compile.WithNames(ctx, r.opts.Names(a.slot))
	}
	return r.opts.Compile(ctx, g)
}

// DNSView is what the DNS proxy needs of an agent to decide a query of it.
type DNSView struct {
	Agent events.Agent
	// Names are the fqdn rules of its grants in force (exact names and *.domain patterns).
	Names []string
	// Audit: its rule set is in audit mode (a name no rule covers is answered and reported).
	Audit bool
}

// DNS returns what the DNS proxy needs of the agent in slot; false when there is none.
func (r *Registry) DNS(slot dataplane.Slot) (DNSView, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.live(slot)
	if !ok {
		return DNSView{}, false
	}
	v := DNSView{Agent: events.Agent{SpiffeID: a.info.SpiffeID, Slot: slot, CgroupID: a.info.CgroupID}}
	if t := a.ctx.Task; t != nil {
		v.Agent.TaskID, v.Agent.TaskType = t.ID, t.Type
	}
	if a.rs != nil {
		v.Audit = a.rs.Mode == dataplane.ModeAudit
	}
	for _, e := range a.grants.Egress {
		if e.FQDN != "" && !slices.Contains(v.Names, e.FQDN) {
			v.Names = append(v.Names, e.FQDN)
		}
	}
	return v, true
}

// Relearn compiles the agent in slot again from the grants in force, without evaluating the
// policy (what the agent learnt through the DNS proxy changed), and installs the result before
// it returns. Nothing is written when the rule set is the same.
func (r *Registry) Relearn(slot dataplane.Slot) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.live(slot)
	if !ok {
		return fmt.Errorf("%w: slot %d", ErrNotFound, slot)
	}
	if a.rs == nil || a.ctx.Revoked {
		return nil
	}
	c := r.recompile(context.Background(), a)
	a.next = nextEvaluation(a, a.grants, c)
	return r.install(a, c.RuleSet, c, a.err)
}

// recompile compiles a's grants in force again (no policy evaluation), with the mode override
// and the expiry an evaluation gives (the task's, valid_until). Call with r.mu held.
func (r *Registry) recompile(ctx context.Context, a *agent) Compiled {
	c := r.compile(ctx, a, a.grants)
	if a.info.ModeOverride != nil {
		c.RuleSet.Mode = *a.info.ModeOverride
	}
	c.RuleSet.Expires = ruleSetExpiry(a, a.grants, c.RuleSet.Expires)
	return c
}

// grantsOf has the policy decide a's grants for its current context (nothing when it errs).
func (r *Registry) grantsOf(ctx context.Context, a *agent, now time.Time) (grants.Grants, error) {
	r.evaluations.Add(1)
	var g grants.Grants
	var err error
	if a.ctx.Revoked {
		err = errors.New("the identity was revoked: nothing is granted")
	} else if g, err = r.opts.Evaluator.Grants(ctx, a.context()); err != nil {
		r.evalErrors.Add(1)
		err = fmt.Errorf("evaluating the policy failed, so nothing is granted: %w", err)
		g = grants.Grants{}
	}
	if a.ceiling != nil && a.ctx.Task != nil && err == nil {
		g = grants.Attenuate(g, *a.ceiling)
	}
	counted(&g, a.ctx.Task)
	if g.ValidUntil != nil && !g.ValidUntil.After(now) {
		g = grants.Grants{Mode: g.Mode, Sandbox: g.Sandbox, MaxLifetime: g.MaxLifetime}
	}
	return g, err
}

// install puts a decided rule set in force. Call with r.mu held.
func (r *Registry) install(a *agent, rs *dataplane.RuleSet, c Compiled, evalErr error) error {
	a.evaluated = r.opts.Now()
	a.refused, a.warnings, a.err, a.execFiles = c.Refused, c.Warnings, evalErr, c.ExecFiles
	r.refusedRules.Add(uint64(len(c.Refused)))
	if evalErr != nil {
		r.log.Error("agent granted nothing", "slot", a.slot, "spiffe_id", a.info.SpiffeID, "error", evalErr)
	}
	for _, f := range c.Refused {
		r.log.Warn("rule refused", "slot", a.slot, "spiffe_id", a.info.SpiffeID, "rule", f)
	}
	r.schedule(a)
	if a.rs != nil && a.synced {
		same := *rs
		same.Generation, same.Expires = a.rs.Generation, a.rs.Expires
		if reflect.DeepEqual(&same, a.rs) {
			if rs.Expires.Equal(a.rs.Expires) {
				return nil // nothing changed for the kernel
			}
			return r.moveExpiry(a, rs.Expires)
		}
	}
	a.info.Generation++
	rs.Generation = a.info.Generation
	a.rs = rs
	if err := r.apply(a); err != nil {
		return errors.Join(evalErr, err)
	}
	return nil
}

// ruleSetExpiry is when the kernel ends a's rule set by itself, whether tetherd runs or not: the
// earliest of the task's expiry, the grants' valid_until and dns (when the DNS answers the rule
// set holds expire; zero: none). tetherd evaluates again at that moment (nextEvaluation) and
// installs what holds without them; the kernel denies with reason expired from it until then.
// Approvals need none: their counted grants expire in the kernel one by one.
func ruleSetExpiry(a *agent, g grants.Grants, dns time.Time) time.Time {
	at := dns
	if g.ValidUntil != nil {
		at = earliest(at, *g.ValidUntil)
	}
	if t := a.ctx.Task; t != nil {
		at = earliest(at, t.ExpiresAt)
	}
	return at
}

// earliest is the earliest of times that are set (zero: none is).
func earliest(times ...time.Time) time.Time {
	var at time.Time
	for _, t := range times {
		if !t.IsZero() && (at.IsZero() || t.Before(at)) {
			at = t
		}
	}
	return at
}

// moveExpiry moves the expiry of a's rule set in force, which is otherwise what it was (a task
// renewed): in place, without writing the rule set again. Call with r.mu held.
func (r *Registry) moveExpiry(a *agent, expires time.Time) error {
	err := r.write("moving the rule set's expiry", func() error { return r.opts.Dataplane.SetExpiry(a.slot, expires) })
	if err != nil {
		// The kernel keeps the old expiry: the next evaluation installs the whole rule set.
		a.synced, a.err = false, err
		return err
	}
	a.rs.Expires = expires
	return nil
}

// nextEvaluation is the earliest moment the context or the grants call for: valid_until, the
// expiry of DNS answers, of the task, of an approval.
func nextEvaluation(a *agent, g grants.Grants, c Compiled) time.Time {
	next := earliest(ruleSetExpiry(a, g, time.Time{}), c.RefreshAt)
	if t := a.ctx.Task; t != nil {
		for _, ap := range t.Approvals {
			next = earliest(next, ap.ExpiresAt)
		}
	}
	return next
}

// expire drops an expired task and expired approvals from the context. Call with r.mu held.
func (r *Registry) expire(a *agent, now time.Time) {
	t := a.ctx.Task
	if t == nil {
		return
	}
	if !t.ExpiresAt.After(now) {
		r.log.Info("task expired", "slot", a.slot, "spiffe_id", a.info.SpiffeID, "task", t.ID)
		r.dropTask(a, "task expired (no heartbeat renewed it)")
		return
	}
	kept := t.Approvals[:0:0]
	for _, ap := range t.Approvals {
		switch {
		case !ap.ExpiresAt.After(now):
			r.log.Info("approval expired", "slot", a.slot, "task", t.ID, "approval", ap.ID)
			r.closeGrants([]Approval{ap})
		default:
			// Used up or not, an approval lasts until it expires: its uses count connects,
			// and the connections they opened live as long as it does.
			kept = append(kept, ap)
		}
	}
	t.Approvals = kept
}

// schedule arms a's timer for its next evaluation. Call with r.mu held.
func (r *Registry) schedule(a *agent) {
	if a.timer != nil {
		a.timer.Stop()
		a.timer = nil
	}
	if a.next.IsZero() || r.closed {
		return
	}
	slot, at := a.slot, a.next
	// at is a time of r.opts.Now's clock, not necessarily the wall clock's: the wait is their
	// difference. After a suspend Go's timer fires late; the kernel ended what expired on time.
	a.timer = time.AfterFunc(max(at.Sub(r.opts.Now()), 0), func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		cur, ok := r.live(slot)
		if !ok || cur != a || !cur.next.Equal(at) || r.closed {
			return // removed, or rescheduled meanwhile
		}
		if err := r.evaluate(context.Background(), cur); err != nil {
			r.log.Warn("scheduled evaluation", "slot", slot, "error", err)
		}
	})
}

// Refresh evaluates every agent again (the policy or what it reads changed) and installs what
// changed, several agents at a time.
func (r *Registry) Refresh(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var list []*agent
	for _, a := range r.agents {
		if !a.removing {
			list = append(list, a)
		}
	}
	// Each worker owns its agents; r.mu keeps everything else out meanwhile. The agents are
	// compiled at one moment: each path is looked at once for all of them.
	ctx = compile.WithMemo(ctx)
	errs := make([]error, len(list))
	work := make(chan int)
	var wg sync.WaitGroup
	for range min(r.opts.Workers, max(len(list), 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				a := list[i]
				rs, c, err := r.decide(ctx, a)
				if ierr := r.install(a, rs, c, err); ierr != nil {
					errs[i] = fmt.Errorf("agent %d (%s): %w", a.slot, a.info.SpiffeID, ierr)
				}
			}
		}()
	}
	for i := range list {
		work <- i
	}
	close(work)
	wg.Wait()
	return errors.Join(errs...)
}

// Recompile compiles every agent's last grants again, without evaluating the policy, and
// installs what changed: an executable replaced by a package upgrade (a new inode), a file that
// appeared for a glob or a path, a name whose DNS answer changed. Call it periodically.
func (r *Registry) Recompile(ctx context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ctx = compile.WithMemo(ctx)
	for _, a := range r.agents {
		if a.removing || a.rs == nil || a.ctx.Revoked {
			continue
		}
		c := r.recompile(ctx, a)
		same := *c.RuleSet
		same.Generation = a.rs.Generation
		if reflect.DeepEqual(&same, a.rs) {
			continue
		}
		r.log.Info("what the grants name changed on the host; compiling again", "slot", a.slot, "spiffe_id", a.info.SpiffeID)
		if err := r.install(a, c.RuleSet, c, a.err); err != nil {
			r.log.Warn("installing the recompiled rule set", "slot", a.slot, "error", err)
		}
	}
}

// Reevaluate evaluates the agent in slot again and installs the result before it returns: what
// its grants name on the host changed (a pod's container root was resolved).
func (r *Registry) Reevaluate(slot dataplane.Slot) (Agent, error) {
	return r.change(slot, func(*agent) error { return nil })
}

// SetMode overrides the mode the grants give (nil removes the override) and installs the result.
func (r *Registry) SetMode(slot dataplane.Slot, mode *dataplane.Mode) (Agent, error) {
	return r.change(slot, func(a *agent) error {
		a.info.ModeOverride = mode
		return nil
	})
}

// change applies f to the agent's context and evaluates it again. Call without r.mu.
func (r *Registry) change(slot dataplane.Slot, f func(*agent) error) (Agent, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.live(slot)
	if !ok {
		return Agent{}, fmt.Errorf("%w: slot %d", ErrNotFound, slot)
	}
	if err := f(a); err != nil {
		return r.view(a), err
	}
	err := r.evaluate(context.Background(), a)
	return r.view(a), err
}

// CompileOn is the Compiler that compiles with opts.
func CompileOn(opts compile.Options) Compiler {
	return func(ctx context.Context, g grants.Grants) Compiled {
		opts := opts
		if roots, ok := compile.ExecRootsOf(ctx); ok {
			opts.ExecRoots = roots
		}
		res := compile.Compile(ctx, g, opts)
		c := Compiled{RuleSet: &res.RuleSet, Warnings: res.Warnings, RefreshAt: res.RefreshAt, ExecFiles: res.ExecFiles}
		for _, f := range res.Refused {
			c.Refused = append(c.Refused, f.Error())
		}
		return c
	}
}

// ExecRule returns the exec rule the rule set in force of the agent in slot has for file, and
// whether it has one and is in audit mode: what the kernel decides an exec of file by.
func (r *Registry) ExecRule(slot dataplane.Slot, file dataplane.FileID) (rule dataplane.ExecRule, found, audit bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.agents[slot]
	if !ok || a.rs == nil {
		return dataplane.ExecRule{}, false, false
	}
	for _, e := range a.rs.Exec {
		if e.File == file {
			return e, true, a.rs.Mode == dataplane.ModeAudit
		}
	}
	return dataplane.ExecRule{}, false, a.rs.Mode == dataplane.ModeAudit
}

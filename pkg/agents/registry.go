// Package agents keeps the registry of agents: which cgroup subtree is which SPIFFE identity, in
// which kernel slot, under which compiled rule set and state. It holds the desired state and
// reconciles the kernel (a dataplane.Dataplane) to it: writes are retried, failures counted, and
// an agent whose kernel state could not be written is retried until it is. A registration is
// complete in the kernel (rule set, then state, then cgroup binding) before it returns, so an
// agent's first instruction already runs under its rule set.
package agents

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/identity"
)

// Source gives an agent's current grants. ok is false when nothing is granted to it.
type Source interface {
	Grants(spiffeID string) (g grants.Grants, ok bool)
}

// Compiler compiles grants into a rule set (and warnings).
type Compiler func(grants.Grants) (*dataplane.RuleSet, []string, error)

// Agent is one registered agent as the API shows it.
type Agent struct {
	Slot         dataplane.Slot    `json:"slot"`
	SpiffeID     string            `json:"spiffe_id"`
	Cgroup       string            `json:"cgroup"`
	CgroupID     uint64            `json:"cgroup_id"`
	Launched     bool              `json:"launched"`
	Launcher     *uint32           `json:"launcher_uid,omitempty"`
	Registered   time.Time         `json:"registered"`
	Mode         string            `json:"mode"`
	ModeOverride string            `json:"mode_override,omitempty"`
	Killed       bool              `json:"killed"`
	Generation   uint64            `json:"generation"`
	Synced       bool              `json:"synced"` // the kernel holds the desired state
	Warnings     []string          `json:"warnings,omitempty"`
	Error        string            `json:"error,omitempty"`
	Counts       map[string]uint64 `json:"counts,omitempty"`
}

// Stats count what the registry could not do at the first attempt.
type Stats struct {
	MapWriteFailures uint64 `json:"map_write_failures"` // attempts that failed
	MapWriteRetries  uint64 `json:"map_write_retries"`  // attempts after a failure
	CompileErrors    uint64 `json:"compile_errors"`
}

// Options configure a Registry.
type Options struct {
	Dataplane dataplane.Dataplane
	Source    Source
	Compile   Compiler
	// Parents are the agent parent cgroups (absolute); registered cgroups must be below one.
	Parents []string
	// LaunchParent is where Launch creates agent cgroups.
	LaunchParent string
	// Cgroups creates, identifies and removes cgroups; nil means the real cgroup2 hierarchy.
	Cgroups Cgroups
	Logger  *slog.Logger
}

// Cgroups is what the registry needs of the cgroup hierarchy.
type Cgroups interface {
	ID(path string) (uint64, error)
	// Mkdir creates one agent cgroup, nested at most dataplane.MaxAncestors deep below it;
	// os.ErrExist when it exists.
	Mkdir(path string) error
	// Remove kills what runs in the cgroup and removes it.
	Remove(path string) error
	// DepthLimited reports whether cgroups below path can only nest as deep as the hooks look.
	DepthLimited(path string) bool
}

type realCgroups struct{}

func (realCgroups) ID(path string) (uint64, error) { return cgroups.ID(path) }
func (realCgroups) Remove(path string) error       { return cgroups.Remove(path, 10*time.Second) }

// Mkdir also limits nesting: a process more than MaxAncestors levels below its agent would not
// be found by the hooks, so the agent could nest that deep to leave exec enforcement.
func (realCgroups) Mkdir(path string) error {
	if err := os.Mkdir(path, 0o755); err != nil {
		return err
	}
	if err := cgroups.SetMaxDepth(path, dataplane.MaxAncestors); err != nil {
		os.Remove(path)
		return fmt.Errorf("limiting the depth of %s: %w", path, err)
	}
	return nil
}

func (realCgroups) DepthLimited(path string) bool {
	n, ok, err := cgroups.MaxDepth(path)
	return err == nil && ok && n <= dataplane.MaxAncestors
}

// Registry is the set of registered agents. It is safe for concurrent use.
type Registry struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	agents map[dataplane.Slot]*agent
	// retired remembers who last held a free slot, so that events the kernel wrote before an
	// agent was unregistered are still attributed to it; slots are reused round-robin.
	retired  map[dataplane.Slot]retiredAgent
	nextSlot dataplane.Slot

	failures, retries, compileErrors atomic.Uint64
}

type retiredAgent struct {
	id   string
	mode dataplane.Mode
}

type agent struct {
	info     dataplane.Info
	slot     dataplane.Slot
	rs       *dataplane.RuleSet // last rule set compiled without error
	flags    dataplane.AgentFlags
	synced   bool // the kernel holds rs, flags, info and the binding
	warnings []string
	err      error   // last compile or kernel error
	launcher *uint32 // not kept across restarts: then only admins end the agent
	removing bool    // Unregister is under way: nothing may write this agent again
}

// New returns an empty registry; call Adopt to take over what the kernel already holds.
func New(opts Options) *Registry {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Cgroups == nil {
		opts.Cgroups = realCgroups{}
	}
	return &Registry{opts: opts, log: opts.Logger, agents: map[dataplane.Slot]*agent{}, retired: map[dataplane.Slot]retiredAgent{}}
}

// Stats returns the registry's counters.
func (r *Registry) Stats() Stats {
	return Stats{MapWriteFailures: r.failures.Load(), MapWriteRetries: r.retries.Load(), CompileErrors: r.compileErrors.Load()}
}

// write runs one kernel write, retrying a few times with a short backoff, counting failures.
func (r *Registry) write(what string, f func() error) error {
	var err error
	for attempt := range 4 {
		if attempt > 0 {
			r.retries.Add(1)
			time.Sleep(time.Duration(attempt*attempt) * 5 * time.Millisecond)
		}
		if err = f(); err == nil {
			return nil
		}
		r.failures.Add(1)
		r.log.Warn("kernel write failed", "what", what, "attempt", attempt+1, "error", err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// compile compiles the current grants of id with the mode override applied.
func (r *Registry) compile(id string, override *dataplane.Mode) (*dataplane.RuleSet, []string, error) {
	g, ok := r.opts.Source.Grants(id)
	if !ok {
		g = grants.Grants{} // nothing granted: an empty rule set denies everything
	}
	if g.ValidUntil != nil && !g.ValidUntil.After(time.Now()) {
		g = grants.Grants{Mode: g.Mode}
	}
	rs, warnings, err := r.opts.Compile(g)
	if err != nil {
		r.compileErrors.Add(1)
		return nil, warnings, err
	}
	if override != nil {
		rs.Mode = *override
	}
	return rs, warnings, nil
}

// Registration asks to make a cgroup an agent.
type Registration struct {
	SpiffeID string
	// Cgroup is the cgroup directory (absolute). Empty with Launch: a new one is created.
	Cgroup string
	// Launch creates the cgroup under the launch parent and removes it when the agent ends.
	Launch bool
	// Launcher is the uid that asked for the launch; it may end the agent.
	Launcher *uint32
	// LauncherPID is the process that asked for the launch (it starts the command).
	LauncherPID int32
}

// Register binds a cgroup to an identity and installs its rule set before returning.
func (r *Registry) Register(req Registration) (Agent, error) {
	id, err := identity.Parse(req.SpiffeID)
	if err != nil {
		return Agent{}, err
	}
	if len(id) > dataplane.MaxIDLen {
		return Agent{}, fmt.Errorf("SPIFFE ID longer than %d bytes", dataplane.MaxIDLen)
	}
	path := req.Cgroup
	if req.Launch {
		if path != "" {
			return Agent{}, errors.New("a launched agent gets a new cgroup: do not name one")
		}
		if path, err = r.newLaunchCgroup(id); err != nil {
			return Agent{}, err
		}
	} else if err := r.checkCgroup(path); err != nil {
		return Agent{}, err
	}
	a, err := r.register(id, path, req.Launch, req.Launcher)
	if err != nil && req.Launch {
		r.opts.Cgroups.Remove(path)
	}
	return a, err
}

func (r *Registry) newLaunchCgroup(id string) (string, error) {
	name := filepath.Base(id)
	name = strings.Map(func(c rune) rune {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' {
			return c
		}
		return '_'
	}, name)
	if len(name) > 40 {
		name = name[:40]
	}
	for range 10 {
		path := filepath.Join(r.opts.LaunchParent, fmt.Sprintf("%s-%s", name, randomSuffix()))
		if err := r.opts.Cgroups.Mkdir(path); err == nil {
			return path, nil
		} else if !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("creating agent cgroup: %w", err)
		}
	}
	return "", errors.New("creating agent cgroup: no free name")
}

// checkCgroup refuses cgroups the programs would not see.
func (r *Registry) checkCgroup(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("cgroup %q: must be an absolute path", path)
	}
	path = filepath.Clean(path)
	if len(path) > dataplane.MaxCgroupPath {
		return fmt.Errorf("cgroup path longer than %d bytes", dataplane.MaxCgroupPath)
	}
	if err := r.underParent(path); err != nil {
		return err
	}
	_, err := r.opts.Cgroups.ID(path)
	return err
}

func (r *Registry) underParent(path string) error {
	if !slices.ContainsFunc(r.opts.Parents, func(p string) bool { return strings.HasPrefix(path, p+"/") }) {
		return fmt.Errorf("cgroup %s is not below an agent parent (%s): tether's programs would not run for its processes", path, strings.Join(r.opts.Parents, ", "))
	}
	return nil
}

func (r *Registry) register(id, path string, launched bool, launcher *uint32) (Agent, error) {
	cgid, err := r.opts.Cgroups.ID(path)
	if err != nil {
		return Agent{}, err
	}
	rs, warnings, err := r.compile(id, nil)
	if err != nil {
		return Agent{}, fmt.Errorf("compiling the grants of %s: %w", id, err)
	}
	if !r.opts.Cgroups.DepthLimited(path) {
		warnings = append(warnings, fmt.Sprintf("cgroups below %s may nest deeper than the %d levels tether's hooks look up: "+
			"processes that deep are denied network access but escape exec rules; set its cgroup.max.depth to %d",
			path, dataplane.MaxAncestors, dataplane.MaxAncestors))
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.agents {
		if a.info.CgroupID == cgid {
			return Agent{}, fmt.Errorf("cgroup %s is already agent %d (%s)", path, a.slot, a.info.SpiffeID)
		}
	}
	slot, ok := r.freeSlot()
	if !ok {
		return Agent{}, fmt.Errorf("no free agent slot: the kernel holds %d agents", dataplane.MaxAgents)
	}
	a := &agent{
		slot:     slot,
		rs:       rs,
		flags:    dataplane.AgentActive,
		warnings: warnings,
		launcher: launcher,
		info: dataplane.Info{SpiffeID: id, CgroupPath: path, CgroupID: cgid,
			Registered: time.Now(), Launched: launched},
	}
	rs.Generation = 1
	a.info.Generation = 1
	if err := r.apply(a); err != nil {
		r.write("rolling back slot", func() error { return r.opts.Dataplane.Clear(slot) })
		return Agent{}, err
	}
	r.agents[slot] = a
	r.log.Info("agent registered", "slot", slot, "spiffe_id", id, "cgroup", path, "generation", rs.Generation)
	for _, w := range warnings {
		r.log.Warn("grants", "spiffe_id", id, "warning", w)
	}
	return r.view(a), nil
}

func randomSuffix() string {
	var b [4]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// freeSlot returns the next free slot after the last one handed out, so that a slot is reused
// as late as possible.
func (r *Registry) freeSlot() (dataplane.Slot, bool) {
	for i := range dataplane.Slot(dataplane.MaxAgents) {
		s := (r.nextSlot + i) % dataplane.MaxAgents
		if _, used := r.agents[s]; !used {
			r.nextSlot = s + 1
			delete(r.retired, s)
			return s, true
		}
	}
	return 0, false
}

// apply writes an agent's whole desired state to the kernel, binding last: the cgroup becomes
// the agent only once its rule set and state are there.
func (r *Registry) apply(a *agent) error {
	if a.removing {
		return fmt.Errorf("agent %d is being removed", a.slot)
	}
	dp := r.opts.Dataplane
	install := func() error {
		if a.rs == nil {
			return nil // adopted with grants that do not compile: the pinned rule set stays
		}
		return dp.Install(a.slot, a.rs)
	}
	err := errors.Join(
		r.write("installing rule set", install),
		r.write("setting agent state", func() error { return dp.SetFlags(a.slot, a.flags) }),
		r.write("recording agent info", func() error { return dp.PutInfo(a.slot, a.info) }),
	)
	if err == nil {
		err = r.write("binding cgroup", func() error { return dp.Bind(a.info.CgroupID, a.slot) })
	}
	a.synced = err == nil
	if err != nil {
		a.err = err
	}
	return err
}

// Unregister unbinds an agent and forgets it. A launched agent's cgroup is removed, with
// whatever still runs in it.
func (r *Registry) Unregister(slot dataplane.Slot) error {
	r.mu.Lock()
	a, ok := r.agents[slot]
	if ok && a.removing {
		ok = false
	}
	if ok {
		a.removing = true // from here no write brings the agent back into the kernel
	}
	r.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: slot %d", ErrNotFound, slot)
	}
	if a.info.Launched {
		// Killed while still enforced, then removed: nothing of it runs unhooked.
		if err := r.opts.Cgroups.Remove(a.info.CgroupPath); err != nil {
			r.mu.Lock()
			a.removing = false
			r.mu.Unlock()
			return fmt.Errorf("removing agent cgroup: %w", err)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.write("clearing slot", func() error { return r.opts.Dataplane.Clear(slot) }); err != nil {
		// Partly cleared: the agent stays registered and Reconcile writes it whole again.
		a.removing, a.synced, a.err = false, false, err
		return err
	}
	delete(r.agents, slot)
	r.retired[slot] = retiredAgent{id: a.info.SpiffeID}
	if a.rs != nil {
		r.retired[slot] = retiredAgent{id: a.info.SpiffeID, mode: a.rs.Mode}
	}
	r.log.Info("agent unregistered", "slot", slot, "spiffe_id", a.info.SpiffeID)
	return nil
}

// live returns the agent in slot unless it is being removed. Call with r.mu held.
func (r *Registry) live(slot dataplane.Slot) (*agent, bool) {
	a, ok := r.agents[slot]
	if !ok || a.removing {
		return nil, false
	}
	return a, true
}

// ErrNotFound is returned for a slot no agent is in.
var ErrNotFound = errors.New("no such agent")

// SetMode overrides the mode the grants give (nil removes the override) and installs the result.
func (r *Registry) SetMode(slot dataplane.Slot, mode *dataplane.Mode) (Agent, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.live(slot)
	if !ok {
		return Agent{}, fmt.Errorf("%w: slot %d", ErrNotFound, slot)
	}
	a.info.ModeOverride = mode
	return r.recompile(a)
}

// SetKilled sets or clears the agent's killed flag: while set, the kernel denies every connect,
// sendmsg, socket and exec of the agent, whatever its rule set says.
func (r *Registry) SetKilled(slot dataplane.Slot, killed bool) (Agent, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.live(slot)
	if !ok {
		return Agent{}, fmt.Errorf("%w: slot %d", ErrNotFound, slot)
	}
	if killed {
		a.flags |= dataplane.AgentKilled
	} else {
		a.flags &^= dataplane.AgentKilled
	}
	err := r.write("setting agent state", func() error { return r.opts.Dataplane.SetFlags(slot, a.flags) })
	if err != nil {
		a.synced, a.err = false, err
		return r.view(a), err
	}
	r.log.Info("agent killed flag", "slot", slot, "spiffe_id", a.info.SpiffeID, "killed", killed)
	return r.view(a), nil
}

// recompile compiles the agent's grants again and installs them as the next generation. If they
// do not compile, the installed rule set stays in force and the error is recorded.
func (r *Registry) recompile(a *agent) (Agent, error) {
	rs, warnings, err := r.compile(a.info.SpiffeID, a.info.ModeOverride)
	if err != nil {
		a.err = fmt.Errorf("grants do not compile, generation %d stays in force: %w", a.info.Generation, err)
		r.log.Error("grants refused", "slot", a.slot, "spiffe_id", a.info.SpiffeID, "error", err)
		return r.view(a), a.err
	}
	a.info.Generation++
	rs.Generation = a.info.Generation
	a.rs, a.warnings, a.err = rs, warnings, nil
	if err := r.apply(a); err != nil {
		return r.view(a), err
	}
	return r.view(a), nil
}

// Refresh compiles every agent's grants again (the source changed) and installs them.
func (r *Registry) Refresh() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, a := range r.agents {
		if a.removing {
			continue
		}
		if _, err := r.recompile(a); err != nil {
			errs = append(errs, fmt.Errorf("agent %d (%s): %w", a.slot, a.info.SpiffeID, err))
		}
	}
	return errors.Join(errs...)
}

// Recheck compiles every agent's grants again and installs the result where it differs from what
// is installed: an executable replaced by a package upgrade (a new inode), a file that appeared
// for a glob or a path that did not exist. Call it periodically.
func (r *Registry) Recheck() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.agents {
		if a.removing {
			continue
		}
		rs, _, err := r.compile(a.info.SpiffeID, a.info.ModeOverride)
		if err != nil || a.rs == nil {
			continue // Refresh reports compile errors; the installed rule set stays
		}
		rs.Generation = a.rs.Generation
		if reflect.DeepEqual(rs, a.rs) {
			continue
		}
		r.log.Info("files named by the grants changed; compiling again", "slot", a.slot, "spiffe_id", a.info.SpiffeID)
		r.recompile(a)
	}
}

// Reconcile retries the kernel writes of agents that are not in sync. Call it periodically.
func (r *Registry) Reconcile() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.agents {
		if !a.synced && !a.removing {
			if err := r.apply(a); err == nil {
				a.err = nil
				r.log.Info("agent state written after earlier failures", "slot", a.slot)
			}
		}
	}
}

// Adopt takes over the agents recorded in the kernel by an earlier tetherd: agents whose cgroup
// is gone are cleared, the rest get their grants compiled and installed again, and bindings
// that belong to no recorded agent are removed.
func (r *Registry) Adopt() error {
	dp := r.opts.Dataplane
	infos, err := dp.Infos()
	if err != nil {
		return err
	}
	bindings, err := dp.Bindings()
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for slot, info := range infos {
		if id, err := r.opts.Cgroups.ID(info.CgroupPath); err != nil || id != info.CgroupID {
			r.log.Info("dropping agent whose cgroup is gone", "slot", slot, "spiffe_id", info.SpiffeID, "cgroup", info.CgroupPath)
			errs = append(errs, r.write("clearing slot", func() error { return dp.Clear(slot) }))
			continue
		}
		if err := r.underParent(info.CgroupPath); err != nil {
			// Its parent is no longer configured, so its connects are no longer hooked: keeping
			// it would report an agent whose network rules nothing enforces.
			r.log.Warn("dropping agent outside the configured agent parents", "slot", slot, "spiffe_id", info.SpiffeID, "cgroup", info.CgroupPath)
			errs = append(errs, r.write("clearing slot", func() error { return dp.Clear(slot) }))
			continue
		}
		flags, err := dp.Flags(slot)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		a := &agent{slot: slot, info: info, flags: flags | dataplane.AgentActive, synced: true}
		r.agents[slot] = a
		r.nextSlot = max(r.nextSlot, slot+1)
		if _, err := r.recompile(a); err != nil {
			// The kernel keeps the rule set the previous tetherd installed (a.rs stays nil:
			// nothing to install until the grants compile).
			errs = append(errs, err)
		}
		r.log.Info("adopted agent", "slot", slot, "spiffe_id", info.SpiffeID, "cgroup", info.CgroupPath, "generation", a.info.Generation)
	}
	for cgid, slot := range bindings {
		if a, ok := r.agents[slot]; !ok || a.info.CgroupID != cgid {
			errs = append(errs, r.write("removing orphan binding", func() error { return dp.Unbind(cgid) }))
		}
	}
	return errors.Join(errs...)
}

// Get returns the agent in slot.
func (r *Registry) Get(slot dataplane.Slot) (Agent, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.agents[slot]
	if !ok {
		return Agent{}, false
	}
	return r.view(a), true
}

// Identity returns the SPIFFE ID of the agent in slot (or of the agent that last held it), for
// attributing events; it reads no kernel state.
func (r *Registry) Identity(slot dataplane.Slot) (id string, mode dataplane.Mode, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.agents[slot]
	if !ok {
		old, ok := r.retired[slot]
		return old.id, old.mode, ok
	}
	if a.rs != nil {
		mode = a.rs.Mode
	}
	return a.info.SpiffeID, mode, true
}

// List returns every agent, by slot, with its decision counts.
func (r *Registry) List() []Agent {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Agent, 0, len(r.agents))
	for _, a := range r.agents {
		v := r.view(a)
		if counts, err := r.opts.Dataplane.AgentCounts(a.slot); err == nil {
			v.Counts = map[string]uint64{}
			for k := range dataplane.NumKinds {
				for verdict := range dataplane.NumVerdicts {
					if n := counts[k][verdict]; n > 0 {
						v.Counts[dataplane.Kind(k).String()+"/"+dataplane.Verdict(verdict).String()] = n
					}
				}
			}
		}
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b Agent) int { return int(a.Slot) - int(b.Slot) })
	return out
}

// Launched returns the slots of agents whose cgroup tetherd created.
func (r *Registry) Launched() map[dataplane.Slot]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[dataplane.Slot]string{}
	for s, a := range r.agents {
		if a.info.Launched {
			out[s] = a.info.CgroupPath
		}
	}
	return out
}

func (r *Registry) view(a *agent) Agent {
	v := Agent{
		Slot: a.slot, SpiffeID: a.info.SpiffeID, Cgroup: a.info.CgroupPath, CgroupID: a.info.CgroupID,
		Launched: a.info.Launched, Launcher: a.launcher, Registered: a.info.Registered, Killed: a.flags&dataplane.AgentKilled != 0,
		Generation: a.info.Generation, Synced: a.synced, Warnings: a.warnings,
	}
	if a.rs != nil {
		v.Mode = a.rs.Mode.String()
	}
	if a.info.ModeOverride != nil {
		v.ModeOverride = a.info.ModeOverride.String()
	}
	if a.err != nil {
		v.Error = a.err.Error()
	}
	return v
}

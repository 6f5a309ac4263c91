// Package agents keeps the registry of agents: which cgroup subtree is which SPIFFE identity, in
// which kernel slot, doing which task, under which compiled rule set and state. Whenever an
// agent's context changes (it registers, its task starts, is renewed or ends, an approval arrives
// or expires, its grants reach valid_until, DNS answers expire, its identity changes, the policy
// changes) the registry has the policy evaluate its grants again, compiles them, and installs the
// result in the kernel (a dataplane.Dataplane), whose swap is atomic per agent. Kernel writes are
// retried and counted; an agent whose state could not be written is retried until it is. A
// registration is complete in the kernel (rule set, then state, then cgroup binding) before it
// returns, so an agent's first instruction already runs under its rule set.
package agents

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"

	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/identity"
)

// Context is what the policy reads of an agent besides the environment and the time.
type Context struct {
	Slot      dataplane.Slot // set in what the registry hands out; not part of the policy input
	SpiffeID  string
	Revoked   bool // the identity was revoked: the agent is granted nothing
	Selectors []string
	Labels    map[string]string
	Task      *Task
}

// ReservedLabelPrefix marks the labels only admins may set (tether.dev/mode: audit steers tether
// itself): the API refuses them from launchers, and discovery drops them from pod labels.
const ReservedLabelPrefix = "tether.dev/"

// TaskInfo is what the policy is told of a task (input.task; policy.Task) besides its
// approvals and its sender.
type TaskInfo struct {
	ID          string    `json:"id"`
	Type        string    `json:"type"`
	Sensitivity string    `json:"sensitivity,omitempty"`
	StartedAt   time.Time `json:"started_at"`
	ExpiresAt   time.Time `json:"expires_at"`
}

// Task is what an agent is doing: at most one at a time.
type Task struct {
	TaskInfo
	Approvals []Approval `json:"approvals,omitempty"`
	// HandoffFrom is the SPIFFE ID of the agent that handed this task over; the grants for it
	// are then at most what that agent had.
	HandoffFrom string `json:"handoff_from,omitempty"`
	// NotAfter bounds every renewal: the grants' max_lifetime after StartedAt, and for a
	// handed-over task no later than its sender's task expires.
	NotAfter time.Time `json:"not_after,omitzero"`

	// The sender of a handed-over task: its slot and task, and when that task expired when last
	// seen.
	fromSlot      dataplane.Slot
	fromTask      string
	senderExpires time.Time
}

// ApprovalInfo is what the policy is told of an approval (input.task.approvals).
type ApprovalInfo struct {
	ID         string    `json:"id"`
	Action     string    `json:"action"`
	Resource   string    `json:"resource"`
	ExpiresAt  time.Time `json:"expires_at"`
	ApprovedBy string    `json:"approved_by,omitempty"`
}

// Approval is a step-up a human approved for a task.
type Approval struct {
	ApprovalInfo
	// Uses bounds the connects the rules holding by the approval allow (0: until it expires);
	// the kernel counts them (counted grant Grant). UsesLeft is what the kernel has left, in
	// views.
	Uses     int64  `json:"uses,omitempty"`
	UsesLeft *int64 `json:"uses_left,omitempty"`
	Grant    uint32 `json:"grant,omitempty"`
}

// Evaluator decides an agent's grants from its context (the policy, through the daemon).
type Evaluator interface {
	Grants(ctx context.Context, c Context) (grants.Grants, error)
}

// Compiled is a rule set compiled from grants and what compiling refused.
type Compiled struct {
	RuleSet   *dataplane.RuleSet
	Refused   []string
	Warnings  []string
	RefreshAt time.Time // compile again then (DNS answers expire); zero: never
	ExecFiles []string  // the files the exec rules allow, by name
}

// Compiler compiles grants.
type Compiler func(ctx context.Context, g grants.Grants) Compiled

// Agent is one registered agent as the API shows it.
type Agent struct {
	Slot       dataplane.Slot `json:"slot"`
	SpiffeID   string         `json:"spiffe_id"`
	Revoked    bool           `json:"revoked,omitempty"`
	Cgroup     string         `json:"cgroup"`
	CgroupID   uint64         `json:"cgroup_id"`
	Launched   bool           `json:"launched"`
	Launcher   *uint32        `json:"launcher_uid,omitempty"`
	UID        uint32         `json:"uid"` // the agent runs as this uid (its credential file is for it)
	DynamicUID bool           `json:"dynamic_uid,omitempty"`
	// Sandbox is the launcher's confinement profile the grants name (strict, default, off).
	Sandbox      string            `json:"sandbox"`
	Registered   time.Time         `json:"registered"`
	Selectors    []string          `json:"selectors,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	Task         *Task             `json:"task,omitempty"`
	Mode         string            `json:"mode"`
	ModeOverride string            `json:"mode_override,omitempty"`
	Killed       bool              `json:"killed"`
	Generation   uint64            `json:"generation"`
	Evaluated    time.Time         `json:"evaluated,omitzero"`
	NextEval     time.Time         `json:"next_evaluation,omitzero"`
	Synced       bool              `json:"synced"` // the kernel holds the desired state
	Refused      []string          `json:"refused_rules,omitempty"`
	Warnings     []string          `json:"warnings,omitempty"`
	Error        string            `json:"error,omitempty"`
	Counts       Counts            `json:"counts,omitempty"`
}

// Stats count what the registry could not do at the first attempt, and its evaluations.
type Stats struct {
	MapWriteFailures uint64 `json:"map_write_failures"` // attempts that failed
	MapWriteRetries  uint64 `json:"map_write_retries"`  // attempts after a failure
	Evaluations      uint64 `json:"evaluations"`
	EvalErrors       uint64 `json:"evaluation_errors"` // the agent was granted nothing
	RefusedRules     uint64 `json:"refused_rules"`
	Installs         uint64 `json:"installs"`
}

// Options configure a Registry.
type Options struct {
	Dataplane dataplane.Dataplane
	Evaluator Evaluator
	Compile   Compiler
	// Parents are the agent parent cgroups (absolute); registered cgroups must be below one.
	Parents []string
	// LaunchParent is where Launch creates agent cgroups.
	LaunchParent string
	// Cgroups creates, identifies and removes cgroups; nil means the real cgroup2 hierarchy.
	Cgroups Cgroups
	// Workers evaluate and install in parallel when every agent is evaluated (0: 4).
	Workers int
	// TaskEnded, if set, is told that an agent's task ended: ended, expired or the identity
	// revoked (from a goroutine of its own), or the agent unregistered (with the registry
	// locked, before Unregister returns). It must not call back.
	TaskEnded func(slot dataplane.Slot, spiffeID string, task Task, reason string)
	// Denied, if set, says whether a SPIFFE ID is on the kill path's deny list: an agent that
	// has it is registered killed (everything denied).
	Denied func(spiffeID string) bool
	// Retiring, if set, is given the view (with the kernel's decision counts) of an agent about
	// to be unregistered. It is called with the registry locked: it must not call back.
	Retiring func(a Agent)
	// Unregistered, if set, is told (after TaskEnded, with the registry locked, before
	// Unregister returns) that an agent was unregistered. It must not call back.
	Unregistered func(slot dataplane.Slot)
	// UIDs are where launched agents without a user of their own get a uid, one no live agent
	// has (UIDRange{}: none; such launches are refused).
	UIDs UIDRange
	// UIDsInUse returns the uids of the host's users and running processes, which a dynamic
	// uid must not be; nil: read /etc/passwd and /proc.
	UIDsInUse func() (map[uint32]bool, error)
	// ExecRoots returns the container roots a pod agent's exec rules are compiled in (see
	// Registration.Containers); nil: none.
	ExecRoots func(slot dataplane.Slot) []compile.Files
	// Names returns what an agent learnt through the DNS proxy, which its fqdn rules are
	// compiled from (nil: the proxy is off, and fqdn rules are resolved by the compiler's
	// Resolver).
	Names func(slot dataplane.Slot) compile.Names
	// Now is the clock (tests); nil: bootclock.Now, the clock of the kernel's deadlines.
	Now    func() time.Time
	Logger *slog.Logger
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
	closed   bool
	grants   grantPool // counted grants' numbers
	nextUID  uint32    // dynamic uids are handed out round-robin, reused as late as possible

	failures, retries, evaluations, evalErrors, refusedRules, installs atomic.Uint64

	// idents are the live agents by slot (dataplane.Slot -> Ident), read without mu: a kill
	// finds its target and denies it while mu is held for as long as a policy change takes.
	idents sync.Map
}

// Ident is who the agent in a slot is, as Peek and Idents read it without the registry's lock.
type Ident struct {
	Slot     dataplane.Slot
	SpiffeID string
	Cgroup   string
}

func (a *agent) ident() Ident {
	return Ident{Slot: a.slot, SpiffeID: a.info.SpiffeID, Cgroup: a.info.CgroupPath}
}

// Peek returns who the live agent in slot is, without waiting for the registry's lock.
func (r *Registry) Peek(slot dataplane.Slot) (Ident, bool) {
	v, ok := r.idents.Load(slot)
	if !ok {
		return Ident{}, false
	}
	return v.(Ident), true
}

// Idents returns who the live agents are, without waiting for the registry's lock.
func (r *Registry) Idents() []Ident {
	var out []Ident
	r.idents.Range(func(_, v any) bool {
		out = append(out, v.(Ident))
		return true
	})
	return out
}

// Deny sets the killed flag of the agent in slot in the kernel at once, without the registry's
// lock (the kill path's first step); SetKilled then records it in the registry.
func (r *Registry) Deny(slot dataplane.Slot) error {
	if _, ok := r.Peek(slot); !ok {
		return fmt.Errorf("%w: slot %d", ErrNotFound, slot)
	}
	return r.opts.Dataplane.Kill(slot)
}

type retiredAgent struct {
	id   string
	mode dataplane.Mode
}

type agent struct {
	info    dataplane.Info
	slot    dataplane.Slot
	ctx     Context
	rs      *dataplane.RuleSet // installed (or to install); nil until the first evaluation
	grants  grants.Grants      // of the last evaluation, for compiling again without one
	ceiling *grants.Grants     // a handed-over task's grants are at most these (the sender's)
	flags   dataplane.AgentFlags
	synced  bool // the kernel holds rs, flags, info and the binding
	// wrote is what the last writes put into the kernel, while synced: apply writes the flags and
	// the binding again only when they changed (a policy change touches neither; a binding costs
	// a walk of the cgroup's processes).
	wrote struct {
		flags  dataplane.AgentFlags
		cgroup uint64 // 0: not bound by this registry yet
	}
	evaluated time.Time
	next      time.Time   // next evaluation the context calls for
	timer     *time.Timer // fires at next
	refused   []string
	warnings  []string
	err       error   // last evaluation or kernel error
	launcher  *uint32 // not kept across restarts: then only admins end the agent
	uid       uint32  // not kept across restarts either (then 0: only root reads the credential)
	uidKnown  bool    // uid is the agent's (a launch or a registration said so; not after a restart)
	dynamic   bool    // uid was picked from Options.UIDs
	execFiles []string
	removing  bool // Unregister is under way: nothing may write this agent again
}

// New returns an empty registry; call Adopt to take over what the kernel already holds.
func New(opts Options) *Registry {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Cgroups == nil {
		opts.Cgroups = realCgroups{}
	}
	if opts.Workers == 0 {
		opts.Workers = 4
	}
	if opts.Now == nil {
		opts.Now = bootclock.Now
	}
	if opts.UIDsInUse == nil {
		opts.UIDsInUse = hostUIDs
	}
	return &Registry{opts: opts, log: opts.Logger, agents: map[dataplane.Slot]*agent{}, retired: map[dataplane.Slot]retiredAgent{}}
}

// Close stops the evaluation timers.
func (r *Registry) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	for _, a := range r.agents {
		if a.timer != nil {
			a.timer.Stop()
		}
	}
}

// Stats returns the registry's counters.
func (r *Registry) Stats() Stats {
	return Stats{MapWriteFailures: r.failures.Load(), MapWriteRetries: r.retries.Load(),
		Evaluations: r.evaluations.Load(), EvalErrors: r.evalErrors.Load(), RefusedRules: r.refusedRules.Load(),
		Installs: r.installs.Load()}
}

// write runs one kernel write, tried 4 times 5, 15 and 45 ms apart (a kernel write fails for a
// moment: memory pressure, a map being replaced), counting failures and retries.
func (r *Registry) write(what string, f func() error) error {
	try := 0
	waits := &backoff.ExponentialBackOff{InitialInterval: 5 * time.Millisecond, Multiplier: 3, MaxInterval: time.Second}
	_, err := backoff.Retry(context.Background(), func() (struct{}, error) {
		try++
		err := f()
		if err != nil {
			r.failures.Add(1)
			r.log.Warn("kernel write failed", "what", what, "attempt", try, "error", err)
		}
		return struct{}{}, err
	}, backoff.WithBackOff(waits), backoff.WithMaxTries(4), backoff.WithMaxElapsedTime(0),
		backoff.WithNotify(func(error, time.Duration) { r.retries.Add(1) }))
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
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
	// UID is the uid the agent runs as. With DynamicUID the registry picks one from
	// Options.UIDs that no live agent, user or process has.
	UID        uint32
	DynamicUID bool
	// ShareUID lets a launched agent run as a uid another live agent runs as (they can then
	// read each other's files and signal each other); without it such a launch is refused.
	ShareUID bool
	// Selectors say how the identity was attributed; Labels are given to the policy.
	Selectors []string
	Labels    map[string]string
	// Task, when set, starts with the agent.
	Task *TaskSpec
	// Containers marks a pod: its exec rules name files inside its containers' roots
	// (Options.ExecRoots), and the kernel holds a container's first exec no rule allows until
	// they are resolved there (dataplane.AgentContainers).
	Containers bool
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
	var task *Task
	if req.Task != nil {
		if task, err = r.newTask(*req.Task); err != nil {
			return Agent{}, err
		}
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
	c := Context{SpiffeID: id, Selectors: append(slices.Clone(req.Selectors), "cgroup:"+path), Labels: maps.Clone(req.Labels), Task: task}
	a, err := r.register(c, path, req)
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

func (r *Registry) register(c Context, path string, req Registration) (Agent, error) {
	cgid, err := r.opts.Cgroups.ID(path)
	if err != nil {
		return Agent{}, err
	}
	var warnings []string
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
	uid := req.UID
	if req.DynamicUID {
		if uid, err = r.pickUID(); err != nil {
			return Agent{}, err
		}
	} else if req.Launch && !req.ShareUID {
		if other := r.withUID(uid); other != nil {
			return Agent{}, fmt.Errorf("%w: uid %d is the uid of agent %d (%s): agents that share a uid can read each other's files and signal each other; "+
				"leave --user out for a uid of the agent's own, or give --share-uid", ErrUIDTaken, uid, other.slot, other.info.SpiffeID)
		}
	}
	slot, ok := r.freeSlot()
	if !ok {
		return Agent{}, fmt.Errorf("no free agent slot: the kernel holds %d agents", dataplane.MaxAgents)
	}
	flags := dataplane.AgentActive
	if req.Containers {
		flags |= dataplane.AgentContainers
	}
	if r.opts.Denied != nil && r.opts.Denied(c.SpiffeID) {
		flags |= dataplane.AgentKilled
		r.log.Warn("registering an agent whose SPIFFE ID was killed: everything is denied until it is readmitted", "spiffe_id", c.SpiffeID, "cgroup", path)
	}
	a := &agent{
		slot:     slot,
		ctx:      c,
		flags:    flags,
		launcher: req.Launcher,
		uid:      uid,
		uidKnown: true,
		dynamic:  req.DynamicUID,
		info: dataplane.Info{SpiffeID: c.SpiffeID, CgroupPath: path, CgroupID: cgid,
			Registered: r.opts.Now(), Launched: req.Launch},
	}
	if err := r.evaluate(context.Background(), a); err != nil {
		r.write("rolling back slot", func() error { return r.opts.Dataplane.Clear(slot) })
		return Agent{}, err
	}
	a.warnings = append(warnings, a.warnings...)
	r.agents[slot] = a
	r.idents.Store(slot, a.ident())
	r.log.Info("agent registered", "slot", slot, "spiffe_id", c.SpiffeID, "cgroup", path, "generation", a.info.Generation)
	for _, w := range a.warnings {
		r.log.Warn("agent", "slot", slot, "spiffe_id", c.SpiffeID, "warning", w)
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
			return nil // adopted and not evaluated yet: the pinned rule set stays
		}
		return dp.Install(a.slot, a.rs)
	}
	setFlags := func() error {
		if a.synced && a.wrote.flags == a.flags {
			return nil
		}
		return dp.SetFlags(a.slot, a.flags)
	}
	err := errors.Join(
		r.write("installing rule set", install),
		r.write("setting agent state", setFlags),
		r.write("recording agent info", func() error { return dp.PutInfo(a.slot, a.info) }),
	)
	if err == nil && (!a.synced || a.wrote.cgroup != a.info.CgroupID) {
		err = r.write("binding cgroup", func() error { return dp.Bind(a.info.CgroupID, a.slot) })
	}
	a.synced = err == nil
	if a.synced {
		a.wrote.flags, a.wrote.cgroup = a.flags, a.info.CgroupID
	}
	if err != nil {
		a.err = err
	} else {
		r.installs.Add(1)
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
		r.idents.Delete(slot)
		if a.timer != nil {
			a.timer.Stop()
		}
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
			r.idents.Store(slot, a.ident())
			r.mu.Unlock()
			return fmt.Errorf("removing agent cgroup: %w", err)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.opts.Retiring != nil {
		r.opts.Retiring(r.viewCounts(a)) // its final counts, before the kernel forgets them
	}
	if err := r.write("clearing slot", func() error { return r.opts.Dataplane.Clear(slot) }); err != nil {
		// Partly cleared: the agent stays registered and Reconcile writes it whole again.
		a.removing, a.synced, a.err = false, false, err
		r.idents.Store(slot, a.ident())
		return err
	}
	delete(r.agents, slot)
	if a.ctx.Task != nil {
		r.closeGrants(a.ctx.Task.Approvals)
	}
	// Told with the registry locked, before Unregister returns and before the slot can be
	// taken again: a later agent in the slot never loses its credentials to this one's end.
	if a.ctx.Task != nil && r.opts.TaskEnded != nil {
		r.opts.TaskEnded(slot, a.info.SpiffeID, *a.ctx.Task, "agent unregistered")
	}
	if r.opts.Unregistered != nil {
		r.opts.Unregistered(slot)
	}
	r.retired[slot] = retiredAgent{id: a.info.SpiffeID}
	if a.rs != nil {
		r.retired[slot] = retiredAgent{id: a.info.SpiffeID, mode: a.rs.Mode}
	}
	r.log.Info("agent unregistered", "slot", slot, "spiffe_id", a.info.SpiffeID)
	return nil
}

// taskEnded tells Options.TaskEnded that a's task ended. Call with r.mu held, before the task
// is dropped from a's context.
func (r *Registry) taskEnded(a *agent, reason string) {
	if r.opts.TaskEnded == nil || a.ctx.Task == nil {
		return
	}
	slot, id, t := a.slot, a.info.SpiffeID, *a.ctx.Task
	go r.opts.TaskEnded(slot, id, t, reason)
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
		// A kill's Deny latched the flag in the kernel: resuming ends the latch first.
		if err := r.write("ending the kill's latch", func() error { return r.opts.Dataplane.Revive(slot) }); err != nil {
			return r.view(a), err
		}
	}
	err := r.write("setting agent state", func() error { return r.opts.Dataplane.SetFlags(slot, a.flags) })
	if err != nil {
		a.synced, a.err = false, err
		return r.view(a), err
	}
	a.wrote.flags = a.flags
	r.log.Info("agent killed flag", "slot", slot, "spiffe_id", a.info.SpiffeID, "killed", killed)
	return r.view(a), nil
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
// is gone, or is no longer below an agent parent, are cleared; the rest are evaluated again
// (their tasks are not recorded in the kernel: they come back without one); bindings that belong
// to no recorded agent are removed.
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
		a := &agent{slot: slot, info: info, flags: flags | dataplane.AgentActive, synced: true,
			ctx: Context{SpiffeID: info.SpiffeID, Selectors: []string{"cgroup:" + info.CgroupPath}}}
		r.agents[slot] = a
		r.idents.Store(slot, a.ident())
		r.nextSlot = max(r.nextSlot, slot+1)
		if err := r.evaluate(context.Background(), a); err != nil {
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

// TaskOf returns the ID and type of the task of the agent in slot, if it has one. It copies
// nothing else (the event loop asks it for every record).
func (r *Registry) TaskOf(slot dataplane.Slot) (id, typ string, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, found := r.agents[slot]
	if !found || a.ctx.Task == nil {
		return "", "", false
	}
	return a.ctx.Task.ID, a.ctx.Task.Type, true
}

// Covers reports whether path is, or is below, the cgroup of a registered agent. It reads no
// kernel state.
func (r *Registry) Covers(path string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.agents {
		p := a.info.CgroupPath
		if path == p || strings.HasPrefix(path, strings.TrimSuffix(p, "/")+"/") {
			return true
		}
	}
	return false
}

// SlotOfCgroup returns the agent whose cgroup is path or the nearest one above it.
func (r *Registry) SlotOfCgroup(path string) (dataplane.Slot, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	best, found, depth := dataplane.Slot(0), false, -1
	for slot, a := range r.agents {
		p := strings.TrimSuffix(a.info.CgroupPath, "/")
		if (path == p || strings.HasPrefix(path, p+"/")) && len(p) > depth && !a.removing {
			best, found, depth = slot, true, len(p)
		}
	}
	return best, found
}

// ContextOf returns the context of the agent in slot.
func (r *Registry) ContextOf(slot dataplane.Slot) (Context, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.agents[slot]
	if !ok {
		return Context{}, false
	}
	return a.context(), true
}

// Contexts returns the contexts of every agent (to check a new policy revision against).
func (r *Registry) Contexts() []Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Context, 0, len(r.agents))
	for _, a := range r.agents {
		out = append(out, a.context())
	}
	return out
}

// List returns every agent, by slot, with its decision counts.
func (r *Registry) List() []Agent {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Agent, 0, len(r.agents))
	for _, a := range r.agents {
		out = append(out, r.viewCounts(a))
	}
	slices.SortFunc(out, func(a, b Agent) int { return int(a.Slot) - int(b.Slot) })
	return out
}

// ExecFiles returns the files the agent's exec rules allow, by name.
func (r *Registry) ExecFiles(slot dataplane.Slot) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if a, ok := r.agents[slot]; ok {
		return slices.Clone(a.execFiles)
	}
	return nil
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

// context is a copy of the agent's context that the evaluator may keep. Call with r.mu held.
func (a *agent) context() Context {
	c := a.ctx
	c.Slot = a.slot
	c.Selectors = slices.Clone(c.Selectors)
	c.Labels = maps.Clone(c.Labels)
	if c.Task != nil {
		t := *c.Task
		t.Approvals = slices.Clone(t.Approvals)
		c.Task = &t
	}
	return c
}

// viewCounts is view with the kernel's decision counts of the agent. Call with r.mu held.
func (r *Registry) viewCounts(a *agent) Agent {
	v := r.view(a)
	if counts, err := r.opts.Dataplane.AgentCounts(a.slot); err == nil {
		v.Counts = Counts{}
		for k := range dataplane.NumKinds {
			for verdict := range dataplane.NumVerdicts {
				if n := counts[k][verdict]; n > 0 {
					v.Counts[CountKey{dataplane.Kind(k), dataplane.Verdict(verdict)}] = n
				}
			}
		}
	}
	return v
}

func (r *Registry) view(a *agent) Agent {
	c := a.context()
	v := Agent{
		Slot: a.slot, SpiffeID: a.info.SpiffeID, Revoked: c.Revoked, Cgroup: a.info.CgroupPath, CgroupID: a.info.CgroupID,
		Launched: a.info.Launched, Launcher: a.launcher, UID: a.uid, DynamicUID: a.dynamic, Registered: a.info.Registered, Selectors: c.Selectors,
		Labels: c.Labels, Task: c.Task, Killed: a.flags&dataplane.AgentKilled != 0, Generation: a.info.Generation,
		Evaluated: a.evaluated, NextEval: a.next, Synced: a.synced, Refused: a.refused, Warnings: a.warnings,
	}
	if a.rs != nil {
		v.Mode = a.rs.Mode.String()
	}
	v.Sandbox, _ = a.grants.SandboxOf()
	if a.info.ModeOverride != nil {
		v.ModeOverride = a.info.ModeOverride.String()
	}
	if a.err != nil {
		v.Error = a.err.Error()
	}
	if v.Task != nil {
		for i, ap := range v.Task.Approvals {
			if ap.Uses == 0 || ap.Grant == 0 {
				continue
			}
			if left, err := r.opts.Dataplane.GrantLeft(ap.Grant); err == nil {
				v.Task.Approvals[i].UsesLeft = &left
			}
		}
	}
	return v
}

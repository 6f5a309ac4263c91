// Package killpath stops an agent deterministically: an ordered, idempotent sequence of steps,
// each timed and recorded, that needs neither the policy engine nor SPIRE nor the network for
// the steps that stop the agent (deny, freeze, halt):
//
//  1. deny: the agent's killed flag in the kernel: every connect, sendmsg and exec is denied;
//  2. freeze: cgroup.freeze on the agent's cgroup, until cgroup.events says frozen;
//  3. revoke: the task credentials are revoked, the SPIFFE ID goes on the deny list (a new
//     agent with it is registered killed), and its SPIRE entries are deleted where SPIRE is
//     configured (retried until done);
//  4. halt (on request): cgroup.kill of the whole subtree;
//  5. record: one kill event with reason, requester and each step's duration.
//
// The deny step comes first, even before the kill is persisted; then the kill is persisted, so a
// tetherd that dies in the middle of one finishes it when it starts again.
package killpath

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// Step names, in order.
const (
	StepDeny   = "deny"
	StepFreeze = "freeze"
	StepRevoke = "revoke"
	StepHalt   = "halt"
)

// Registry is what the kill path acts on.
type Registry interface {
	// Peek and Deny take no lock the registry's other work holds: a kill finds its agent and
	// denies it in the kernel while a policy change for every agent is being evaluated.
	Peek(slot dataplane.Slot) (agents.Ident, bool)
	Deny(slot dataplane.Slot) error
	Get(slot dataplane.Slot) (agents.Agent, bool)
	List() []agents.Agent
	// Idents is every agent's identity, without the lock Peek does not take either.
	Idents() []agents.Ident
	SetKilled(slot dataplane.Slot, killed bool) (agents.Agent, error)
	EndTask(slot dataplane.Slot) (agents.Agent, error)
}

// Options configure a Killer.
type Options struct {
	Registry Registry
	// Cgroup2 is the cgroup2 mount (a kill by PID finds the agent from the process's cgroup).
	Cgroup2 string
	// StateFile keeps kills in progress and the denied SPIFFE IDs across restarts.
	StateFile string
	// FreezeTimeout bounds the wait for cgroup.events to say frozen.
	FreezeTimeout time.Duration
	// DeleteEntries deletes the SPIRE registration entries of a SPIFFE ID (nil: SPIRE is not
	// configured). The revoke step retries it until it succeeds.
	DeleteEntries func(ctx context.Context, spiffeID string) (int, error)
	// Retry is the wait between attempts of a step that failed (SPIRE unreachable). It does not
	// grow, unlike the library backoff of the decision log and the webhook: a kill's revoke must
	// land as soon as SPIRE answers again, and an attempt at a local socket costs nothing.
	Retry time.Duration
	Emit  func(events.Decision)
	Log   *slog.Logger
}

// Request asks to kill an agent.
type Request struct {
	Slot      dataplane.Slot
	Reason    string
	Requester string
	Terminate bool // also halt: cgroup.kill
}

// StepResult is what one step did: what the kill's record says of it (name, done, how long it
// took, the error), and since when and with what detail.
type StepResult struct {
	events.KillStep
	// Since is the time from the kill request to the end of the step (the last attempt).
	Since  time.Duration `json:"since_request_ns"`
	Detail string        `json:"detail,omitempty"`
}

// Kill is one kill, as recorded.
type Kill struct {
	ID        string         `json:"id"`
	SpiffeID  string         `json:"spiffe_id"`
	Slot      dataplane.Slot `json:"agent_slot"`
	Cgroup    string         `json:"cgroup"`
	Reason    string         `json:"reason"`
	Requester string         `json:"requester"`
	Terminate bool           `json:"terminate"`
	Requested time.Time      `json:"requested"`
	Steps     []StepResult   `json:"steps"`
	Done      bool           `json:"done"`

	start time.Time // Requested with the monotonic clock (not after a restart)
}

// step returns the result of step name, adding it when missing.
func (k *Kill) step(name string) *StepResult {
	for i := range k.Steps {
		if k.Steps[i].Name == name {
			return &k.Steps[i]
		}
	}
	k.Steps = append(k.Steps, StepResult{KillStep: events.KillStep{Name: name}})
	return &k.Steps[len(k.Steps)-1]
}

// Denied is a SPIFFE ID on the deny list.
type Denied struct {
	SpiffeID string    `json:"spiffe_id"`
	Since    time.Time `json:"since"`
	KillID   string    `json:"kill_id"`
	Reason   string    `json:"reason"`
	// Requester asked for the kill that put the identity here (a cluster kill: "AgentKill
	// <name>", which withdrawing it readmits, also after a restart).
	Requester string `json:"requester,omitempty"`
}

type state struct {
	Kills  []*Kill            `json:"kills"`  // unfinished
	Denied map[string]*Denied `json:"denied"` // by SPIFFE ID
}

// Killer runs kills. It is safe for concurrent use; kills of one agent run one at a time.
type Killer struct {
	opts Options

	mu    sync.Mutex
	st    state
	slots map[dataplane.Slot]*sync.Mutex
}

// New loads the persisted state (a missing file is an empty state).
func New(opts Options) (*Killer, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.FreezeTimeout <= 0 {
		opts.FreezeTimeout = 5 * time.Second
	}
	if opts.Retry <= 0 {
		opts.Retry = time.Second
	}
	k := &Killer{opts: opts, st: state{Denied: map[string]*Denied{}}, slots: map[dataplane.Slot]*sync.Mutex{}}
	b, err := os.ReadFile(opts.StateFile)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("kill state: %w", err)
	default:
		if err := json.Unmarshal(b, &k.st); err != nil {
			return nil, fmt.Errorf("kill state %s: %w", opts.StateFile, err)
		}
		if k.st.Denied == nil {
			k.st.Denied = map[string]*Denied{}
		}
	}
	return k, nil
}

// save persists the state. Call with k.mu held.
func (k *Killer) save() error {
	b, err := json.MarshalIndent(k.st, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(k.opts.StateFile), 0o700); err != nil {
		return fmt.Errorf("kill state: %w", err)
	}
	tmp := k.opts.StateFile + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("kill state: %w", err)
	}
	if err := os.Rename(tmp, k.opts.StateFile); err != nil {
		return fmt.Errorf("kill state: %w", err)
	}
	return nil
}

// IsDenied reports whether id is on the deny list: an agent registered with it is killed.
func (k *Killer) IsDenied(id string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.st.Denied[id] != nil
}

// DeniedIDs is the deny list.
func (k *Killer) DeniedIDs() []Denied {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]Denied, 0, len(k.st.Denied))
	for _, d := range k.st.Denied {
		out = append(out, *d)
	}
	slices.SortFunc(out, func(a, b Denied) int { return a.Since.Compare(b.Since) })
	return out
}

// Pending is the kills not finished yet (a step is still being retried).
func (k *Killer) Pending() []Kill {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]Kill, 0, len(k.st.Kills))
	for _, x := range k.st.Kills {
		out = append(out, *x)
	}
	return out
}

func (k *Killer) slotLock(slot dataplane.Slot) *sync.Mutex {
	k.mu.Lock()
	defer k.mu.Unlock()
	m := k.slots[slot]
	if m == nil {
		m = &sync.Mutex{}
		k.slots[slot] = m
	}
	return m
}

// ErrNotFound is returned for a kill of an agent that is not there.
var ErrNotFound = errors.New("no such agent")

// Kill runs the kill path on an agent and returns the record. The deny, freeze and halt steps
// are done when it returns; the revoke step too, unless SPIRE could not be reached: it is then
// retried in the background (and after a restart) until done, and the record says so.
func (k *Killer) Kill(ctx context.Context, req Request) (Kill, error) {
	if req.Reason == "" {
		return Kill{}, errors.New("a kill needs a reason")
	}
	a, ok := k.opts.Registry.Peek(req.Slot)
	if !ok {
		return Kill{}, fmt.Errorf("%w: slot %d", ErrNotFound, req.Slot)
	}
	var id [8]byte
	rand.Read(id[:])
	start := time.Now()
	x := &Kill{start: start, ID: "kill-" + hex.EncodeToString(id[:]), SpiffeID: a.SpiffeID, Slot: a.Slot, Cgroup: a.Cgroup,
		Reason: req.Reason, Requester: req.Requester, Terminate: req.Terminate, Requested: start.UTC()}
	for _, s := range k.steps(x) {
		x.step(s)
	}
	// Deny first, before anything else (even persisting the kill): the kernel's flag is pinned,
	// so it outlives this tetherd whatever happens next. The step's time is the kernel's write;
	// the registry records the flag right after (it may wait for its lock: the kernel denies
	// already).
	detail, err := k.deny(x)
	r := x.step(StepDeny)
	r.Since = time.Since(start)
	r.Took, r.Detail = r.Since, detail
	// The freezing starts now: the kernel stops the processes while the kill is persisted and
	// recorded (the freeze step writes it again and waits for frozen).
	if err == nil && slices.Contains(k.steps(x), StepFreeze) && k.live(x) {
		writeFreeze(x.Cgroup, true)
	}
	if err == nil {
		err = k.record(x)
	}
	if err != nil {
		r.Error = err.Error()
	} else {
		r.Done = true
	}
	k.mu.Lock()
	k.st.Kills = append(k.st.Kills, x)
	err = k.save()
	k.mu.Unlock()
	if err != nil {
		// Not persisted: the kill goes on (stopping the agent matters more), and says so.
		k.opts.Log.Error("kill not persisted: a restart in the middle would not finish it", "kill", x.ID, "error", err)
	}
	k.opts.Log.Warn("killing agent", "kill", x.ID, "slot", a.Slot, "spiffe_id", a.SpiffeID, "reason", req.Reason, "requester", req.Requester, "terminate", req.Terminate)
	k.run(ctx, x)
	return k.snapshot(x), nil
}

func (k *Killer) steps(x *Kill) []string {
	s := []string{StepDeny, StepFreeze, StepRevoke}
	if x.Terminate {
		s = append(s, StepHalt)
	}
	return s
}

func (k *Killer) snapshot(x *Kill) Kill {
	k.mu.Lock()
	defer k.mu.Unlock()
	c := *x
	c.Steps = slices.Clone(x.Steps)
	return c
}

// run does the steps of x that are not done, in order; a step that fails does not stop the
// ones after it (a freeze that times out must not keep the halt from happening). When every
// step is done the kill is recorded and forgotten; otherwise it is retried later.
func (k *Killer) run(ctx context.Context, x *Kill) {
	lock := k.slotLock(x.Slot)
	lock.Lock()
	defer lock.Unlock()
	for _, name := range k.steps(x) {
		k.mu.Lock()
		done := x.step(name).Done
		k.mu.Unlock()
		if done {
			continue
		}
		start := time.Now()
		detail, err := k.do(ctx, name, x)
		took := time.Since(start)
		k.mu.Lock()
		r := x.step(name)
		since := x.start
		if since.IsZero() {
			since = x.Requested
		}
		r.Took, r.Detail, r.Since = took, detail, time.Since(since)
		if err != nil {
			r.Error = err.Error()
		} else {
			r.Done, r.Error = true, ""
		}
		k.save()
		k.mu.Unlock()
		if err != nil {
			k.opts.Log.Error("kill step failed", "kill", x.ID, "step", name, "took", took, "error", err)
		} else {
			k.opts.Log.Info("kill step done", "kill", x.ID, "step", name, "took", took, "detail", detail)
		}
	}
	k.mu.Lock()
	all := !slices.ContainsFunc(x.Steps, func(s StepResult) bool { return !s.Done })
	x.Done = all
	if all {
		k.st.Kills = slices.DeleteFunc(k.st.Kills, func(o *Kill) bool { return o.ID == x.ID })
	}
	k.save()
	rec := *x
	rec.Steps = slices.Clone(x.Steps)
	k.mu.Unlock()
	if k.opts.Emit != nil {
		k.opts.Emit(events.KillRecord(events.Agent{SpiffeID: x.SpiffeID, Slot: x.Slot}, x.Reason, toEvent(rec)))
	}
	if !all {
		go func() {
			select {
			case <-time.After(k.opts.Retry):
				k.run(context.Background(), x)
			case <-ctx.Done():
			}
		}()
	}
}

func toEvent(x Kill) *events.Kill {
	e := &events.Kill{ID: x.ID, Requester: x.Requester, Terminate: x.Terminate, Done: x.Done}
	for _, s := range x.Steps {
		e.Steps = append(e.Steps, s.KillStep)
	}
	return e
}

// live says whether x's agent is still in its slot (not a later agent in the slot).
func (k *Killer) live(x *Kill) bool {
	a, ok := k.opts.Registry.Peek(x.Slot)
	return ok && a.Cgroup == x.Cgroup && a.SpiffeID == x.SpiffeID
}

// deny sets the agent's killed flag in the kernel, taking no lock of the registry.
func (k *Killer) deny(x *Kill) (string, error) {
	if !k.live(x) {
		return "the agent is gone", nil
	}
	return "network and exec denied", k.opts.Registry.Deny(x.Slot)
}

// record makes the registry's state say killed too, so that its later writes keep the flag.
func (k *Killer) record(x *Kill) error {
	if !k.live(x) {
		return nil
	}
	_, err := k.opts.Registry.SetKilled(x.Slot, true)
	return err
}

// do runs one step.
func (k *Killer) do(ctx context.Context, name string, x *Kill) (string, error) {
	slot := x.Slot
	live := k.live(x)
	switch name {
	case StepDeny:
		detail, err := k.deny(x)
		if err == nil {
			err = k.record(x)
		}
		return detail, err
	case StepFreeze:
		if _, err := os.Stat(x.Cgroup); errors.Is(err, os.ErrNotExist) {
			return "the cgroup is gone", nil
		}
		return Freeze(x.Cgroup, k.opts.FreezeTimeout)
	case StepRevoke:
		k.mu.Lock()
		if k.st.Denied[x.SpiffeID] == nil {
			k.st.Denied[x.SpiffeID] = &Denied{SpiffeID: x.SpiffeID, Since: time.Now().UTC(), KillID: x.ID, Reason: x.Reason, Requester: x.Requester}
		}
		err := k.save()
		k.mu.Unlock()
		if err != nil {
			return "", err
		}
		detail := "SPIFFE ID denied"
		if live {
			// Ending the task revokes its credentials (the registry tells the issuer).
			_, err := k.opts.Registry.EndTask(slot)
			switch {
			case err == nil:
				detail += ", task credentials revoked"
			case !errors.Is(err, agents.ErrTask):
				return detail, fmt.Errorf("ending the task: %w", err)
			}
		}
		if k.opts.DeleteEntries != nil {
			n, err := k.opts.DeleteEntries(ctx, x.SpiffeID)
			if err != nil {
				return detail, fmt.Errorf("deleting the SPIRE entries of %s (retried until done): %w", x.SpiffeID, err)
			}
			detail += fmt.Sprintf(", %d SPIRE entries deleted", n)
		}
		return detail, nil
	case StepHalt:
		if _, err := os.Stat(x.Cgroup); errors.Is(err, os.ErrNotExist) {
			return "the cgroup is gone", nil
		}
		if err := cgroups.Kill(x.Cgroup); err != nil {
			return "", err
		}
		// Frozen processes die too: SIGKILL wakes them. Thaw so that the cgroup can empty.
		writeFreeze(x.Cgroup, false)
		return "every process killed", cgroups.WaitEmpty(x.Cgroup, k.opts.FreezeTimeout)
	}
	return "", fmt.Errorf("unknown step %q", name)
}

// Continue finishes the kills a previous tetherd left unfinished, and makes sure agents with a
// denied SPIFFE ID are killed. Call it once the registry has adopted the pinned agents.
func (k *Killer) Continue(ctx context.Context) {
	for _, a := range k.opts.Registry.List() {
		if k.IsDenied(a.SpiffeID) && !a.Killed {
			k.opts.Registry.SetKilled(a.Slot, true)
		}
	}
	k.mu.Lock()
	pending := slices.Clone(k.st.Kills)
	k.mu.Unlock()
	for _, x := range pending {
		k.opts.Log.Warn("finishing a kill a previous tetherd left unfinished", "kill", x.ID, "spiffe_id", x.SpiffeID)
		go k.run(ctx, x)
	}
}

// Resume thaws a frozen agent for investigation. Its network and exec stay denied, and its
// SPIFFE ID stays on the deny list, until an admin readmits it.
func (k *Killer) Resume(slot dataplane.Slot) (agents.Agent, error) {
	a, ok := k.opts.Registry.Get(slot)
	if !ok {
		return a, fmt.Errorf("%w: slot %d", ErrNotFound, slot)
	}
	if err := writeFreeze(a.Cgroup, false); err != nil {
		return a, err
	}
	k.opts.Log.Warn("agent thawed for investigation; still denied", "slot", slot, "spiffe_id", a.SpiffeID)
	return a, nil
}

// Readmit takes id off the deny list and clears the killed flag of its agents.
func (k *Killer) Readmit(id string) ([]agents.Agent, error) {
	k.mu.Lock()
	_, was := k.st.Denied[id]
	delete(k.st.Denied, id)
	err := k.save()
	k.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if !was {
		return nil, fmt.Errorf("%s is not denied", id)
	}
	var out []agents.Agent
	var errs []error
	for _, a := range k.opts.Registry.List() {
		if a.SpiffeID == id {
			got, err := k.opts.Registry.SetKilled(a.Slot, false)
			errs = append(errs, err)
			out = append(out, got)
		}
	}
	k.opts.Log.Warn("identity readmitted", "spiffe_id", id)
	return out, errors.Join(errs...)
}

// Freeze freezes the cgroup (cgroup v2 cgroup.freeze) and waits until the kernel reports it
// frozen, or timeout. It waits in poll(2) on cgroup.events, which the kernel wakes when the file
// changes (the last process stopped), and reads it again after 50 µs, doubling up to 5 ms: the
// kernel sends that change at most once in 10 ms, so a small cgroup is seen frozen sooner by
// reading.
func Freeze(cgroup string, timeout time.Duration) (string, error) {
	events, err := os.Open(filepath.Join(cgroup, "cgroup.events"))
	if err != nil {
		return "", err
	}
	defer events.Close()
	if err := writeFreeze(cgroup, true); err != nil {
		return "", err
	}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 512)
	for wait := 50 * time.Microsecond; ; wait = min(2*wait, 5*time.Millisecond) {
		// A read from the start also tells the kernel what this reader has seen: poll then
		// waits for the next change.
		n, err := events.ReadAt(buf, 0)
		if err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("reading %s: %w", events.Name(), err)
		}
		frozen, err := frozenField(buf[:n], cgroup)
		if err != nil {
			return "", err
		}
		if frozen {
			return fmt.Sprintf("frozen (%d processes)", len(cgroups.Procs(cgroup))), nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return "", fmt.Errorf("cgroup %s not frozen after %s", cgroup, timeout)
		}
		fds := []unix.PollFd{{Fd: int32(events.Fd()), Events: unix.POLLPRI | unix.POLLERR}}
		ts := unix.NsecToTimespec(min(wait, left).Nanoseconds())
		if _, err := unix.Ppoll(fds, &ts, nil); err != nil && !errors.Is(err, unix.EINTR) {
			return "", fmt.Errorf("waiting for %s: %w", events.Name(), err)
		}
	}
}

func writeFreeze(cgroup string, on bool) error {
	v := "0"
	if on {
		v = "1"
	}
	if err := os.WriteFile(filepath.Join(cgroup, "cgroup.freeze"), []byte(v), 0); err != nil {
		return fmt.Errorf("cgroup.freeze of %s: %w", cgroup, err)
	}
	return nil
}

func isFrozen(cgroup string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(cgroup, "cgroup.events"))
	if err != nil {
		return false, err
	}
	return frozenField(b, cgroup)
}

// frozenField reads the frozen field of cgroup's cgroup.events, b.
func frozenField(b []byte, cgroup string) (bool, error) {
	for _, line := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("frozen ")); ok {
			return string(v) == "1", nil
		}
	}
	return false, fmt.Errorf("%s/cgroup.events has no frozen field", cgroup)
}

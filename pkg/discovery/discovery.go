// Package discovery gives identities to the agent cgroups tetherd finds without being told: by
// the static rules, by SPIRE, and by the Kubernetes pod watch. It acts on the registry through
// Registrar.
package discovery

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/identity"
)

// Discovery gives an identity to cgroups below the agent parents that get processes without
// being launched through tetherctl: by the static rules, and by SPIRE where it is configured for
// them. Until one answers, such a cgroup is no agent (bpf.unknown_cgroup says what it may do);
// an answer that is lost later (a SPIRE entry deleted) revokes the agent's identity, so it is
// granted nothing, and a record says so.
type Discovery struct {
	root   string // cgroup2 mount
	static *identity.Static
	spire  *identity.SPIRE
	k8s    *identity.Kubernetes
	// podSelector picks the pods that are agents; selfPod is tetherd's own pod's UID (never one).
	podSelector labels.Selector
	selfPod     string
	cfg         config.Identity
	reg         Registrar
	emit        func(events.Decision)
	log         *slog.Logger
	// OnPod, if set, is told of each pod agent registered or adopted (from a goroutine of its
	// own): its containers' roots are resolved for its exec rules (containers.Roots.Adopt).
	OnPod func(slot dataplane.Slot)

	mu       sync.Mutex
	tracked  map[string]*workload // by cgroup path (absolute)
	spireErr string               // why SPIRE could not be asked, last time; "" once it answered
	spireOK  bool                 // SPIRE answered at least once
	lost     uint64
	conflict uint64
	self     string // tetherd's SPIFFE ID, or why it has none
	selfExp  time.Time
}

// Registrar is what discovery does with the agents it finds: it registers them, changes or
// revokes their identity, and unregisters them when their cgroup goes; it never touches agents
// under cgroups another part of tetherd covers (launched agents, the API's).
type Registrar interface {
	Covers(cgroup string) bool
	List() []agents.Agent
	Register(agents.Registration) (agents.Agent, error)
	Get(slot dataplane.Slot) (agents.Agent, bool)
	Identity(slot dataplane.Slot) (string, dataplane.Mode, bool)
	SetIdentity(slot dataplane.Slot, spiffeID string) (agents.Agent, error)
	Revoke(slot dataplane.Slot) (agents.Agent, error)
	Unregister(slot dataplane.Slot) error
}

// workload is a discovered cgroup.
type workload struct {
	slot       dataplane.Slot
	registered bool
	revoked    bool
	uid        uint32 // of the first process
	podUID     string // the pod's, for a pod cgroup
	cancel     context.CancelFunc
	pids       chan int // processes that entered the cgroup after it was emptied (SPIRE only)
	// containers are the pod's container cgroups seen in records, by cgroup ID: the runtime's
	// container ID.
	containers map[uint64]string
}

func New(cfg config.Identity, root string, spire *identity.SPIRE, reg Registrar, emit func(events.Decision), log *slog.Logger) (*Discovery, error) {
	rules := make([]identity.StaticRule, len(cfg.Static))
	for i, r := range cfg.Static {
		rules[i] = identity.StaticRule{ID: r.ID, Cgroup: r.Cgroup, Unit: r.Unit, UID: r.UID}
	}
	static, err := identity.NewStatic(rules)
	if err != nil {
		return nil, err
	}
	return &Discovery{root: root, static: static, spire: spire, cfg: cfg, reg: reg, emit: emit, log: log, tracked: map[string]*workload{}}, nil
}

// Status is what identity discovery (static rules, SPIRE, the pod watch) is doing.
type Status struct {
	Static int    `json:"static_rules"`
	SPIRE  string `json:"spire,omitempty"` // answering, or why it cannot be asked
	// Kubernetes is what the pod watch does, or why it does not.
	Kubernetes string `json:"kubernetes,omitempty"`
	// Self is tetherd's own SPIFFE ID from the Workload API (identity.spire.workload_socket),
	// or why there is none.
	Self        string    `json:"self,omitempty"`
	SelfExpires time.Time `json:"self_expires,omitzero"`
	Discovered  int       `json:"discovered_cgroups"`
	Lost        uint64    `json:"identities_lost"`
	Conflicts   uint64    `json:"conflicts"`
}

// WatchPods has the agents among this node's pods found by the pod watch: the pods selector
// picks (never tetherd's own, selfPod), under trustDomain. Call it before Run.
func (d *Discovery) WatchPods(client kubernetes.Interface, node, trustDomain string, selector labels.Selector, selfPod string) error {
	k, err := identity.NewKubernetes(client, node, trustDomain, d.podDeleted)
	if err != nil {
		return err
	}
	d.k8s, d.podSelector, d.selfPod = k, selector, selfPod
	return nil
}

// Enabled reports whether anything can be discovered.
func (d *Discovery) Enabled() bool { return len(d.cfg.Static) > 0 || d.spire != nil || d.k8s != nil }

// Run follows the cgroups below parents until ctx ends.
func (d *Discovery) Run(ctx context.Context, parents []string) error {
	w, err := cgroups.Watch(parents...)
	if err != nil {
		return err
	}
	defer w.Close()
	if d.k8s != nil {
		// Not waited for: pods whose pod the watch does not know yet wait for it on their own,
		// and status says when the API server has not answered.
		go func() {
			if err := d.k8s.Start(ctx); err != nil && ctx.Err() == nil {
				d.log.Error("watching this node's pods", "error", err)
			}
		}()
	}
	if sp := d.cfg.SPIRE; sp != nil && sp.WorkloadSocket != "" {
		go identity.Self(ctx, sp.WorkloadSocket, func(id string, exp time.Time, err error) {
			d.mu.Lock()
			defer d.mu.Unlock()
			if err != nil {
				if d.self != err.Error() {
					d.log.Warn("tetherd's own SVID", "error", err)
				}
				d.self, d.selfExp = err.Error(), time.Time{}
				return
			}
			if d.self != id {
				d.log.Info("tetherd's own SVID", "spiffe_id", id, "expires", exp)
			}
			d.self, d.selfExp = id, exp
		})
	}
	defer func() {
		d.mu.Lock()
		for _, t := range d.tracked {
			if t.cancel != nil {
				t.cancel()
			}
		}
		d.mu.Unlock()
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-w.Errors():
			d.log.Warn("following cgroups (a rescan follows)", "error", err)
		case c, ok := <-w.Changes():
			if !ok {
				return nil
			}
			if c.Removed {
				d.removed(c.Path)
			} else {
				d.appeared(ctx, c)
			}
		}
	}
}

// appeared resolves a cgroup that got processes, unless it is (or is below) an agent already.
func (d *Discovery) appeared(ctx context.Context, c cgroups.Change) {
	d.mu.Lock()
	t, known := d.tracked[c.Path]
	d.mu.Unlock()
	if known {
		if t.pids != nil {
			select {
			case t.pids <- c.Procs[0]:
			default:
			}
		}
		return
	}
	if d.reg.Covers(c.Path) {
		d.adoptPod(c.Path)
		return
	}
	if d.k8s != nil {
		if uid, pod, ok := identity.PodCgroup(c.Path); ok && strings.HasPrefix(pod, d.root) {
			d.appearedPod(ctx, c, uid, pod)
			return
		}
	}
	rel := "/" + strings.TrimPrefix(strings.TrimPrefix(c.Path, d.root), "/")
	uid, ok := uidOf(c.Procs[0])
	t = &workload{uid: uid}
	if !ok {
		return // gone already; the cgroup is reported again when it gets another process
	}
	wl := identity.Workload{Cgroup: rel, PID: c.Procs[0], UID: uid}
	staticID, sel, err := d.static.Resolve(wl)
	if err != nil {
		d.conflicted(c.Path, err.Error())
		return
	}
	if staticID != "" {
		if err := d.cfg.CheckTrustDomain(staticID); err != nil {
			d.log.Error("static identity refused", "cgroup", c.Path, "error", err)
			return
		}
	}
	if d.spire == nil || !matchAny(d.cfg.SPIRE.Cgroups, rel) {
		if staticID == "" {
			return // no resolver is configured for it: it stays no agent
		}
		d.mu.Lock()
		d.tracked[c.Path] = t
		d.mu.Unlock()
		d.register(c.Path, t, staticID, sel, nil)
		return
	}
	wctx, cancel := context.WithCancel(ctx)
	t.cancel, t.pids = cancel, make(chan int, 1)
	d.mu.Lock()
	d.tracked[c.Path] = t
	d.mu.Unlock()
	d.log.Info("asking SPIRE for the identity of a new agent cgroup", "cgroup", c.Path, "pid", wl.PID)
	go d.followSPIRE(wctx, c.Path, t, wl.PID, staticID, sel)
}

// adoptPod takes back a pod agent an earlier tetherd discovered (this one adopted it from the
// pins): from now on it follows the pod as if it had found it, so the agent goes when the pod's
// cgroup does and loses its identity when the pod is deleted.
func (d *Discovery) adoptPod(cg string) {
	if d.k8s == nil {
		return
	}
	uid, pod, ok := identity.PodCgroup(cg)
	if !ok {
		return
	}
	list := d.reg.List()
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, known := d.tracked[pod]; known {
		return
	}
	for _, a := range list {
		// The pins keep no selectors: the pod cgroup (its name holds the pod's UID) says it.
		if a.Cgroup == pod && !a.Launched {
			d.tracked[pod] = &workload{slot: a.Slot, registered: true, podUID: uid, uid: a.UID}
			d.log.Info("following an adopted pod agent", "cgroup", pod, "spiffe_id", a.SpiffeID, "slot", a.Slot)
			if d.OnPod != nil {
				go d.OnPod(a.Slot)
			}
			return
		}
	}
}

// appearedPod binds a pod's cgroup (all its containers) to its service account's SPIFFE ID,
// once the pod watch knows the pod. A container cgroup of a pod that is bound already is left
// alone: it is below the agent's cgroup.
func (d *Discovery) appearedPod(ctx context.Context, c cgroups.Change, podUID, pod string) {
	d.mu.Lock()
	_, known := d.tracked[pod]
	d.mu.Unlock()
	if known || d.reg.Covers(pod) || (d.selfPod != "" && podUID == d.selfPod) {
		return
	}
	uid, ok := uidOf(c.Procs[0])
	if !ok {
		return
	}
	wctx, cancel := context.WithCancel(ctx)
	t := &workload{uid: uid, podUID: podUID, cancel: cancel}
	d.mu.Lock()
	d.tracked[pod] = t
	d.mu.Unlock()
	rel := "/" + strings.TrimPrefix(strings.TrimPrefix(pod, d.root), "/")
	staticID, staticSel, err := d.static.Resolve(identity.Workload{Cgroup: rel, PID: c.Procs[0], UID: uid})
	if err != nil {
		d.conflicted(pod, err.Error())
		return
	}
	go func() {
		p, err := d.k8s.Pod(wctx, podUID)
		if err != nil {
			if wctx.Err() == nil {
				d.log.Warn("pod cgroup without a pod", "cgroup", pod, "error", err)
			}
			return
		}
		if d.podSelector != nil && !d.podSelector.Matches(labels.Set(p.Labels)) {
			d.log.Debug("pod not selected as an agent (identity.kubernetes.pod_selector)", "pod", p.Namespace+"/"+p.Name)
			return
		}
		id, err := d.k8s.ID(p)
		if err == nil {
			err = d.cfg.CheckTrustDomain(id)
		}
		if err != nil {
			d.log.Error("pod identity refused", "cgroup", pod, "pod", p.Namespace+"/"+p.Name, "error", err)
			return
		}
		if staticID != "" && staticID != id {
			d.conflicted(pod, fmt.Sprintf("Kubernetes gives %s, the static rules %s", id, staticID))
			return
		}
		// Pod labels go to the policy, except tether's own (tether.dev/mode: audit is for admins,
		// not for whoever writes a pod spec).
		labels := map[string]string{}
		for k, v := range p.Labels {
			if strings.HasPrefix(k, agents.ReservedLabelPrefix) {
				d.log.Warn("pod label under tether.dev/ ignored (admins set those)", "pod", p.Namespace+"/"+p.Name, "label", k)
				continue
			}
			labels[k] = v
		}
		d.register(pod, t, id, append(identity.Selectors(p), staticSel...), labels)
	}()
}

// Annotate names the pod and container of a record's process, when its agent is a pod.
func (d *Discovery) Annotate(rec *events.Decision) {
	if d == nil || d.k8s == nil || rec.Slot == nil {
		return
	}
	d.mu.Lock()
	cg, w := d.podAgent(*rec.Slot)
	if w == nil {
		d.mu.Unlock()
		return
	}
	id, seen := w.containers[rec.CgroupID]
	if !seen && rec.CgroupID != 0 {
		// Looked up once per container cgroup: the pod cgroup's children, by inode (a cgroup's
		// ID).
		entries, _ := os.ReadDir(cg)
		for _, e := range entries {
			var st unix.Stat_t
			if e.IsDir() && unix.Stat(filepath.Join(cg, e.Name()), &st) == nil && st.Ino == rec.CgroupID {
				id = identity.ContainerID(e.Name())
			}
		}
		if w.containers == nil {
			w.containers = map[uint64]string{}
		}
		w.containers[rec.CgroupID] = id
	}
	uid := w.podUID
	d.mu.Unlock()
	p, ok := d.k8s.Cached(uid)
	if !ok {
		return
	}
	ref := &events.PodRef{Node: d.k8s.Node(), Namespace: p.Namespace, Pod: p.Name}
	if id != "" {
		ref.Container = identity.ContainerName(p, id)
	}
	rec.Kubernetes = ref
}

// PodOf names the pod of a pod agent (namespace/name), or returns "".
func (d *Discovery) PodOf(slot dataplane.Slot) string {
	if d == nil || d.k8s == nil {
		return ""
	}
	d.mu.Lock()
	_, w := d.podAgent(slot)
	d.mu.Unlock()
	if w == nil {
		return ""
	}
	if p, ok := d.k8s.Cached(w.podUID); ok {
		return p.Namespace + "/" + p.Name
	}
	return ""
}

// podAgent is the registered pod agent in slot and its pod cgroup, or nil. Call with d.mu held.
func (d *Discovery) podAgent(slot dataplane.Slot) (string, *workload) {
	for path, t := range d.tracked {
		if t.podUID != "" && t.registered && t.slot == slot {
			return path, t
		}
	}
	return "", nil
}

// podDeleted revokes the identity of a deleted pod's agent (its cgroup goes soon after).
func (d *Discovery) podDeleted(uid string) {
	d.mu.Lock()
	var cg string
	var t *workload
	for path, w := range d.tracked {
		if w.podUID == uid {
			cg, t = path, w
		}
	}
	d.mu.Unlock()
	if t != nil {
		d.lose(cg, t, "pod deleted")
	}
}

// followSPIRE binds the cgroup to the identity SPIRE issues one of its processes, and follows
// it. SPIRE attests the process when asked and then keeps answering for what it attested, even
// after the process is gone; so tetherd holds a pidfd of the process it asked about, and when
// that process exits it asks again about another process of the cgroup (or, if none is left,
// about the next one that enters it).
func (d *Discovery) followSPIRE(ctx context.Context, cg string, t *workload, pid int, staticID string, staticSel []string) {
	for ctx.Err() == nil {
		pidfd, err := d.pidfdIn(pid, cg)
		if err == nil {
			pctx, cancel := context.WithCancel(ctx)
			done := make(chan struct{})
			go func() {
				defer close(done)
				waitExit(pctx, pidfd)
				cancel()
			}()
			d.followPID(pctx, cg, t, pid, staticID, staticSel)
			cancel()
			<-done
			unix.Close(pidfd)
		}
		if pid = d.nextPID(ctx, cg, t, pid); pid == 0 {
			return
		}
		d.log.Debug("asking SPIRE about another process of the agent cgroup", "cgroup", cg, "pid", pid)
	}
}

// nextPID is a process of cg other than old, waiting for one to enter it if needed; 0 when ctx
// ends.
func (d *Discovery) nextPID(ctx context.Context, cg string, t *workload, old int) int {
	for _, p := range cgroups.Procs(cg) {
		if p != old {
			return p
		}
	}
	select {
	case p := <-t.pids:
		return p
	case <-ctx.Done():
		return 0
	}
}

// pidfdIn opens a pidfd of pid and checks that pid is still in cg (or below it), so that a
// reused PID is not mistaken for the process that was reported.
func (d *Discovery) pidfdIn(pid int, cg string) (int, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return -1, err
	}
	p, err := cgroups.PathOf(pid)
	if abs := filepath.Join(d.root, p); err != nil || (abs != cg && !strings.HasPrefix(abs, cg+"/")) {
		unix.Close(fd)
		return -1, fmt.Errorf("process %d is no longer in %s", pid, cg)
	}
	return fd, nil
}

// waitExit returns when the process of pidfd has exited or ctx ends.
func waitExit(ctx context.Context, pidfd int) {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	for ctx.Err() == nil {
		n, err := unix.Poll(fds, 250)
		if n > 0 || (err != nil && err != unix.EINTR) {
			return
		}
	}
}

// followPID binds the cgroup to the identity SPIRE issues pid until ctx ends.
func (d *Discovery) followPID(ctx context.Context, cg string, t *workload, pid int, staticID string, staticSel []string) {
	for u := range d.spire.Watch(ctx, pid) {
		switch {
		case u.Err != nil:
			d.mu.Lock()
			changed := d.spireErr != u.Reason
			d.spireErr = u.Reason
			d.mu.Unlock()
			if changed {
				d.log.Error("SPIRE cannot be asked; agents whose identity comes from SPIRE have none until it answers", "cgroup", cg, "reason", u.Reason)
			}
		case u.Lost:
			d.mu.Lock()
			d.spireErr, d.spireOK = "", true
			d.mu.Unlock()
			d.lose(cg, t, u.Reason)
		default:
			d.mu.Lock()
			d.spireErr, d.spireOK = "", true
			d.mu.Unlock()
			if err := d.cfg.CheckTrustDomain(u.ID); err != nil {
				d.lose(cg, t, err.Error())
				continue
			}
			if staticID != "" && staticID != u.ID {
				d.conflicted(cg, fmt.Sprintf("SPIRE gives %s, the static rules %s", u.ID, staticID))
				d.lose(cg, t, "conflicting identities")
				continue
			}
			sel := append([]string{"spire:pid:" + strconv.Itoa(pid)}, staticSel...)
			d.bind(cg, t, u.ID, sel)
		}
	}
}

// bind registers the cgroup with id, or gives the registered agent id again.
func (d *Discovery) bind(cg string, t *workload, id string, sel []string) {
	d.mu.Lock()
	registered, slot := t.registered, t.slot
	d.mu.Unlock()
	if !registered {
		d.register(cg, t, id, sel, nil)
		return
	}
	cur, _, ok := d.reg.Identity(slot)
	d.mu.Lock()
	revoked := t.revoked
	d.mu.Unlock()
	if ok && cur == id && !revoked {
		return
	}
	if _, err := d.reg.SetIdentity(slot, id); err != nil {
		d.log.Error("giving an agent its identity again", "cgroup", cg, "spiffe_id", id, "error", err)
		return
	}
	d.mu.Lock()
	t.revoked = false
	d.mu.Unlock()
}

func (d *Discovery) register(cg string, t *workload, id string, sel []string, labels map[string]string) {
	// A pod's exec rules name files in its containers (agents.Registration.Containers).
	a, err := d.reg.Register(agents.Registration{SpiffeID: id, Cgroup: cg, Selectors: sel, UID: t.uid, Labels: labels, Containers: t.podUID != ""})
	if err != nil {
		d.log.Error("registering a discovered agent", "cgroup", cg, "spiffe_id", id, "error", err)
		return
	}
	d.mu.Lock()
	t.slot, t.registered = a.Slot, true
	d.mu.Unlock()
	d.log.Info("agent discovered", "cgroup", cg, "spiffe_id", id, "slot", a.Slot, "selectors", sel)
	if t.podUID != "" && d.OnPod != nil {
		go d.OnPod(a.Slot)
	}
}

// lose revokes the identity of a registered agent: it is granted nothing from now on.
func (d *Discovery) lose(cg string, t *workload, reason string) {
	d.mu.Lock()
	registered, slot, already := t.registered, t.slot, t.revoked
	if registered {
		t.revoked = true
	}
	d.mu.Unlock()
	if !registered || already {
		d.log.Warn("no identity for agent cgroup", "cgroup", cg, "reason", reason)
		return
	}
	id, _, _ := d.reg.Identity(slot)
	if _, err := d.reg.Revoke(slot); err != nil {
		d.log.Error("revoking a lost identity", "cgroup", cg, "error", err)
	}
	d.mu.Lock()
	d.lost++
	d.mu.Unlock()
	d.log.Warn("agent lost its identity: it is granted nothing", "cgroup", cg, "spiffe_id", id, "slot", slot, "reason", reason)
	a := events.Agent{SpiffeID: id, Slot: slot}
	if reg, ok := d.reg.Get(slot); ok {
		a.CgroupID = reg.CgroupID
	}
	d.emit(events.IdentityLost(a, reason))
}

func (d *Discovery) conflicted(cg, why string) {
	d.mu.Lock()
	d.conflict++
	d.mu.Unlock()
	d.log.Error("identity conflict: the cgroup gets no identity", "cgroup", cg, "conflict", why)
}

// removed forgets a cgroup that is gone, and the agent it was.
func (d *Discovery) removed(cg string) {
	d.mu.Lock()
	t, ok := d.tracked[cg]
	delete(d.tracked, cg)
	d.mu.Unlock()
	if !ok {
		return
	}
	if t.cancel != nil {
		t.cancel()
	}
	if t.registered {
		if err := d.reg.Unregister(t.slot); err != nil {
			d.log.Warn("unregistering an agent whose cgroup is gone", "cgroup", cg, "error", err)
		}
	}
}

func (d *Discovery) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := Status{Static: len(d.cfg.Static), Lost: d.lost, Conflicts: d.conflict, Discovered: len(d.tracked), Self: d.self, SelfExpires: d.selfExp}
	if d.k8s != nil {
		s.Kubernetes = "watching pods"
		if !d.k8s.Synced() {
			s.Kubernetes = "the pods of this node are not listed yet (is the API server reachable?)"
		}
	}
	if d.spire != nil {
		switch {
		case d.spireErr != "":
			s.SPIRE = d.spireErr
		case d.spireOK:
			s.SPIRE = "answering"
		default:
			s.SPIRE = "not asked yet (no agent cgroup matched identity.spire.cgroups)"
		}
	}
	return s
}

func matchAny(patterns []string, rel string) bool {
	for _, p := range patterns {
		if ok, _ := path.Match(strings.TrimPrefix(p, "/"), strings.TrimPrefix(rel, "/")); ok {
			return true
		}
	}
	return false
}

// uidOf is the real uid of pid; false when it cannot be read (the process is gone).
func uidOf(pid int) (uint32, bool) {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return 0, false
	}
	st, err := p.NewStatus()
	if err != nil {
		return 0, false
	}
	return uint32(st.UIDs[0]), true
}

// Package containers resolves a pod agent's exec rules inside its containers' roots. A rule's
// path ("/usr/bin/git") names the file at that path in each container of the pod, which only
// exists once the runtime has built the container's root: the kernel stops a container's first
// exec that no rule allows (dataplane.ReasonUnresolvedRoot), and Roots, given the record, opens
// the stopped process's root, has the agent's grants compiled in the union of its containers'
// roots, records the container as resolved (the kernel then decides its execs by the rules),
// decides the stopped exec by the new rules and continues or kills the process.
//
// Which root is trusted: the stopped process's, at the container's first exec in its cgroup,
// which the runtime made (runc's init has pivoted into the container's root file system and not
// yet run the image's code), and it must be the root of a mount. A process still in the runtime's
// root (runc's init before it entered the container: its parent, outside the pod, has the same
// root) is let go without resolving anything. The pod's sandbox (the first container cgroup the
// kubelet makes, the lowest cgroup ID in the pod) runs the node's pause image, which no pod spec
// chooses: its first exec is allowed, and its root adds nothing to the rules. A restarted tetherd
// finds each recorded container's root again through a process whose root is still the recorded
// directory.
package containers

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// Kernel is what Roots needs of the kernel layer.
type Kernel interface {
	SetRoot(cgroupID uint64, r dataplane.ContainerRoot) error
	ForgetRoot(cgroupID uint64) error
	Roots() (map[uint64]dataplane.ContainerRoot, error)
}

// Registry is what Roots needs of the agents.
type Registry interface {
	Get(slot dataplane.Slot) (agents.Agent, bool)
	Reevaluate(slot dataplane.Slot) (agents.Agent, error)
	ExecRule(slot dataplane.Slot, file dataplane.FileID) (dataplane.ExecRule, bool, bool)
}

// Roots are the resolved container roots of the pod agents.
type Roots struct {
	mount string // the cgroup2 mount
	k     Kernel
	reg   Registry
	// emit writes a record tetherd made (the decision on a held exec).
	emit func(events.Decision)
	log  *slog.Logger

	mu     sync.Mutex
	bySlot map[dataplane.Slot]map[uint64]*root // container cgroup ID -> its root

	held, resolved, failed atomic.Uint64
}

// root is one container's root.
type root struct {
	path    string // the container cgroup
	dir     dataplane.FileID
	fd      int // O_PATH descriptor of the root directory (-1: none, the sandbox's)
	files   *compile.InRoot
	sandbox bool
}

// New returns empty Roots.
func New(mount string, k Kernel, reg Registry, emit func(events.Decision), log *slog.Logger) *Roots {
	return &Roots{mount: mount, k: k, reg: reg, emit: emit, log: log, bySlot: map[dataplane.Slot]map[uint64]*root{}}
}

// Files returns the roots a pod agent's exec rules are compiled in (registry's ExecRoots).
func (r *Roots) Files(slot dataplane.Slot) []compile.Files {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []compile.Files
	for _, c := range r.bySlot[slot] {
		if c.files != nil {
			out = append(out, c.files)
		}
	}
	return out
}

// Stats are what Roots did.
type Stats struct {
	Held     uint64 `json:"execs_held"`
	Resolved uint64 `json:"roots_resolved"`
	Failed   uint64 `json:"roots_failed"`
}

func (r *Roots) Stats() Stats {
	if r == nil {
		return Stats{}
	}
	return Stats{Held: r.held.Load(), Resolved: r.resolved.Load(), Failed: r.failed.Load()}
}

// Held takes a record of an exec the kernel stopped (reason unresolved-root), and reports
// whether it was one. It decides the exec off the caller's goroutine: the record is written as
// it is (the exec was held), and the decision is a record of its own.
func (r *Roots) Held(rec *events.Decision) bool {
	if r == nil || rec.Kind != events.KernelKind(dataplane.KindExec) || rec.Reason != events.KernelReason(dataplane.ReasonUnresolvedRoot) || rec.Slot == nil {
		return false
	}
	r.held.Add(1)
	handed := bootclock.Now()
	go func() {
		r.Prune()
		r.decideHeld(*rec, handed)
	}()
	return true
}

// Forget drops what is known of slot's containers (its agent is gone; the kernel's records go
// with the slot).
func (r *Roots) Forget(slot dataplane.Slot) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.bySlot[slot] {
		c.close()
	}
	delete(r.bySlot, slot)
}

func (c *root) close() {
	if c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
}

// Prune forgets the containers whose cgroups are gone.
func (r *Roots) Prune() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, cs := range r.bySlot {
		for id, c := range cs {
			if now, err := cgroups.ID(c.path); err != nil || now != id {
				c.close()
				delete(cs, id)
				if err := r.k.ForgetRoot(id); err != nil {
					r.log.Warn("forgetting a container root", "cgroup", c.path, "error", err)
				}
			}
		}
	}
}

// decideHeld resolves the root of the held exec's container and continues or kills it.
func (r *Roots) decideHeld(rec events.Decision, handed time.Time) {
	start := time.Now()
	slot, pid := *rec.Slot, int(rec.PID)
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return // gone
	}
	defer unix.Close(pidfd)
	audit := rec.Verdict == events.VerdictAuditDeny
	verdict, reason, err := r.resolveHeld(slot, pid, rec.CgroupID, rec.BinaryFile)
	if err != nil {
		r.failed.Add(1)
		r.log.Error("resolving a container's root for its exec rules: the exec is denied", "slot", slot, "pid", pid, "cgroup_id", rec.CgroupID, "error", err)
		verdict, reason = events.VerdictDeny, events.KernelReason(dataplane.ReasonUnresolvedRoot)
	}
	switch {
	case audit:
		if verdict == events.VerdictDeny {
			verdict = events.VerdictAuditDeny
		}
	case verdict == events.VerdictDeny:
		if err := unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			r.log.Error("killing a held exec", "pid", pid, "error", err)
		}
	default:
		if err := unix.PidfdSendSignal(pidfd, unix.SIGCONT, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			r.log.Error("continuing a held exec", "pid", pid, "error", err)
		}
	}
	r.log.Info("held exec decided", "slot", slot, "pid", pid, "executable", rec.Executable, "binary", rec.BinaryFile, "verdict", verdict, "reason", reason,
		"took", time.Since(start), "since_held", bootclock.Now().Sub(rec.Timestamp), "handed_after", handed.Sub(rec.Timestamp))
	out := rec
	// Stamped when tetherd decided, on the clock of the hold record's stamp (when the kernel
	// held it), so that the two tell how long it was held.
	out.DecisionID, out.Timestamp, out.Verdict, out.Reason = "", bootclock.Now().UTC(), verdict, reason
	out.Killed = verdict == events.VerdictDeny
	r.emit(out)
}

// resolveHeld resolves the container of process pid, in cgroup cgroupID, and decides its exec
// of binary ("dev:inode") by the rules compiled with it.
func (r *Roots) resolveHeld(slot dataplane.Slot, pid int, cgroupID uint64, binary string) (events.Verdict, events.Reason, error) {
	a, ok := r.reg.Get(slot)
	if !ok {
		return "", "", fmt.Errorf("slot %d has no agent", slot)
	}
	rel, err := cgroups.PathOf(pid)
	if err != nil {
		return "", "", err
	}
	leaf := filepath.Join(r.mount, rel)
	if id, err := cgroups.ID(leaf); err != nil || id != cgroupID {
		return "", "", fmt.Errorf("process %d is in %s, not in the cgroup (ID %d) where it was held", pid, leaf, cgroupID)
	}
	if leaf != a.Cgroup && !strings.HasPrefix(leaf, a.Cgroup+"/") {
		return "", "", fmt.Errorf("process %d is in %s, outside its pod's cgroup %s", pid, leaf, a.Cgroup)
	}
	if runtimePhase(pid, a.Cgroup, r.mount) {
		r.log.Debug("exec of the runtime before it entered the container: let go", "pid", pid, "cgroup", leaf)
		return events.VerdictAllow, events.Reason("runtime"), nil
	}
	sandbox, err := r.resolve(slot, a.Cgroup, leaf, cgroupID, pid)
	if err != nil {
		return "", "", err
	}
	if sandbox {
		return events.VerdictAllow, events.Reason("sandbox"), nil
	}
	if _, err := r.reg.Reevaluate(slot); err != nil {
		return "", "", fmt.Errorf("compiling the grants with the container's root: %w", err)
	}
	file, ok := events.ParseFileID(binary)
	if !ok {
		return "", "", fmt.Errorf("the record names no binary (%q)", binary)
	}
	rule, found, _ := r.reg.ExecRule(slot, file)
	if a, ok := r.reg.Get(slot); ok && a.Killed {
		return events.VerdictDeny, events.KernelReason(dataplane.ReasonKilled), nil // killed meanwhile
	}
	switch {
	case !found:
		return events.VerdictDeny, events.KernelReason(dataplane.ReasonNoRule), nil
	case changed(pid) != rule.Changed:
		return events.VerdictDeny, events.KernelReason(dataplane.ReasonModifiedFile), nil
	case rule.Audit:
		return events.VerdictAuditDeny, events.KernelReason(dataplane.ReasonAuditRule), nil
	}
	return events.VerdictAllow, events.KernelReason(dataplane.ReasonRule), nil
}

// runtimePhase says whether process pid is the runtime on its way into a container: its parent is
// outside the pod and has the same root.
func runtimePhase(pid int, pod, mount string) bool {
	ppid, outside := parentOutside(pid, pod, mount)
	if !outside {
		return false
	}
	a, err1 := rootID(pid)
	b, err2 := rootID(ppid)
	return err1 == nil && err2 == nil && a == b
}

// parentOutside returns the parent of process pid, and whether that parent is outside the cgroup
// directory dir (absolute, below mount) and its descendants. False when either cannot be read.
func parentOutside(pid int, dir, mount string) (int, bool) {
	proc, err := procfs.NewProc(pid)
	if err != nil {
		return 0, false
	}
	st, err := proc.Stat()
	if err != nil {
		return 0, false
	}
	prel, err := cgroups.PathOf(st.PPID)
	if err != nil {
		return 0, false
	}
	p := filepath.Join(mount, prel)
	return st.PPID, p != dir && !strings.HasPrefix(p, dir+"/")
}

// resolve records the root of container cgroup leaf (ID id) of the pod agent in slot, from
// process pid; it reports whether the container is the pod's sandbox.
func (r *Roots) resolve(slot dataplane.Slot, pod, leaf string, id uint64, pid int) (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.bySlot[slot][id]; ok {
		return c.sandbox, r.k.SetRoot(id, dataplane.ContainerRoot{Slot: slot, Dir: c.dir})
	}
	c, err := r.open(pod, leaf, id, pid)
	if err != nil {
		return false, err
	}
	if err := r.k.SetRoot(id, dataplane.ContainerRoot{Slot: slot, Dir: c.dir}); err != nil {
		c.close()
		return false, err
	}
	if r.bySlot[slot] == nil {
		r.bySlot[slot] = map[uint64]*root{}
	}
	r.bySlot[slot][id] = c
	r.resolved.Add(1)
	r.log.Info("container root resolved for the pod's exec rules", "slot", slot, "cgroup", leaf, "pid", pid, "sandbox", c.sandbox)
	return c.sandbox, nil
}

// open identifies the root of container cgroup leaf: the sandbox's (no files), the root of the
// container cgroup it is nested in, or process pid's root, which must be a mount's root.
func (r *Roots) open(pod, leaf string, id uint64, pid int) (*root, error) {
	c := &root{path: leaf, fd: -1}
	top := leaf
	for filepath.Dir(top) != pod && top != pod {
		top = filepath.Dir(top)
	}
	if top != leaf && top != pod {
		// Nested in a container cgroup (the agent made it): that container's root.
		topID, err := cgroups.ID(top)
		if err != nil {
			return nil, err
		}
		for s := range r.bySlot {
			if p, ok := r.bySlot[s][topID]; ok {
				c.dir, c.files, c.sandbox = p.dir, p.files, p.sandbox
				return c, nil
			}
		}
		return nil, fmt.Errorf("cgroup %s is nested in container cgroup %s, whose root is not resolved", leaf, top)
	}
	if top != pod && lowestChild(pod) == id {
		c.sandbox = true
		dir, err := rootID(pid)
		c.dir = dir
		return c, err
	}
	fd, err := unix.Open(fmt.Sprintf("/proc/%d/root", pid), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the root of process %d: %w", pid, err)
	}
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_INO, &stx); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT == 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("the root of process %d is not the root of a mount (a chroot into a directory): not a container's root", pid)
	}
	c.fd = fd
	c.dir = dataplane.FileID{Dev: unix.Mkdev(stx.Dev_major, stx.Dev_minor), Ino: stx.Ino}
	c.files = &compile.InRoot{Root: "/proc/self/fd/" + strconv.Itoa(fd), MountsOf: pid}
	return c, nil
}

// Adopt takes up the container roots the kernel recorded for the pod agent in slot (a restarted
// tetherd), and resolves its containers that have none (the pod became an agent after they
// started), then has its grants compiled with them.
func (r *Roots) Adopt(slot dataplane.Slot) {
	r.Prune()
	a, ok := r.reg.Get(slot)
	if !ok {
		return
	}
	recorded, err := r.k.Roots()
	if err != nil {
		r.log.Error("reading the recorded container roots", "error", err)
	}
	r.adoptPod(slot, a.Cgroup, recorded, true)
	if _, err := r.reg.Reevaluate(slot); err != nil {
		r.log.Error("compiling a pod agent's grants with its container roots", "slot", slot, "error", err)
	}
}

// Preload takes up the container roots the kernel recorded, before the registry adopts the
// agents from the pins and compiles their grants: a restarted tetherd compiles a pod's exec
// rules in its containers' roots from the start (without them, the kernel, which has the
// containers as resolved, would deny their execs until Adopt).
func (r *Roots) Preload(infos map[dataplane.Slot]dataplane.Info) {
	recorded, err := r.k.Roots()
	if err != nil {
		r.log.Error("reading the recorded container roots", "error", err)
		return
	}
	slots := map[dataplane.Slot]bool{}
	for _, rec := range recorded {
		slots[rec.Slot] = true
	}
	for slot := range slots {
		if info, ok := infos[slot]; ok {
			r.adoptPod(slot, info.CgroupPath, recorded, false)
		}
	}
}

// adoptPod resolves the containers of the pod agent in slot (cgroup pod): those the kernel
// recorded, through a process with the recorded root, and with unrecorded too the others.
func (r *Roots) adoptPod(slot dataplane.Slot, pod string, recorded map[uint64]dataplane.ContainerRoot, unrecorded bool) {
	entries, _ := os.ReadDir(pod)
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		leaf := filepath.Join(pod, e.Name())
		id, err := cgroups.ID(leaf)
		if err != nil {
			continue
		}
		rec, ok := recorded[id]
		if ok && rec.Slot != slot || !ok && !unrecorded {
			continue
		}
		if err := r.adoptOne(slot, pod, leaf, id, rec); err != nil {
			r.failed.Add(1)
			r.log.Warn("container root not resolved: its execs that no rule allows are held, then denied", "cgroup", leaf, "error", err)
		}
	}
}

// adoptOne resolves one container of a pod agent from a process in it: one whose root is the
// recorded directory, or (none recorded) the container's first process.
func (r *Roots) adoptOne(slot dataplane.Slot, pod, leaf string, id uint64, rec dataplane.ContainerRoot) error {
	r.mu.Lock()
	_, known := r.bySlot[slot][id]
	r.mu.Unlock()
	if known {
		return nil
	}
	for _, pid := range cgroups.Procs(leaf) {
		if runtimePhase(pid, pod, r.mount) {
			// The runtime has not entered the container yet: its first exec there is held.
			return nil
		}
		if rec.Dir != (dataplane.FileID{}) {
			if dir, err := rootID(pid); err != nil || dir != rec.Dir {
				continue
			}
		} else if _, first := parentOutside(pid, leaf, r.mount); !first {
			continue // not the container's first process
		}
		_, err := r.resolve(slot, pod, leaf, id, pid)
		return err
	}
	if rec.Dir != (dataplane.FileID{}) {
		return errors.New("no process in it has the recorded root any more")
	}
	return errors.New("no process in it")
}

// lowestChild is the lowest cgroup ID among the cgroups directly below pod (0: none): the
// kubelet makes the sandbox's first, and cgroup IDs only grow.
func lowestChild(pod string) uint64 {
	entries, _ := os.ReadDir(pod)
	var low uint64
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		if id, err := cgroups.ID(filepath.Join(pod, e.Name())); err == nil && (low == 0 || id < low) {
			low = id
		}
	}
	return low
}

// rootID identifies the root directory of process pid.
func rootID(pid int) (dataplane.FileID, error) {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, fmt.Sprintf("/proc/%d/root", pid), 0, unix.STATX_INO, &stx); err != nil {
		return dataplane.FileID{}, err
	}
	return dataplane.FileID{Dev: unix.Mkdev(stx.Dev_major, stx.Dev_minor), Ino: stx.Ino}, nil
}

// changed is the change time of the file process pid runs (-1: unknown), as the kernel compares it.
func changed(pid int) int64 {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, fmt.Sprintf("/proc/%d/exe", pid), 0, unix.STATX_CTIME, &stx); err != nil {
		return -1
	}
	return stx.Ctime.Sec*1e9 + int64(stx.Ctime.Nsec)
}

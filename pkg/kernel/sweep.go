package kernel

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Sweeps of live sockets. A verdict taken at connect must follow the agent's rule set for as
// long as the connection lives: after an install, a kill or a clear, the sweep runs the iter/tcp
// and iter/udp programs over the sockets of the network namespaces the agent's processes are in,
// and they terminate (bpf_sock_destroy) those of the slot whose destination the rule set in
// force no longer allows. Sweeps run one at a time; the slots asked for while one runs are swept
// together by the next, so a policy change that touches every agent costs a few sweeps, not one
// per agent. Where the kernel has no bpf_sock_destroy, a sweep does nothing: tether_egress_skb
// drops the packets of those sockets instead.

// SweepResult is what one sweep did.
type SweepResult struct {
	Slots      []dataplane.Slot
	Namespaces int // network namespaces iterated
	Checked    int // sockets of the slots looked at
	Destroyed  int // sockets terminated
	Errors     int // sockets bpf_sock_destroy could not terminate (their packets are still dropped)
	Took       time.Duration
}

type sweepWaiter chan sweepOutcome

type sweepOutcome struct {
	res SweepResult
	err error
}

type sweeper struct {
	k        *Kernel
	log      *slog.Logger
	tcp, udp *link.Iter // nil where bpf_sock_destroy is not supported
	// cpus are the CPUs a sweep runs a reader on, one shard each (tether_sweep_shard).
	cpus []int

	mu      sync.Mutex
	pending map[dataplane.Slot]bool
	waiters []sweepWaiter
	// timedSlots have rules with a max_duration (the shortest, by slot): they are swept every
	// period so that their expired connections are terminated (their packets are dropped at
	// the deadline already).
	timedSlots map[dataplane.Slot]time.Duration
	wake       chan struct{}
	stop       chan struct{}
	done       chan struct{}
	closed     bool

	sweeps, destroyed, errs atomic.Uint64
	last                    atomic.Int64
}

// newSweeper starts the sweeper; tcp and udp are nil where the kernel cannot destroy sockets.
func newSweeper(k *Kernel, tcp, udp *link.Iter, cpus []int) *sweeper {
	s := &sweeper{k: k, log: k.log, tcp: tcp, udp: udp, cpus: cpus, pending: map[dataplane.Slot]bool{}, timedSlots: map[dataplane.Slot]time.Duration{},
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go s.loop()
	return s
}

func (s *sweeper) supported() bool { return s.tcp != nil }

// request asks for a sweep of slot and returns at once.
func (s *sweeper) request(slot dataplane.Slot) {
	if !s.supported() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.pending[slot] = true
	s.poke()
}

// poke wakes the loop. Call with s.mu held.
func (s *sweeper) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Sweep terminates the live sockets of slots that their agent's state no longer allows, and
// returns once a sweep that started after the call has finished.
func (k *Kernel) Sweep(slots ...dataplane.Slot) (SweepResult, error) {
	s := k.sweeper
	if s == nil || !s.supported() {
		return SweepResult{}, nil
	}
	w := make(sweepWaiter, 1)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return SweepResult{}, errors.New("kernel closed")
	}
	for _, slot := range slots {
		if err := checkSlot(slot); err != nil {
			s.mu.Unlock()
			return SweepResult{}, err
		}
		s.pending[slot] = true
	}
	s.waiters = append(s.waiters, w)
	s.poke()
	s.mu.Unlock()
	out := <-w
	return out.res, out.err
}

// SweepStats counts the sweeps since Open.
func (k *Kernel) SweepStats() dataplane.SweepStats {
	s := k.sweeper
	if s == nil {
		return dataplane.SweepStats{}
	}
	return dataplane.SweepStats{Sweeps: s.sweeps.Load(), Terminated: s.destroyed.Load(), Errors: s.errs.Load(),
		Last: time.Duration(s.last.Load())}
}

// timed records the shortest max_duration of the rules installed for slot (0: none).
func (s *sweeper) timed(slot dataplane.Slot, d time.Duration) {
	if !s.supported() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, had := s.timedSlots[slot]
	if d == 0 {
		delete(s.timedSlots, slot)
	} else {
		s.timedSlots[slot] = d
	}
	if had != (d != 0) || d != 0 {
		s.poke() // the period may change
	}
}

// period is how often the timed slots are swept: a quarter of their shortest max_duration,
// between 10 ms and 1 s; 0 without timed slots. Call with s.mu held.
func (s *sweeper) period() time.Duration {
	var least time.Duration
	for _, d := range s.timedSlots {
		if least == 0 || d < least {
			least = d
		}
	}
	if least == 0 {
		return 0
	}
	return min(max(least/4, 10*time.Millisecond), time.Second)
}

func (s *sweeper) close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	close(s.stop)
	s.mu.Unlock()
	<-s.done
	for _, it := range []*link.Iter{s.tcp, s.udp} {
		if it != nil {
			it.Close()
		}
	}
}

func (s *sweeper) loop() {
	defer close(s.done)
	var tick <-chan time.Time
	var ticker *time.Ticker
	var period time.Duration
	defer func() {
		if ticker != nil {
			ticker.Stop()
		}
	}()
	for {
		timedDue := false
		select {
		case <-s.stop:
			s.mu.Lock()
			for _, w := range s.waiters {
				w <- sweepOutcome{err: errors.New("kernel closed")}
			}
			s.waiters = nil
			s.mu.Unlock()
			return
		case <-s.wake:
		case <-tick:
			timedDue = true
		}
		s.mu.Lock()
		if p := s.period(); p != period {
			period = p
			if ticker != nil {
				ticker.Stop()
				ticker, tick = nil, nil
			}
			if p > 0 {
				ticker = time.NewTicker(p)
				tick = ticker.C
			}
		}
		if timedDue {
			for slot := range s.timedSlots {
				s.pending[slot] = true
			}
		}
		slots := make([]dataplane.Slot, 0, len(s.pending))
		for slot := range s.pending {
			slots = append(slots, slot)
		}
		clear(s.pending)
		waiters := s.waiters
		s.waiters = nil
		s.mu.Unlock()
		if len(slots) == 0 && len(waiters) == 0 {
			continue
		}
		res, err := s.sweep(slots)
		if err != nil {
			s.errs.Add(1)
			s.log.Warn("sweeping live sockets", "slots", slots, "error", err)
		} else if res.Destroyed > 0 || res.Errors > 0 {
			s.log.Info("live sockets terminated", "slots", slots, "terminated", res.Destroyed, "failed", res.Errors,
				"checked", res.Checked, "namespaces", res.Namespaces, "took", res.Took)
		}
		for _, w := range waiters {
			w <- sweepOutcome{res: res, err: err}
		}
	}
}

// sweep runs the iterators once over the sockets of slots' network namespaces.
func (s *sweeper) sweep(slots []dataplane.Slot) (SweepResult, error) {
	res := SweepResult{Slots: slots}
	if len(slots) == 0 {
		return res, nil
	}
	start := time.Now()
	k := s.k
	nss, err := s.namespaces(slots)
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	defer func() {
		for _, ns := range nss {
			if ns != nil {
				ns.Close()
			}
		}
	}()
	res.Namespaces = len(nss)
	if len(nss) == 0 {
		// No process of these agents is left (a fleet of idle agents after a policy change):
		// no namespace holds a socket of theirs to check.
		res.Took = time.Since(start)
		s.sweeps.Add(1)
		return res, errors.Join(errs...)
	}
	all := uint32(0)
	for _, slot := range slots {
		if err := k.sweepMap.Put(uint32(slot), bpfTetherSweepSlot{Want: 1}); err != nil {
			return res, fmt.Errorf("marking slot %d for the sweep: %w", slot, err)
		}
		if f, err := k.Flags(slot); err == nil && f&dataplane.AgentKilled != 0 {
			all = 1
		}
	}
	// The entry after the slots: sockets without storage too (a killed agent's), and shards.
	if err := k.sweepMap.Put(uint32(dataplane.MaxAgents), bpfTetherSweepSlot{Want: all, Checked: uint32(len(s.cpus))}); err != nil {
		return res, fmt.Errorf("describing the sweep: %w", err)
	}
	for _, ns := range nss {
		if err := s.iterate(ns); err != nil {
			errs = append(errs, err)
		}
	}
	for _, slot := range slots {
		var v bpfTetherSweepSlot
		if err := k.sweepMap.Lookup(uint32(slot), &v); err != nil {
			errs = append(errs, fmt.Errorf("reading the sweep of slot %d: %w", slot, err))
		}
		res.Checked += int(v.Checked)
		res.Destroyed += int(v.Destroyed)
		res.Errors += int(v.Errors)
		if err := k.sweepMap.Put(uint32(slot), bpfTetherSweepSlot{}); err != nil {
			errs = append(errs, fmt.Errorf("ending the sweep of slot %d: %w", slot, err))
		}
	}
	res.Took = time.Since(start)
	s.sweeps.Add(1)
	s.destroyed.Add(uint64(res.Destroyed))
	s.errs.Add(uint64(res.Errors))
	s.last.Store(int64(res.Took))
	return res, errors.Join(errs...)
}

// iterate runs both iterators over the sockets of network namespace ns (nil: tetherd's own), in
// one reader per CPU of s.cpus, each pinned to its CPU: a reader terminates the sockets of its
// shard (see tether_sweep_shard). An iterator walks the namespace of the thread that opens it,
// and runs on the CPU of the thread that reads it.
func (s *sweeper) iterate(ns *os.File) error {
	errs := make([]error, len(s.cpus))
	var wg sync.WaitGroup
	for i, cpu := range s.cpus {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = onThread(cpu, ns, s.read)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// read runs both iterators over the sockets of the calling thread's network namespace.
func (s *sweeper) read() error {
	var errs []error
	for _, it := range []*link.Iter{s.tcp, s.udp} {
		rc, err := it.Open()
		if err != nil {
			errs = append(errs, fmt.Errorf("opening socket iterator: %w", err))
			continue
		}
		if _, err := io.Copy(io.Discard, rc); err != nil {
			errs = append(errs, fmt.Errorf("running socket iterator: %w", err))
		}
		rc.Close()
	}
	return errors.Join(errs...)
}

// onThread runs f on a locked thread pinned to cpu (-1: wherever) and, with ns, in network
// namespace ns. A thread that cannot get back to its CPUs or its namespace ends with its
// goroutine instead of serving others.
func onThread(cpu int, ns *os.File, f func() error) error {
	runtime.LockOSThread()
	var old unix.CPUSet
	if cpu >= 0 {
		if err := unix.SchedGetaffinity(0, &old); err != nil {
			runtime.UnlockOSThread()
			return fmt.Errorf("reading this thread's CPUs: %w", err)
		}
		var one unix.CPUSet
		one.Set(cpu)
		if err := unix.SchedSetaffinity(0, &one); err != nil {
			runtime.UnlockOSThread()
			return fmt.Errorf("pinning a sweep to CPU %d: %w", cpu, err)
		}
	}
	var origin *os.File
	if ns != nil {
		var err error
		if origin, err = os.Open("/proc/thread-self/ns/net"); err == nil {
			err = unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET)
		}
		if err != nil {
			if origin != nil {
				origin.Close()
			}
			if cpu < 0 || unix.SchedSetaffinity(0, &old) == nil {
				runtime.UnlockOSThread()
			}
			return fmt.Errorf("entering network namespace %s: %w", ns.Name(), err)
		}
		defer origin.Close()
	}
	ferr := f()
	if ns != nil {
		if err := unix.Setns(int(origin.Fd()), unix.CLONE_NEWNET); err != nil {
			return errors.Join(ferr, fmt.Errorf("returning from network namespace %s: %w", ns.Name(), err)) // the thread stays locked and ends
		}
	}
	if cpu >= 0 {
		if err := unix.SchedSetaffinity(0, &old); err != nil {
			return errors.Join(ferr, fmt.Errorf("unpinning a sweep thread: %w", err)) // stays locked and ends
		}
	}
	runtime.UnlockOSThread()
	return ferr
}

// sweepCPUs are the CPUs tetherd may run on, at most maxShards of them, and writes their shards
// into tether_sweep_shard.
func (k *Kernel) sweepCPUs() []int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil || set.Count() < 2 {
		return []int{-1}
	}
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return []int{-1}
	}
	shards := make([]uint32, n)
	var cpus []int
	for c := 0; c < n && len(cpus) < maxShards; c++ {
		if set.IsSet(c) {
			cpus = append(cpus, c)
			shards[c] = uint32(len(cpus))
		}
	}
	if err := k.sweepShard.Put(uint32(0), shards); err != nil {
		k.log.Warn("sweeps run on one CPU", "error", err)
		return []int{-1}
	}
	return cpus
}

// maxShards bounds the CPUs a sweep runs on.
const maxShards = 8

// namespaces are the network namespaces the processes of slots' cgroups (as their agent info
// records them) are in: nil for tetherd's own, an open file for each other. A process that ends
// meanwhile is skipped; a namespace no process of the slots is in is not iterated. The namespace
// of a process of another user can be read only with CAP_SYS_PTRACE (the DaemonSet has it; the
// systemd unit, whose agents share the host's namespace, does not): where it cannot, tetherd's
// own is taken.
func (s *sweeper) namespaces(slots []dataplane.Slot) ([]*os.File, error) {
	own, err := netnsInode("/proc/self/ns/net")
	if err != nil {
		return nil, err
	}
	seen := map[uint64]bool{}
	var out []*os.File
	var errs []error
	unreadable := false
	for _, slot := range slots {
		var info bpfTetherAgentInfo
		if err := s.k.agentInfo.Lookup(uint32(slot), &info); err != nil {
			errs = append(errs, fmt.Errorf("reading agent info of slot %d: %w", slot, err))
			continue
		}
		path := cString(info.CgroupPath[:])
		if info.Flags&infoInUse == 0 || path == "" {
			continue
		}
		for _, p := range threadNetns(cgroupProcs(path)) {
			ino, err := netnsInode(p)
			if errors.Is(err, fs.ErrPermission) {
				unreadable = true
			}
			if err != nil || seen[ino] {
				continue
			}
			if ino == own {
				seen[ino] = true
				out = append(out, nil)
				continue
			}
			f, err := os.Open(p)
			if err != nil {
				continue
			}
			// The process may have moved on between the stat and the open: what counts is
			// the namespace the open file is.
			ino2, err := fdInode(f)
			if err != nil || seen[ino2] {
				f.Close()
				continue
			}
			seen[ino2] = true
			if ino2 == own {
				f.Close()
				out = append(out, nil)
				continue
			}
			out = append(out, f)
		}
	}
	if unreadable && !seen[own] {
		out = append(out, nil)
	}
	return out, errors.Join(errs...)
}

// threadNetns lists the network namespace file of every thread of the processes pids: setns
// moves one thread, so a process's sockets can live in as many namespaces as it has threads, and
// /proc/PID/ns/net names only its first thread's. A process whose threads cannot be listed (it
// ended meanwhile) is named by /proc/PID/ns/net.
func threadNetns(pids []int) []string {
	var out []string
	for _, pid := range pids {
		dir := "/proc/" + strconv.Itoa(pid) + "/task"
		tids, err := os.ReadDir(dir)
		if err != nil || len(tids) == 0 {
			out = append(out, "/proc/"+strconv.Itoa(pid)+"/ns/net")
			continue
		}
		for _, tid := range tids {
			out = append(out, dir+"/"+tid.Name()+"/ns/net")
		}
	}
	return out
}

func fdInode(f *os.File) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

func netnsInode(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("%s: no inode", path)
	}
	return st.Ino, nil
}

// cgroupProcs lists the processes of the cgroup at path and of every cgroup below it.
func cgroupProcs(path string) []int {
	var pids []int
	filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids
}

// attachSweep attaches the iterator programs where this load has them.
func (k *Kernel) attachSweep() error {
	var its [2]*link.Iter
	for i, name := range []string{bpfProgTetherSweepTcp, bpfProgTetherSweepUdp} {
		prog := k.coll.Programs[name]
		if prog == nil {
			for _, it := range its {
				if it != nil {
					it.Close()
				}
			}
			k.sweeper = newSweeper(k, nil, nil, nil)
			return nil
		}
		it, err := link.AttachIter(link.IterOptions{Program: prog})
		if err != nil {
			var ve *ebpf.VerifierError
			if errors.As(err, &ve) {
				return fmt.Errorf("attaching %s: %+v", name, ve)
			}
			return fmt.Errorf("attaching %s: %w", name, err)
		}
		its[i] = it
	}
	k.sweeper = newSweeper(k, its[0], its[1], k.sweepCPUs())
	return nil
}

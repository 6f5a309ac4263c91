// Package kernel is tether's kernel layer: it loads the BPF programs of bpf/, pins their maps and
// links under a bpffs directory, attaches them (the cgroup programs at the agent parent cgroups
// only), and implements dataplane.Dataplane by turning compiled rule sets into map entries. The
// decisions the programs report come out of an EventReader.
//
// Pins outlive the daemon: a crash or an upgrade leaves enforcement in place, and Open adopts what
// is pinned (maps are reused, links are updated to the newly loaded programs).
//
// It is the only package of tether that imports cilium/ebpf.
package kernel

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/tether-sh/tether/pkg/bpffs"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// ExecMode is how exec is enforced (see dataplane.ExecMode).
type ExecMode = dataplane.ExecMode

const (
	ExecAuto   = dataplane.ExecAuto
	ExecLSM    = dataplane.ExecLSM
	ExecSignal = dataplane.ExecSignal
	ExecOff    = dataplane.ExecOff
)

// DefaultPinDir is where tetherd pins its maps and links.
const DefaultPinDir = "/sys/fs/bpf/tether"

// Options configure Open.
type Options struct {
	// PinDir is a directory on a bpf filesystem; created if missing. If the bpf filesystem is
	// not mounted and PinDir is under /sys/fs/bpf, it is mounted there.
	PinDir string
	// RingBufferSize is the size of the event ring buffer in bytes: a power of two and a
	// multiple of the page size. 0 means 4 MiB.
	RingBufferSize uint32
	// AllowSample emits one allow event in every AllowSample allows; 0 emits none.
	AllowSample uint32
	// UnknownCgroupAllow allows network access to processes under an agent parent that are in
	// no agent; by default they are denied.
	UnknownCgroupAllow bool
	// Exec chooses how exec is enforced.
	Exec ExecMode
	// AllowRootAttach permits attaching the cgroup programs at the cgroup2 root, which hooks
	// every process of the host. Only for nodes where that is the intent.
	AllowRootAttach bool
	// NoSockDestroy leaves live sockets open where the kernel could terminate them: revoked
	// connections are then only cut by dropping their packets, as on kernels before 6.5.
	NoSockDestroy bool
	Logger        *slog.Logger
}

// Kernel is the loaded and attached data plane.
type Kernel struct {
	log      *slog.Logger
	pinDir   string
	opts     Options
	features Features

	coll          *ebpf.Collection
	cgroups       *ebpf.Map
	agents        *ebpf.Map
	rulesets      *ebpf.Map
	hosts         *ebpf.Map
	procs         *ebpf.Map
	roots         *ebpf.Map
	dnsPeers      *ebpf.Map
	events        *ebpf.Map
	counters      *ebpf.Map
	agentCounters *ebpf.Map
	agentAllows   *ebpf.Map // per CPU
	slotCache     *ebpf.Map // per CPU
	agentInfo     *ebpf.Map
	grants        *ebpf.Map
	settled       *ebpf.Map
	config        *ebpf.Map
	sweepMap      *ebpf.Map
	sweepShard    *ebpf.Map
	sweeper       *sweeper
	innerSpec     *ebpf.MapSpec

	genMu sync.Mutex // serialises binding generation bumps

	graces graceQueue // see graceAsync

	slotsMu  sync.Mutex
	slots    [dataplane.MaxAgents]*slotState
	graceMap *ebpf.Map // an empty trie, put into tether_rulesets[graceIndex] to wait for a grace period

	// adopted are the tether_hosts entries found at Open, by buffer, until each slot reads its own.
	adoptedMu sync.Mutex
	adopted   map[uint32][]hostEntry
	hostsFull atomic.Uint64 // host rules put into a trie because tether_hosts was full
	// cleanupDelay: how long a slot must go without an install before the retired host rules
	// of its buffer in force are removed (see dropRetiredLater).
	cleanupDelay time.Duration

	mu      sync.Mutex // guards everything below and serialises rule-set installs
	global  []link.Link
	parents map[uint64][]link.Link // by cgroup id
	// parentOrder are the agent parents in the order of tether_parents.
	parentOrder []parentCgroup
	parentsMap  *ebpf.Map
	closed      bool
}

// Open probes the kernel, loads the programs (reusing pinned maps), and attaches the global
// programs (exec, fork, exit). Cgroup programs are attached by AttachParent.
func Open(opts Options) (_ *Kernel, err error) {
	if opts.PinDir == "" {
		opts.PinDir = DefaultPinDir
	}
	if opts.RingBufferSize == 0 {
		opts.RingBufferSize = 4 << 20
	}
	if opts.Exec == "" {
		opts.Exec = ExecAuto
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := checkRingBufferSize(opts.RingBufferSize); err != nil {
		return nil, err
	}
	if err := bpffs.Ensure(opts.PinDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(opts.PinDir, "links"), 0o700); err != nil {
		return nil, fmt.Errorf("creating pin directory: %w", err)
	}

	k := &Kernel{log: opts.Logger, pinDir: opts.PinDir, opts: opts, parents: map[uint64][]link.Link{}, cleanupDelay: time.Second}
	defer func() {
		if err != nil {
			k.Close()
		}
	}()
	k.features = probe(opts.Exec, opts.Logger)
	if opts.NoSockDestroy && k.features.SockDestroy {
		k.features.noSockDestroy()
	}
	if opts.Exec == ExecLSM && !k.features.LSMUsable {
		return nil, fmt.Errorf("exec mode lsm requested, but BPF LSM is not usable here: %s", k.features.ExecReason)
	}
	if err := k.load(); err != nil {
		return nil, err
	}
	if err := k.attachGlobal(); err != nil {
		return nil, err
	}
	if err := k.attachSweep(); err != nil {
		return nil, err
	}
	return k, nil
}

func checkRingBufferSize(n uint32) error {
	page := uint32(os.Getpagesize())
	if n < page || n&(n-1) != 0 {
		return fmt.Errorf("ring buffer size %d: must be a power of two of at least %d bytes", n, page)
	}
	return nil
}

// replaceableMaps hold nothing that must survive an incompatible change (a new ring buffer
// size): a pinned one that does not fit is replaced instead of refusing to start. The DNS peers
// are written again by every packet of DNS an agent sends.
var replaceableMaps = map[string]bool{bpfMapTetherEvents: true, bpfMapTetherSlotCache: true, bpfMapTetherDnsPeers: true}

func (k *Kernel) load() error {
	spec, err := k.spec()
	if err != nil {
		return err
	}
	k.innerSpec = spec.Maps[bpfMapTetherRulesets].InnerMap.Copy()

	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: k.pinDir},
	})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("loading BPF programs: %+v", ve)
		}
		return fmt.Errorf("loading BPF programs: %w", err)
	}
	k.coll = coll
	k.takeMaps(coll)
	if k.graceMap, err = ebpf.NewMap(k.innerSpec); err != nil {
		return fmt.Errorf("creating the grace-period trie: %w", err)
	}
	if k.adopted, err = k.scanHosts(); err != nil {
		return err
	}
	// An earlier tetherd may have switched a buffer moments ago: wait once, so that every buffer
	// not in force is free to rewrite.
	k.grace()
	// Moves of agent processes by this process are not migrations. The agent parents an earlier
	// tetherd recorded stay in force until this one has attached at its own (AttachParent, then
	// DetachStaleParents), so exec enforcement does not lapse across a restart.
	if err := k.updateConfig("recording tetherd's process", func(c *bpfTetherConfigEntry) {
		c.DaemonTgid = uint32(os.Getpid())
	}); err != nil {
		return err
	}
	// Whatever a cache of an earlier load holds is from before this process: start a new
	// generation.
	return k.bindingsChanged()
}

// spec is the embedded collection as this kernel and configuration load it: the knobs set, the
// programs this kernel runs, the maps pinned (each checked against what is pinned already).
func (k *Kernel) spec() (*ebpf.CollectionSpec, error) {
	spec, err := loadBpf()
	if err != nil {
		return nil, fmt.Errorf("reading embedded BPF objects: %w", err)
	}
	sets := map[string]any{
		bpfVarTetherAllowSample:        k.opts.AllowSample,
		bpfVarTetherUnknownCgroupAllow: boolByte(k.opts.UnknownCgroupAllow),
		bpfVarTetherExecSignal:         boolByte(k.features.ExecMode == ExecSignal),
	}
	for name, v := range sets {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("setting %s: %w", name, err)
		}
	}
	spec.Maps[bpfMapTetherEvents].MaxEntries = k.opts.RingBufferSize
	for name := range spec.Programs {
		if !k.features.wantProgram(name) {
			delete(spec.Programs, name)
		}
	}
	if err := k.checkLayout(spec); err != nil {
		return nil, err
	}
	for name, m := range spec.Maps {
		if !strings.HasPrefix(name, "tether_") || name == bpfMapTetherSweep || name == bpfMapTetherSweepShard {
			continue // .rodata and the sweep's slots belong to this load of the programs
		}
		m.Pinning = ebpf.PinByName
		if err := k.checkPinned(m); err != nil {
			return nil, err
		}
	}
	return spec, nil
}

// takeMaps keeps the maps of coll that tetherd reads and writes.
func (k *Kernel) takeMaps(coll *ebpf.Collection) {
	k.cgroups = coll.Maps[bpfMapTetherCgroups]
	k.agents = coll.Maps[bpfMapTetherAgents]
	k.rulesets = coll.Maps[bpfMapTetherRulesets]
	k.hosts = coll.Maps[bpfMapTetherHosts]
	k.procs = coll.Maps[bpfMapTetherProcs]
	k.roots = coll.Maps[bpfMapTetherRoots]
	k.dnsPeers = coll.Maps[bpfMapTetherDnsPeers]
	k.events = coll.Maps[bpfMapTetherEvents]
	k.counters = coll.Maps[bpfMapTetherCounters]
	k.settled = coll.Maps[bpfMapTetherSettled]
	k.agentCounters = coll.Maps[bpfMapTetherAgentCounters]
	k.agentAllows = coll.Maps[bpfMapTetherAgentAllows]
	k.slotCache = coll.Maps[bpfMapTetherSlotCache]
	k.agentInfo = coll.Maps[bpfMapTetherAgentInfo]
	k.grants = coll.Maps[bpfMapTetherGrantUses]
	k.config = coll.Maps[bpfMapTetherConfig]
	k.sweepMap = coll.Maps[bpfMapTetherSweep]
	k.sweepShard = coll.Maps[bpfMapTetherSweepShard]
	k.parentsMap = coll.Maps[bpfMapTetherParents]
}

// checkPinned refuses to start on a pinned map this build cannot use (its state would be lost),
// except for maps whose content may go, which are replaced.
func (k *Kernel) checkPinned(spec *ebpf.MapSpec) error {
	path := filepath.Join(k.pinDir, spec.Name)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("opening pinned map %s: %w", path, err)
	}
	defer m.Close()
	cerr := spec.Compatible(m)
	if cerr == nil {
		return nil
	}
	if replaceableMaps[spec.Name] {
		k.log.Info("replacing pinned map", "map", spec.Name, "reason", cerr)
		return m.Unpin()
	}
	return k.incompatible(fmt.Errorf("map %s: %v", spec.Name, cerr))
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// Features reports what the running kernel supports and what Open chose.
func (k *Kernel) Features() Features { return k.features }

// PinDir is the directory holding the pins.
func (k *Kernel) PinDir() string { return k.pinDir }

// Close releases this process's handles. Pinned maps and links stay, so enforcement continues.
// It closes in reverse order of creation and may be called more than once.
func (k *Kernel) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil
	}
	k.closed = true
	if k.sweeper != nil {
		k.sweeper.close()
	}
	var errs []error
	for _, ls := range k.parents {
		for _, l := range ls {
			errs = append(errs, l.Close())
		}
	}
	for _, l := range k.global {
		errs = append(errs, l.Close())
	}
	k.closeSlots()
	if k.graceMap != nil {
		k.graceMap.Close()
	}
	if k.coll != nil {
		k.coll.Close()
	}
	return errors.Join(errs...)
}

package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/tether-sh/tether/internal/bpfemu"
)

// PathCount is what one run of a program executed, counted by running the program as compiled
// (the ELF's instructions, before the verifier's rewrites) in an emulator on the maps this
// Kernel holds. Unlike its run time it does not move with the machine's load.
type PathCount struct {
	Insns   int // BPF instructions executed (a helper call counts one)
	Helpers int // helper calls
	Lookups int // map lookups (of them)
	Verdict uint64
}

// Paths runs tether's programs on the kernel maps: each value a program reads is read from the
// kernel the first time (rule sets, bindings, agents, lineage, .rodata as loaded), and what the
// programs write stays here. Per-CPU maps (the slot cache, the counters) start empty, ring
// buffers accept every record, socket storage starts empty. Each call of a process is emulated
// with that process's cgroup and ancestors. Close releases the inner maps it opened.
type Paths struct {
	progs  map[string]asm.Instructions // by hook name
	m      *bpfemu.Machine
	task   *bpfemu.Region
	call   *SockCall
	clock  uint64
	opened []*ebpf.Map
}

// SockCall is a socket call of a process, as a socket address hook sees it.
type SockCall struct {
	Hook      string   // connect4, connect6, sendmsg4, sendmsg6
	Cgroup    uint64   // the process's cgroup
	Ancestors []uint64 // its ancestors' ids, by level (0: the root)
	// UnderParent says whether the process's cgroup is below an agent parent.
	UnderParent bool
	Tgid        uint32
	Proto       uint8 // IPPROTO_TCP or IPPROTO_UDP
	Dst         netip.AddrPort
	// Socket is the socket's identity: calls with the same Socket share its storage (a UDP
	// socket connected again); nil is a new socket.
	Socket *bpfemu.Region
}

// NewSocket is a socket for SockCall.Socket.
func NewSocket() *bpfemu.Region { return bpfemu.NewRegion("socket", 256) }

// Paths readies an emulated run of the programs on this Kernel's maps (see Paths). It reads
// nothing yet: a run reads the few values it needs, so it costs the same at 16,384 slots.
func (k *Kernel) Paths() (*Paths, error) {
	spec, err := loadBpf()
	if err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil, errors.New("kernel closed")
	}
	p := &Paths{progs: map[string]asm.Instructions{}, task: bpfemu.NewRegion("task", 1<<16)}
	maps := map[string]bpfemu.Map{}
	for name, ms := range spec.Maps {
		live := k.coll.Maps[name]
		if live == nil {
			continue // not loaded (a program that needs it is not emulated)
		}
		em, err := p.emulated(name, ms, live)
		if err != nil {
			return nil, fmt.Errorf("map %s: %w", name, err)
		}
		maps[name] = em
	}
	for _, h := range hookSpecs {
		if ps := spec.Programs[h.prog]; ps != nil {
			p.progs[h.name] = ps.Instructions
		}
	}
	p.m = &bpfemu.Machine{Maps: maps, Helpers: bpfemu.MapHelpers()}
	p.addHelpers()
	return p, nil
}

// Close releases the inner maps the runs opened.
func (p *Paths) Close() {
	for _, m := range p.opened {
		m.Close()
	}
	p.opened = nil
}

func (p *Paths) emulated(name string, spec *ebpf.MapSpec, live *ebpf.Map) (bpfemu.Map, error) {
	switch spec.Type {
	case ebpf.PerCPUArray, ebpf.PerCPUHash, ebpf.CGroupArray:
		// Caches and counters start empty; agent parents are the call's UnderParent.
		return bpfemu.NewArray(name, int(spec.MaxEntries), int(spec.ValueSize)), nil
	case ebpf.RingBuf:
		return &bpfemu.RingBuf{}, nil
	case ebpf.SkStorage:
		return bpfemu.NewSkStorage(name, int(spec.ValueSize)), nil
	case ebpf.Array, ebpf.Hash, ebpf.LRUHash, ebpf.LPMTrie, ebpf.ArrayOfMaps, ebpf.HashOfMaps:
		return &liveMap{p: p, name: name, spec: spec, live: live, seen: map[string]*bpfemu.Region{}}, nil
	}
	return nil, fmt.Errorf("map type %v is not emulated", spec.Type)
}

// liveMap is a kernel map as a program run sees it: a value is read from the kernel at its first
// lookup (the kernel's own lookup: longest prefix for a trie, the inner map for a map of maps),
// and the run's writes stay in seen.
type liveMap struct {
	p    *Paths
	name string
	spec *ebpf.MapSpec
	live *ebpf.Map
	seen map[string]*bpfemu.Region // by key; nil: no entry
}

func (l *liveMap) KeySize() int   { return int(l.spec.KeySize) }
func (l *liveMap) ValueSize() int { return int(l.spec.ValueSize) }

func (l *liveMap) Lookup(key []byte) (*bpfemu.Region, error) {
	if r, ok := l.seen[string(key)]; ok {
		return r, nil
	}
	var r *bpfemu.Region
	v := make([]byte, l.spec.ValueSize)
	switch err := l.live.Lookup(key, &v); {
	case errors.Is(err, ebpf.ErrKeyNotExist):
	case err != nil:
		return nil, fmt.Errorf("reading %s: %w", l.name, err)
	case l.spec.Type == ebpf.ArrayOfMaps || l.spec.Type == ebpf.HashOfMaps:
		inner, err := ebpf.NewMapFromID(ebpf.MapID(binary.LittleEndian.Uint32(v)))
		if err != nil {
			return nil, fmt.Errorf("opening an inner map of %s: %w", l.name, err)
		}
		l.p.opened = append(l.p.opened, inner)
		r = &bpfemu.Region{Name: l.name + " inner", Map: &liveMap{p: l.p, name: l.name + " inner", spec: l.spec.InnerMap, live: inner, seen: map[string]*bpfemu.Region{}}}
	default:
		r = bpfemu.NewRegion(l.name+" value", len(v))
		copy(r.Mem, v)
	}
	l.seen[string(key)] = r
	return r, nil
}

func (l *liveMap) Update(key, value []byte, _ uint64) error {
	r := bpfemu.NewRegion(l.name+" value", int(l.spec.ValueSize))
	copy(r.Mem, value)
	l.seen[string(key)] = r
	return nil
}

func (l *liveMap) Delete(key []byte) error {
	l.seen[string(key)] = nil
	return nil
}

func (p *Paths) addHelpers() {
	h := p.m.Helpers
	h[asm.FnGetCurrentCgroupId] = func(*bpfemu.Machine, [5]bpfemu.Value) (bpfemu.Value, error) {
		return bpfemu.Scalar(p.call.Cgroup), nil
	}
	h[asm.FnGetCurrentAncestorCgroupId] = func(_ *bpfemu.Machine, a [5]bpfemu.Value) (bpfemu.Value, error) {
		if l := int(a[0].V); l < len(p.call.Ancestors) {
			return bpfemu.Scalar(p.call.Ancestors[l]), nil
		}
		return bpfemu.Scalar(0), nil
	}
	h[asm.FnCurrentTaskUnderCgroup] = func(*bpfemu.Machine, [5]bpfemu.Value) (bpfemu.Value, error) {
		if p.call.UnderParent {
			return bpfemu.Scalar(1), nil
		}
		return bpfemu.Scalar(0), nil
	}
	h[asm.FnGetCurrentPidTgid] = func(*bpfemu.Machine, [5]bpfemu.Value) (bpfemu.Value, error) {
		return bpfemu.Scalar(uint64(p.call.Tgid)<<32 | uint64(p.call.Tgid)), nil
	}
	h[asm.FnGetCurrentUidGid] = func(*bpfemu.Machine, [5]bpfemu.Value) (bpfemu.Value, error) {
		return bpfemu.Scalar(0), nil
	}
	h[asm.FnGetCurrentComm] = func(_ *bpfemu.Machine, a [5]bpfemu.Value) (bpfemu.Value, error) {
		b, err := a[0].Bytes(int(a[1].V))
		if err == nil {
			copy(b, "agent")
		}
		return bpfemu.Scalar(0), err
	}
	clock := func(*bpfemu.Machine, [5]bpfemu.Value) (bpfemu.Value, error) {
		p.clock += 1000
		return bpfemu.Scalar(p.clock), nil
	}
	h[asm.FnKtimeGetBootNs], h[asm.FnKtimeGetNs] = clock, clock
	// Allows are sampled one in tether_allow_sample: this returns a value no sample takes (1),
	// the common case of production sampling.
	h[asm.FnGetPrandomU32] = func(*bpfemu.Machine, [5]bpfemu.Value) (bpfemu.Value, error) { return bpfemu.Scalar(1), nil }
	// The task's address, as a number (the slot cache's key): one per process and cgroup (a
	// task in another cgroup has moved, which the migration count reflects; calls do not
	// move, so they are other tasks).
	h[asm.FnGetCurrentTask] = func(*bpfemu.Machine, [5]bpfemu.Value) (bpfemu.Value, error) {
		return bpfemu.Scalar(0xffff888000000000 + (uint64(p.call.Tgid)<<20^p.call.Cgroup)<<13), nil
	}
	h[asm.FnGetCurrentTaskBtf] = func(*bpfemu.Machine, [5]bpfemu.Value) (bpfemu.Value, error) {
		return bpfemu.Pointer(p.task, 0), nil
	}
	// Kernel memory other than the task reads as zeroes (the task's cgroup level 0: the walk
	// of ancestors ends at once; a call that needs it passes its ancestors instead).
	probeRead := func(_ *bpfemu.Machine, a [5]bpfemu.Value) (bpfemu.Value, error) {
		dst, err := a[0].Bytes(int(a[1].V))
		if err != nil {
			return bpfemu.Value{}, err
		}
		clear(dst)
		if src, err := a[2].Bytes(int(a[1].V)); err == nil {
			copy(dst, src)
		}
		return bpfemu.Scalar(0), nil
	}
	h[asm.FnProbeReadKernel], h[asm.FnProbeReadKernelStr] = probeRead, probeRead
}

// sockAddr is the uapi struct bpf_sock_addr: user_family 0, user_ip4 4, user_ip6 8, user_port
// 24, family 28, type 32, protocol 36, msg_src_ip4 40, msg_src_ip6 44, sk 64.
func sockAddr(c *SockCall) (*bpfemu.Region, error) {
	ctx := bpfemu.NewRegion("bpf_sock_addr", 72)
	le := binary.LittleEndian
	family, sockType := uint32(2), uint32(1)
	if strings.HasSuffix(c.Hook, "6") {
		family = 10
	}
	if c.Proto == 17 {
		sockType = 2
	}
	a := c.Dst.Addr()
	if family == 2 {
		if !a.Is4() {
			return nil, fmt.Errorf("%s to %v: not an IPv4 address", c.Hook, a)
		}
		b := a.As4()
		copy(ctx.Mem[4:], b[:])
	} else {
		b := a.As16()
		copy(ctx.Mem[8:], b[:])
	}
	le.PutUint32(ctx.Mem[0:], family)
	binary.BigEndian.PutUint16(ctx.Mem[24:], c.Dst.Port())
	le.PutUint32(ctx.Mem[28:], family)
	le.PutUint32(ctx.Mem[32:], sockType)
	le.PutUint32(ctx.Mem[36:], uint32(c.Proto))
	sock := c.Socket
	if sock == nil {
		sock = NewSocket()
	}
	ctx.PutPointer(64, bpfemu.Pointer(sock, 0))
	return ctx, nil
}

// Run runs the call's hook once and counts it. Runs share the emulated maps: a second call of
// the same process finds the slot cache the first one filled, as on one CPU.
func (p *Paths) Run(c SockCall) (PathCount, error) {
	prog := p.progs[c.Hook]
	if prog == nil {
		return PathCount{}, fmt.Errorf("no program for hook %s", c.Hook)
	}
	ctx, err := sockAddr(&c)
	if err != nil {
		return PathCount{}, err
	}
	p.call = &c
	p.m.Counts = bpfemu.Counts{}
	ret, err := p.m.Run(prog, bpfemu.Pointer(ctx, 0))
	if err != nil {
		return PathCount{}, fmt.Errorf("emulating %s: %w", c.Hook, err)
	}
	return PathCount{Insns: p.m.Counts.Insns, Helpers: p.m.Counts.HelperCalls(), Lookups: p.m.Counts.Lookups, Verdict: ret}, nil
}

// Events is the number of records the emulated runs submitted to the ring buffer.
func (p *Paths) Events() int {
	if rb, ok := p.m.Maps[bpfMapTetherEvents].(*bpfemu.RingBuf); ok {
		return len(rb.Submitted)
	}
	return 0
}

// TestRunSkb runs the cgroup_skb program of hook ("egress_skb" or "ingress_skb") in the kernel
// with BPF_PROG_TEST_RUN on packet (from its IP header), repeat times, and an empty program of
// the same type on it as many times: the program's verdict (1: pass), and its time and the empty
// program's per run. The kernel gives the packet a socket of its own that no agent connected,
// so it measures the path of a packet tether knows nothing of. (The socket address programs
// cannot be run this way: the kernel has no test run for them; Paths counts them.)
func (k *Kernel) TestRunSkb(hook string, packet []byte, repeat int) (verdict uint32, prog, empty time.Duration, err error) {
	var p *ebpf.Program
	for _, h := range hookSpecs {
		if h.name == hook {
			p = k.coll.Programs[h.prog]
		}
	}
	if p == nil || p.Type() != ebpf.CGroupSKB {
		return 0, 0, 0, fmt.Errorf("no cgroup_skb program for hook %s", hook)
	}
	e, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "empty_skb", Type: ebpf.CGroupSKB, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()}})
	if err != nil {
		return 0, 0, 0, fmt.Errorf("loading an empty cgroup_skb program: %w", err)
	}
	defer e.Close()
	if _, empty, err = e.Benchmark(packet, repeat, nil); err != nil {
		return 0, 0, 0, fmt.Errorf("running the empty program: %w", err)
	}
	if verdict, prog, err = p.Benchmark(packet, repeat, nil); err != nil {
		return 0, 0, 0, fmt.Errorf("running %s: %w", hook, err)
	}
	return verdict, prog, empty, nil
}

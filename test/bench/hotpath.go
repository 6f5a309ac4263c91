package main

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/kernel"
)

// The hot path: what each socket hook executes on its common paths, and its run time against
// a program that does nothing, measured in the same rounds.

// Range grants of the benchmark's agent: one /24 and one /16 (port 443), so that an allowed
// range rule has a path of its own (the bulk length in tether_hosts, or the trie).
var (
	range24 = netip.MustParsePrefix("172.31.7.0/24")
	range16 = netip.MustParsePrefix("172.30.0.0/16")
)

// pathCase is one path through a hook, emulated on the kernel's maps.
type pathCase struct {
	name    string
	hook    string
	dst     func(e *env) netip.AddrPort
	proto   uint8
	unbound bool // a process in a cgroup below the agent parent bound to no agent
	reuse   bool // the socket of the previous run of this path (a UDP socket connected again)
	verdict uint64
}

func fixed(s string) func(*env) netip.AddrPort {
	return func(*env) netip.AddrPort { return netip.MustParseAddrPort(s) }
}

var pathCases = []pathCase{
	{name: "connect4 UDP, allowed host rule, socket connected again", hook: "connect4", proto: 17, reuse: true, verdict: 1,
		dst: func(e *env) netip.AddrPort { return e.udpLo }},
	{name: "connect4 TCP, allowed host rule, new socket", hook: "connect4", proto: 6, verdict: 1,
		dst: func(e *env) netip.AddrPort { return e.tcpLo }},
	{name: "connect4 TCP, allowed range rule (/24)", hook: "connect4", proto: 6, verdict: 1, dst: fixed("172.31.7.9:443")},
	{name: "connect4 TCP, allowed range rule (/16)", hook: "connect4", proto: 6, verdict: 1, dst: fixed("172.30.200.1:443")},
	{name: "connect4 TCP, denied (no rule)", hook: "connect4", proto: 6, verdict: 0, dst: fixed("192.0.2.1:443")},
	{name: "connect4 TCP, cgroup bound to no agent", hook: "connect4", proto: 6, unbound: true, verdict: 0,
		dst: func(e *env) netip.AddrPort { return e.tcpLo }},
	{name: "sendmsg4 UDP, allowed host rule", hook: "sendmsg4", proto: 17, verdict: 1,
		dst: func(e *env) netip.AddrPort { return e.udpLo }},
	{name: "sendmsg4 UDP, denied (no rule)", hook: "sendmsg4", proto: 17, verdict: 0, dst: fixed("192.0.2.1:53")},
}

// runCase is a loop whose hook's run time is measured, in the agent and under the empty program.
type runCase struct {
	name   string
	hook   string
	attach ebpf.AttachType
	probe  probe
}

var runCases = []runCase{
	{"connect4, UDP connect (socket connected again)", "connect4", ebpf.AttachCGroupInet4Connect, udpConn},
	{"connect4, TCP connect (new socket)", "connect4", ebpf.AttachCGroupInet4Connect, tcpLo},
	{"sendmsg4, UDP sendto", "sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, udpSend},
}

// fleetSize is the agents a node holds in the scale rows (the policy change for all of them, the
// hooks' run time with all of them loaded); -scale scales it.
const fleetSize = 10_000

// hotPathGoalNs is the goal for a socket hook's run time at the largest rule count.
const hotPathGoalNs = 150

type hotPathResults struct {
	rules  []int
	counts map[int]map[string]kernel.PathCount // by rules, path
	run    map[int]map[string][]float64        // ns per run of tether's program, by rules, run case; one per round
	floor  map[int]map[string][]float64        // the same for the empty program
	// fleet agents loaded beside the bench's (at the largest rule count): the same run times,
	// how long loading them took, and the maps' memory then.
	fleet                int
	fleetLoad            time.Duration
	fleetRun, fleetFloor map[string][]float64
	memory               dataplane.MapMemory
	// skb and skbEmpty: ns per run of egress_skb and of an empty cgroup_skb program under
	// BPF_PROG_TEST_RUN, one per round (at the largest rule count).
	skb, skbEmpty []float64
}

// measureHotPath counts the paths on the maps of each rule count's agent, and measures the
// programs' run time (kernel statistics) against an empty program of the same type attached
// at a cgroup outside the agent parent, round after round.
func measureHotPath(e *env, o options) (*hotPathResults, error) {
	res := &hotPathResults{rules: o.rules, counts: map[int]map[string]kernel.PathCount{},
		run: map[int]map[string][]float64{}, floor: map[int]map[string][]float64{}}
	floorCg := filepath.Join(e.base, "floor")
	if _, err := cgroups.Create(floorCg); err != nil {
		return nil, err
	}
	floors := map[string]*ebpf.Program{}
	for _, rc := range runCases {
		if floors[rc.hook] != nil {
			continue
		}
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "floor_" + rc.hook, Type: ebpf.CGroupSockAddr, AttachType: rc.attach,
			License: "GPL", Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()}})
		if err != nil {
			return nil, fmt.Errorf("loading the empty %s program: %w", rc.hook, err)
		}
		defer prog.Close()
		l, err := link.AttachCgroup(link.CgroupOptions{Path: floorCg, Attach: rc.attach, Program: prog})
		if err != nil {
			return nil, fmt.Errorf("attaching the empty %s program: %w", rc.hook, err)
		}
		defer l.Close()
		floors[rc.hook] = prog
	}
	stats, err := kernel.EnableStats()
	if err != nil {
		return nil, fmt.Errorf("enabling BPF statistics: %w", err)
	}
	defer stats.Close()

	top := slices.Max(o.rules)
	for _, n := range o.rules {
		if err := e.apply(state{tether: n}); err != nil {
			return nil, err
		}
		counts, err := e.countPaths()
		if err != nil {
			return nil, fmt.Errorf("%d rules: %w", n, err)
		}
		res.counts[n] = counts
		res.run[n], res.floor[n] = map[string][]float64{}, map[string][]float64{}
		for range o.rounds {
			if n == top {
				verdict, prog, empty, err := e.k.TestRunSkb("egress_skb", udpPacket(), max(1000, int(100_000*o.scale)))
				if err != nil {
					return nil, err
				}
				if verdict != 1 {
					return nil, fmt.Errorf("egress_skb under BPF_PROG_TEST_RUN: verdict %d, want 1", verdict)
				}
				res.skb, res.skbEmpty = append(res.skb, float64(prog)), append(res.skbEmpty, float64(empty))
			}
			if err := e.runRound(o, floorCg, floors, res.run[n], res.floor[n]); err != nil {
				return nil, err
			}
		}
	}
	// A node of fleetSize agents: the same loops with that many agents loaded beside the bench's
	// agent (its rule set at the largest rule count).
	res.fleet = min(max(100, int(fleetSize*o.scale)), dataplane.MaxAgents-1)
	start := time.Now()
	if err := e.loadFleet(res.fleet); err != nil {
		return nil, fmt.Errorf("loading %d agents: %w", res.fleet, err)
	}
	res.fleetLoad = time.Since(start)
	if res.memory, err = e.k.MapMemory(); err != nil {
		return nil, err
	}
	res.fleetRun, res.fleetFloor = map[string][]float64{}, map[string][]float64{}
	for range o.rounds {
		if err := e.runRound(o, floorCg, floors, res.fleetRun, res.fleetFloor); err != nil {
			return nil, err
		}
	}
	// Unloading tether (the pins go) takes the fleet with it.
	return res, e.apply(state{})
}

// runRound runs every run case once in the agent (tether's program, into run) and once in the
// floor cgroup (the empty program, into floor).
func (e *env) runRound(o options, floorCg string, floors map[string]*ebpf.Program, run, floor map[string][]float64) error {
	for _, rc := range runCases {
		ns, err := e.hookRun(e.agent, rc, o, func() (uint64, time.Duration, error) {
			st, err := e.k.ProgramStats()
			if err != nil {
				return 0, 0, err
			}
			return st[rc.hook].Runs, st[rc.hook].Time, nil
		})
		if err != nil {
			return err
		}
		run[rc.name] = append(run[rc.name], ns)
		ns, err = e.hookRun(floorCg, rc, o, func() (uint64, time.Duration, error) {
			st, err := floors[rc.hook].Stats()
			if err != nil {
				return 0, 0, err
			}
			return st.RunCount, st.Runtime, nil
		})
		if err != nil {
			return err
		}
		floor[rc.name] = append(floor[rc.name], ns)
	}
	return nil
}

// loadFleet puts n agents into the kernel beside the bench's (slots 1 to n), each with three
// host rules of its own, active, and bound to a cgroup id of its own that no real cgroup has.
func (e *env) loadFleet(n int) error {
	for i := 1; i <= n; i++ {
		slot := dataplane.Slot(i)
		rs := dataplane.RuleSet{Generation: 1}
		for j := range 3 {
			a := 198<<24 | 18<<16 | uint32(i*4+j)
			rs.Egress = append(rs.Egress, dataplane.Egress{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), 32),
				Ports: []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: 443, Hi: 443}}})
		}
		if err := e.k.Install(slot, &rs); err != nil {
			return err
		}
		if err := e.k.SetFlags(slot, dataplane.AgentActive); err != nil {
			return err
		}
		if err := e.k.Bind(1<<40+uint64(i), slot); err != nil {
			return err
		}
	}
	return nil
}

// hookRun runs rc's loop in cgroup and returns the program's time per run over it.
func (e *env) hookRun(cgroup string, rc runCase, o options, read func() (uint64, time.Duration, error)) (float64, error) {
	runs0, t0, err := read()
	if err != nil {
		return 0, err
	}
	if _, err := e.runWorker(cgroup, rc.probe.mode, e.target(rc.probe), o.ops(rc.probe)); err != nil {
		return 0, fmt.Errorf("%s in %s: %w", rc.name, cgroup, err)
	}
	runs1, t1, err := read()
	if err != nil {
		return 0, err
	}
	if runs1 == runs0 {
		return 0, fmt.Errorf("%s in %s: the %s program did not run", rc.name, cgroup, rc.hook)
	}
	return float64(t1-t0) / float64(runs1-runs0), nil
}

// countPaths emulates every path case on the maps of the loaded rule set; a case that does not
// decide as the kernel does is an error.
func (e *env) countPaths() (map[string]kernel.PathCount, error) {
	p, err := e.k.Paths()
	if err != nil {
		return nil, err
	}
	defer p.Close()
	out := map[string]kernel.PathCount{}
	for _, c := range pathCases {
		call := kernel.SockCall{Hook: c.hook, Cgroup: e.agentID, UnderParent: true, Tgid: uint32(os.Getpid()), Proto: c.proto, Dst: c.dst(e)}
		if c.unbound {
			call.Cgroup = e.unboundID
		}
		if c.reuse {
			call.Socket = kernel.NewSocket()
		}
		// The first call fills the per-CPU slot cache (and, for a reused socket, its storage);
		// the common path is the next.
		if _, err := p.Run(call); err != nil {
			return nil, fmt.Errorf("%s: %w", c.name, err)
		}
		got, err := p.Run(call)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", c.name, err)
		}
		if got.Verdict != c.verdict {
			return nil, fmt.Errorf("%s: the emulated program returned %d, want %d", c.name, got.Verdict, c.verdict)
		}
		out[c.name] = got
	}
	return out, nil
}

func reportHotPath(w io.Writer, hp *hotPathResults) {
	fmt.Fprintln(w, "\nHOT PATH: BPF instructions each hook executes (the program as compiled, run in an emulator on the kernel's")
	fmt.Fprintln(w, "maps of the agent; a process's second call: the slot cache filled; production sampling, no allow emitted)")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprint(tw, "PATH")
	for _, n := range hp.rules {
		fmt.Fprintf(tw, "\t%d RULES: INSNS / HELPERS / LOOKUPS", n)
	}
	fmt.Fprintln(tw)
	for _, c := range pathCases {
		fmt.Fprint(tw, c.name)
		for _, n := range hp.rules {
			pc := hp.counts[n][c.name]
			fmt.Fprintf(tw, "\t%d / %d / %d", pc.Insns, pc.Helpers, pc.Lookups)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()

	fmt.Fprintln(w, "\nHOT PATH: run time per program run (kernel BPF statistics), median [25th, 75th percentile] of the rounds; the")
	fmt.Fprintln(w, "baseline is an empty program of the same type (return 1) run by the same loop in the same rounds: what the")
	fmt.Fprintln(w, "kernel and the statistics' clock reads cost before any of tether's instructions")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROGRAM, LOOP\tRULES\tEMPTY PROGRAM (BASELINE)\tTETHER\tTETHER - EMPTY")
	for _, rc := range runCases {
		for _, n := range hp.rules {
			t, f := hp.run[n][rc.name], hp.floor[n][rc.name]
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", rc.name, n, summarize(f).ns(), summarize(t).ns(), paired(t, f, absolute).ns())
		}
		t, f := hp.fleetRun[rc.name], hp.fleetFloor[rc.name]
		fmt.Fprintf(tw, "%s\t%d, %d agents loaded\t%s\t%s\t%s\n", rc.name, slices.Max(hp.rules), hp.fleet+1, summarize(f).ns(), summarize(t).ns(), paired(t, f, absolute).ns())
	}
	tw.Flush()
	fmt.Fprintf(w, "\negress_skb under BPF_PROG_TEST_RUN (the kernel runs it on a packet of a socket no agent connected): %s a run against %s for an empty program, %s [25th, 75th] of the difference\n",
		summarize(hp.skb).ns(), summarize(hp.skbEmpty).ns(), paired(hp.skb, hp.skbEmpty, absolute).ns())
	m := hp.memory
	fmt.Fprintf(w, "\nMAP MEMORY with %d agents (kernel memlock, %d CPUs): %s in all; %s a slot whether used or not (%d slots: %s); the agents' tries %s (%s an agent); tether_hosts %s, lineage %s, cgroup bindings %s\n",
		m.Agents, runtimeCPUs(), mib(m.Total), kib(m.PerSlot), dataplane.MaxAgents, mib(m.PerSlot*dataplane.MaxAgents), mib(m.Maps["rule_set_tries"]), kib(m.PerAgentRules),
		mib(m.Maps["tether_hosts"]), mib(m.Maps["tether_procs"]), mib(m.Maps["tether_cgroups"]))
	fmt.Fprintf(w, "loading %d agents (rule set, state, binding each): %s\n", hp.fleet, hp.fleetLoad.Round(time.Millisecond))
}

// udpPacket is an IPv4 UDP packet (10.0.0.1:40000 to 10.0.0.2:53, 8 bytes of payload) behind the
// 14-byte Ethernet header BPF_PROG_TEST_RUN takes for skb programs.
func udpPacket() []byte {
	p := make([]byte, 14+20+8+8)
	p[12], p[13] = 0x08, 0x00
	ip := p[14:]
	ip[0], ip[3], ip[8], ip[9] = 0x45, byte(len(ip)), 64, 17
	copy(ip[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	udp := ip[20:]
	udp[0], udp[1], udp[3], udp[5] = 0x9c, 0x40, 53, 16
	return p
}

func mib(n uint64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
func kib(n uint64) string { return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10)) }

func hotPathGoals(goal func(bool, string, ...any), hp *hotPathResults) {
	top := slices.Max(hp.rules)
	for _, rc := range runCases {
		if rc.probe == tcpLo {
			continue // the goal is the per-call cost of a connect and a datagram (UDP loops)
		}
		s := summarize(hp.run[top][rc.name])
		goal(s.med <= hotPathGoalNs && s.hi <= hotPathGoalNs, "%s, %d rules: %s per run, 75th percentile %s (goal at most %d ns, both); the empty program %s",
			rc.name, top, dur(s.med), dur(s.hi), hotPathGoalNs, dur(summarize(hp.floor[top][rc.name]).med))
		own := paired(hp.run[top][rc.name], hp.floor[top][rc.name], absolute)
		goal(own.med <= hotPathGoalNs && own.hi <= hotPathGoalNs, "%s, %d rules, tether's own time (less the empty program): %s, 75th percentile %s (goal at most %d ns, both)",
			rc.name, top, dur(own.med), dur(own.hi), hotPathGoalNs)
		fleet := paired(hp.fleetRun[rc.name], hp.fleetFloor[rc.name], absolute)
		bound := max(20, 0.1*own.med)
		goal(fleet.med-own.med <= bound, "%s with %d agents loaded: tether's own time %s against %s with one (goal: unchanged, at most %s more)",
			rc.name, hp.fleet+1, dur(fleet.med), dur(own.med), dur(bound))
	}
}

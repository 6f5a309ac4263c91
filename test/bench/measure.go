package main

import (
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/kernel"
)

// state is what is loaded while a sample runs.
type state struct {
	tether int  // rules of the agent, 0: tether not loaded
	nft    int  // nftables rules, 0: none
	set    bool // the nftables rules are one set
}

func (s state) String() string {
	switch {
	case s.tether > 0:
		return fmt.Sprintf("tether %d rules", s.tether)
	case s.nft > 0 && s.set:
		return fmt.Sprintf("nftables set of %d", s.nft)
	case s.nft > 0:
		return fmt.Sprintf("nftables %d rules", s.nft)
	}
	return "nothing loaded"
}

// probe is one loop a worker runs: up to ops operations, or as many as fit in the sample time.
// Noisy loops take more, shorter samples (repeat times the rounds).
type probe struct {
	name, mode string
	ops        int
	repeat     int
}

var (
	tcpLo   = probe{name: "TCP connect, loopback", mode: "tcp", ops: 4000, repeat: 3}
	tcpVeth = probe{name: "TCP connect, veth peer", mode: "tcpveth", ops: 4000, repeat: 3}
	udpConn = probe{name: "UDP connect", mode: "udpconnect", ops: 300000, repeat: 1}
	udpSend = probe{name: "UDP sendto", mode: "udpsend", ops: 150000, repeat: 1}
	execP   = probe{name: "fork+exec true", mode: "exec", ops: 400, repeat: 1}
	// tcpBulk is one connection's throughput: an op is a 64 KiB write.
	tcpBulk = probe{name: "TCP bulk send, veth peer", mode: "tcpbulk", ops: 200000, repeat: 3}
)

// where a sample runs.
type where int

const (
	inAgent where = iota // the agent cgroup, below the agent parent
	outside              // a cgroup outside the agent parent
)

// part is which comparison a sample belongs to (see measure).
type part int

const (
	partTether part = iota + 1
	partOutside
	partNft
)

type sampleKey struct {
	part part
	s    state
	p    probe
	w    where
}

// hookCost is what the kernel's BPF statistics say of one program.
type hookCost struct {
	runs     uint64
	nsPerRun float64
}

type results struct {
	samples map[sampleKey][]float64 // ns/op, in the order taken
	// bpf[rules][hook] from the statistics phase.
	bpf map[int]map[string]hookCost
	// opa[rules]: ns per evaluation, one per round.
	opa map[int][]float64
	// compile and install time of the agent's rule set, by rules.
	compile, install map[int]time.Duration
	policy           *policyResults
	kill             *killResults
	hotpath          *hotPathResults
	telemetry        *telemetryResults
	sweep            *sweepResults
	dns              *dnsResults
}

func (r *results) add(k sampleKey, ns float64) { r.samples[k] = append(r.samples[k], ns) }

func (o options) ops(p probe) int { return max(1, int(float64(p.ops)*o.scale)) }

func (e *env) target(p probe) string {
	switch p {
	case tcpVeth:
		return e.tcpVeth.String()
	case udpConn, udpSend:
		return e.udpLo.String()
	case execP:
		return e.trueBin
	case tcpBulk:
		return e.tcpBulk.String()
	}
	return e.tcpLo.String()
}

func (e *env) apply(s state) error {
	if s.tether == 0 {
		if err := e.setTether(0); err != nil {
			return err
		}
	}
	if err := e.setNftables(s.nft, s.set); err != nil {
		return err
	}
	return e.setTether(s.tether)
}

func (e *env) sample(res *results, o options, pt part, s state, p probe, w where) error {
	cg := e.agent
	if w == outside {
		cg = e.outside
	}
	mode := p.mode
	if mode == "tcpveth" {
		mode = "tcp"
	}
	ns, err := e.runWorker(cg, mode, e.target(p), o.ops(p))
	if err != nil {
		return fmt.Errorf("%s with %s: %w", p.name, s, err)
	}
	res.add(sampleKey{pt, s, p, w}, ns)
	return nil
}

// measure takes every sample. Three parts, each pairing what it compares as closely in time as
// it can:
//  1. tether's overhead: with tether loaded, the same loop alternately in the agent (hooked) and
//     outside the agent parent (not hooked), round after round;
//  2. that the process outside the agent parent with tether loaded costs what it costs with
//     nothing loaded: tether loaded and unloaded in turn;
//  3. nftables: each rule set, and nothing loaded, in turn.
func measure(e *env, o options) (*results, error) {
	res := &results{samples: map[sampleKey][]float64{}, bpf: map[int]map[string]hookCost{},
		opa: map[int][]float64{}, compile: map[int]time.Duration{}, install: map[int]time.Duration{}}
	if !o.outside {
		if err := measureOverhead(e, o, res); err != nil {
			return nil, err
		}
	}
	if o.hooks {
		progress("kernel BPF statistics")
		if err := bpfCosts(e, o, res); err != nil {
			return nil, err
		}
		progress("hot path: instructions per path, run time against an empty program, %d rounds", o.rounds)
		var err error
		res.hotpath, err = measureHotPath(e, o)
		return res, err
	}
	if err := measureOutside(e, o, res); err != nil {
		return nil, err
	}
	if o.outside {
		return res, e.apply(state{})
	}
	if err := measureNft(e, o, res); err != nil {
		return nil, err
	}
	if err := e.apply(state{}); err != nil {
		return nil, err
	}
	return res, measureParts(e, o, res)
}

// progress says on stderr what the benchmark measures now.
func progress(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

// measureOverhead is part 1: with tether loaded, each probe alternately in the agent and outside
// the agent parent, round after round, for each rule count.
func measureOverhead(e *env, o options, res *results) error {
	top := slices.Max(o.rules)
	for _, n := range o.rules {
		s := state{tether: n}
		if err := e.apply(s); err != nil {
			return err
		}
		res.compile[n], res.install[n] = e.lastCompile, e.lastInstall
		probes := []probe{tcpLo, udpConn}
		if n == top {
			probes = append(probes, tcpVeth, tcpBulk, udpSend, execP)
		}
		progress("tether with %d rules: %d rounds of %d probes, in the agent and outside it", n, o.rounds, len(probes))
		for round := range 3 * o.rounds {
			for _, p := range probes {
				if round >= p.repeat*o.rounds {
					continue
				}
				first, second := inAgent, outside
				if round%2 == 1 {
					first, second = outside, inAgent
				}
				for _, w := range []where{first, second} {
					if err := e.sample(res, o, partTether, s, p, w); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

// measureOutside is part 2: a process outside agents, tether loaded and not, in turn.
func measureOutside(e *env, o options, res *results) error {
	progress("a process outside agents: tether loaded and not, %d rounds", o.rounds)
	for range o.rounds {
		for _, s := range []state{{}, {tether: slices.Max(o.rules)}} {
			if err := e.apply(s); err != nil {
				return err
			}
			for _, p := range []probe{tcpLo, execP} {
				if err := e.sample(res, o, partOutside, s, p, outside); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// measureNft is part 3: nftables, each rule set and none, in turn.
func measureNft(e *env, o options, res *results) error {
	top := slices.Max(o.rules)
	nftStates := []state{{}}
	for _, n := range o.rules {
		nftStates = append(nftStates, state{nft: n})
	}
	nftStates = append(nftStates, state{nft: top, set: true})
	progress("nftables: %d rule sets and none, %d rounds", len(nftStates)-1, o.rounds)
	for range o.rounds {
		for _, s := range nftStates {
			if err := e.apply(s); err != nil {
				return err
			}
			probes := []probe{tcpLo}
			if s.nft == top || s.nft == 0 {
				probes = append(probes, tcpVeth, udpSend)
			}
			for _, p := range probes {
				if err := e.sample(res, o, partNft, s, p, inAgent); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// measureParts measures the rest, part after part: the programs' run time, the hot path, OPA,
// policy to kernel, live sockets, the kill path, telemetry.
func measureParts(e *env, o options, res *results) error {
	progress("kernel BPF statistics")
	if err := bpfCosts(e, o, res); err != nil {
		return err
	}
	progress("hot path: instructions per path, run time against an empty program, %d rounds", o.rounds)
	var err error
	if res.hotpath, err = measureHotPath(e, o); err != nil {
		return fmt.Errorf("hot path: %w", err)
	}
	progress("OPA")
	for _, n := range o.rules {
		for range o.rounds {
			ns, err := opaEval(e, n)
			if err != nil {
				return fmt.Errorf("OPA baseline: %w", err)
			}
			res.opa[n] = append(res.opa[n], ns)
		}
	}
	progress("policy to kernel: context changes with %v grants, a policy change for %d agents", policyGrants, min(max(100, int(fleetSize*o.scale)), dataplane.MaxAgents-1))
	if res.policy, err = measurePolicy(e, o); err != nil {
		return fmt.Errorf("policy to kernel: %w", err)
	}
	progress("live sockets: rule removal to the last of %v sockets terminated", sweepSizes)
	if res.sweep, err = measureSweep(e, o); err != nil {
		return fmt.Errorf("live sockets: %w", err)
	}
	progress("kill path: agents of %v processes and a fork bomb", killSizes)
	if res.kill, err = measureKill(e, o); err != nil {
		return fmt.Errorf("kill path: %w", err)
	}
	progress("telemetry: tetherd's events per second and CPU")
	if res.telemetry, err = measureTelemetry(e, o); err != nil {
		return fmt.Errorf("telemetry: %w", err)
	}
	progress("DNS: an agent's queries through the DNS proxy against straight to the server")
	if res.dns, err = measureDNS(e, o); err != nil {
		return fmt.Errorf("DNS: %w", err)
	}
	return nil
}

// bpfCosts runs one sample of each probe per rule count with the kernel's BPF statistics on, and
// keeps each program's time per run. The statistics add their own clock reads to every run.
func bpfCosts(e *env, o options, res *results) error {
	stats, err := kernel.EnableStats()
	if err != nil {
		return fmt.Errorf("enabling BPF statistics: %w", err)
	}
	defer stats.Close()
	for _, n := range o.rules {
		if err := e.apply(state{tether: n}); err != nil {
			return err
		}
		before, err := e.k.ProgramStats()
		if err != nil {
			return err
		}
		scratch := &results{samples: map[sampleKey][]float64{}}
		for _, p := range []probe{tcpLo, udpConn, udpSend, execP, tcpBulk} {
			if err := e.sample(scratch, o, partTether, state{tether: n}, p, inAgent); err != nil {
				return err
			}
		}
		after, err := e.k.ProgramStats()
		if err != nil {
			return err
		}
		costs := map[string]hookCost{}
		for hook, a := range after {
			b := before[hook]
			if runs := a.Runs - b.Runs; runs > 0 {
				costs[hook] = hookCost{runs: runs, nsPerRun: float64(a.Time-b.Time) / float64(runs)}
			}
		}
		res.bpf[n] = costs
	}
	return e.apply(state{})
}

package main

import (
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
)

// stat is the median and the spread (25th and 75th percentile) of per-round values.
type stat struct{ med, lo, hi float64 }

func summarize(v []float64) stat {
	if len(v) == 0 {
		return stat{math.NaN(), math.NaN(), math.NaN()}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return stat{quantile(s, 0.5), quantile(s, 0.25), quantile(s, 0.75)}
}

// quantile interpolates linearly between the sorted values.
func quantile(sorted []float64, q float64) float64 {
	pos := q * float64(len(sorted)-1)
	i := int(pos)
	if i+1 >= len(sorted) {
		return sorted[len(sorted)-1]
	}
	return sorted[i] + (pos-float64(i))*(sorted[i+1]-sorted[i])
}

// paired compares x with base round by round (the same round ran both, close in time).
func paired(x, base []float64, f func(x, b float64) float64) stat {
	n := min(len(x), len(base))
	v := make([]float64, n)
	for i := range n {
		v[i] = f(x[i], base[i])
	}
	return summarize(v)
}

func relative(x, b float64) float64 { return (x/b - 1) * 100 }
func absolute(x, b float64) float64 { return x - b }

func dur(ns float64) string {
	switch {
	case math.IsNaN(ns):
		return "-"
	case math.Abs(ns) < 1000:
		return fmt.Sprintf("%.0f ns", ns)
	case math.Abs(ns) < 1e6:
		return fmt.Sprintf("%.2f µs", ns/1e3)
	}
	return fmt.Sprintf("%.2f ms", ns/1e6)
}

func (s stat) pct() string {
	return fmt.Sprintf("%+.2f%% [%+.2f, %+.2f]", s.med, s.lo, s.hi)
}

func (s stat) ns() string {
	return fmt.Sprintf("%+.0f ns [%+.0f, %+.0f]", s.med, s.lo, s.hi)
}

type row struct {
	name              string
	base, tether, nft *sampleKey
	abs               bool // overhead in ns rather than percent
	note              string
}

func rows(o options) []row {
	top := slices.Max(o.rules)
	var rs []row
	// tether rows compare the agent with a process outside the agent parent, tether loaded
	// (part 1); nftables rows compare with nothing loaded (part 3).
	tetherRow := func(name string, n int, p probe, abs bool) row {
		return row{name: name, base: &sampleKey{partTether, state{tether: n}, p, outside},
			tether: &sampleKey{partTether, state{tether: n}, p, inAgent}, abs: abs}
	}
	nftKey := func(n int, set bool, p probe) *sampleKey {
		return &sampleKey{partNft, state{nft: n, set: set}, p, inAgent}
	}
	nftBase := func(p probe) *sampleKey { return &sampleKey{partNft, state{}, p, inAgent} }
	for _, n := range o.rules {
		r := tetherRow(fmt.Sprintf("TCP connect, loopback, %d rules", n), n, tcpLo, false)
		r.nft = nftKey(n, false, tcpLo)
		rs = append(rs, r)
	}
	r := tetherRow(fmt.Sprintf("TCP connect, veth peer, %d rules", top), top, tcpVeth, false)
	r.nft = nftKey(top, false, tcpVeth)
	rs = append(rs, r,
		row{name: fmt.Sprintf("TCP connect, loopback, nftables set of %d", top), base: nftBase(tcpLo), nft: nftKey(top, true, tcpLo)},
		row{name: fmt.Sprintf("TCP connect, veth peer, nftables set of %d", top), base: nftBase(tcpVeth), nft: nftKey(top, true, tcpVeth)},
	)
	for _, n := range o.rules {
		rs = append(rs, tetherRow(fmt.Sprintf("UDP connect, %d rules", n), n, udpConn, true))
	}
	rs = append(rs, tetherRow(fmt.Sprintf("TCP bulk send (64 KiB writes), veth peer, %d rules", top), top, tcpBulk, false))
	r = tetherRow(fmt.Sprintf("UDP sendto, %d rules", top), top, udpSend, true)
	r.nft = nftKey(top, false, udpSend)
	rs = append(rs, r,
		row{name: fmt.Sprintf("UDP sendto, nftables set of %d", top), base: nftBase(udpSend), nft: nftKey(top, true, udpSend), abs: true},
		tetherRow(fmt.Sprintf("fork+exec true, %d rules", top), top, execP, false),
		row{name: "TCP connect, process outside agents, tether loaded", base: &sampleKey{partOutside, state{}, tcpLo, outside},
			tether: &sampleKey{partOutside, state{tether: top}, tcpLo, outside}},
		row{name: "fork+exec true, process outside agents, tether loaded", base: &sampleKey{partOutside, state{}, execP, outside},
			tether: &sampleKey{partOutside, state{tether: top}, execP, outside}},
	)
	return rs
}

func report(w io.Writer, e *env, o options, res *results) {
	var u unix.Utsname
	unix.Uname(&u)
	fmt.Fprintf(w, "tether benchmark, %s: Linux %s, %s, %d CPUs; %d rounds (TCP: %d), median [25th, 75th percentile] of the rounds\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 MST"), unix.ByteSliceToString(u.Release[:]), cpuModel(), runtimeCPUs(), o.rounds, 3*o.rounds)

	overhead := reportOverhead(w, o, res)
	reportCosts(w, o, res)
	reportHotPath(w, res.hotpath)

	reportOPA(w, o, res)
	reportPolicy(w, res.policy)
	reportSweep(w, res.sweep)
	reportKill(w, res.kill)
	reportTelemetry(w, res.telemetry)
	reportDNS(w, res.dns)

	reportGoals(w, o, res, overhead)
}

// reportOverhead prints tether's and nftables' overhead per operation and returns them by row
// ("tether NAME", "tether abs NAME", "nft abs NAME").
func reportOverhead(w io.Writer, o options, res *results) map[string]stat {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "Tether's overhead is against the same loop run alternately by a process outside the agent parent")
	fmt.Fprintln(w, "(no cgroup program runs for it; the last two rows show that costs what it costs with nothing loaded);")
	fmt.Fprintln(w, "nftables' against the loop with nothing loaded. Every sample is a separate process.")
	fmt.Fprintln(w)
	fmt.Fprintln(tw, "OPERATION\tBASELINE\tTETHER OVERHEAD\tNFTABLES OVERHEAD\tNFTABLES / TETHER")
	get := func(k *sampleKey) []float64 {
		if k == nil {
			return nil
		}
		return res.samples[*k]
	}
	overhead := map[string]stat{}
	for _, r := range rows(o) {
		base := get(r.base)
		f, show := relative, stat.pct
		if r.abs {
			f, show = absolute, stat.ns
		}
		cells := []string{r.name, dur(summarize(base).med), "-", "-", "-"}
		var tOver, nOver stat
		_ = nOver
		if t := get(r.tether); t != nil {
			tOver = paired(t, base, f)
			cells[2] = show(tOver)
			overhead["tether "+r.name] = tOver
			overhead["tether abs "+r.name] = paired(t, base, absolute)
		}
		if n := get(r.nft); n != nil {
			nb := base
			if r.tether != nil {
				nb = get(&sampleKey{partNft, state{}, r.nft.p, inAgent}) // nothing loaded
			}
			nOver = paired(n, nb, f)
			cells[3] = show(nOver)
			overhead["nft abs "+r.name] = paired(n, nb, absolute)
		}
		if get(r.tether) != nil && get(r.nft) != nil {
			cells[4] = ratio(overhead["nft abs "+r.name].med, overhead["tether abs "+r.name].med)
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	tw.Flush()

	return overhead
}

// reportOPA prints OPA's evaluation of the same rules against tether's decision in the kernel.
func reportOPA(w io.Writer, o options, res *results) {
	fmt.Fprintln(w, "\nPER-REQUEST POLICY IN USERSPACE (OPA, the same rules, one connect decision) vs tether's decision in the kernel")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RULES\tOPA EVAL\tTETHER connect4 RUN\tOPA / TETHER\tCOMPILE + FIRST INSTALL (tether, new tries)")
	for _, n := range o.rules {
		op := summarize(res.opa[n])
		k := res.bpf[n]["connect4"].nsPerRun
		fmt.Fprintf(tw, "%d\t%s [%s, %s]\t%s\t%s\t%s + %s\n", n, dur(op.med), dur(op.lo), dur(op.hi), dur(k), ratio(op.med, k),
			res.compile[n].Round(time.Microsecond), res.install[n].Round(time.Microsecond))
	}
	tw.Flush()

}

// reportGoals prints every goal and whether it is met.
func reportGoals(w io.Writer, o options, res *results, overhead map[string]stat) {
	top := slices.Max(o.rules)
	fmt.Fprintln(w, "\nGOALS")
	goal := goalPrinter(w)
	// within reports whether a measured overhead meets a bound: its median and its 75th
	// percentile both.
	within := func(s stat, bound float64, unit string) (bool, string) {
		note := ""
		if s.hi > bound {
			note = fmt.Sprintf("; the 75th percentile, %+.2f%s, is above it", s.hi, unit)
		}
		return s.med <= bound && s.hi <= bound, note
	}
	for _, name := range []string{fmt.Sprintf("TCP connect, loopback, %d rules", top), fmt.Sprintf("TCP connect, veth peer, %d rules", top)} {
		s := overhead["tether "+name]
		ok, note := within(s, 2, "%")
		goal(ok, "%s: tether overhead %+.2f%% (goal at most 2%%)%s", name, s.med, note)
	}
	udp := overhead[fmt.Sprintf("tether UDP connect, %d rules", top)]
	ok, note := within(udp, 250, " ns")
	goal(ok, "UDP connect, %d rules: tether overhead %+.0f ns (goal at most 250 ns)%s", top, udp.med, note)
	for _, name := range []string{fmt.Sprintf("TCP connect, loopback, %d rules", top), fmt.Sprintf("TCP connect, veth peer, %d rules", top), fmt.Sprintf("UDP sendto, %d rules", top)} {
		t, n := overhead["tether abs "+name].med, overhead["nft abs "+name].med
		goal(n >= 10*math.Max(t, 0) && n > 0, "%s: nftables overhead %s, tether %s: %s less (goal at least 10x)", name, dur(n), dur(t), ratio(n, t))
	}
	bulk := overhead[fmt.Sprintf("tether TCP bulk send (64 KiB writes), veth peer, %d rules", top)]
	ok, note = within(bulk, 2, "%")
	goal(ok, "TCP bulk throughput over the veth pair, in an agent: %+.2f%% time per byte (goal at most 2%% lower throughput)%s", bulk.med, note)
	ex := overhead[fmt.Sprintf("tether fork+exec true, %d rules", top)]
	ok, note = within(ex, 3, "%")
	goal(ok, "fork+exec: tether overhead %+.2f%% (goal at most 3%%)%s", ex.med, note)
	hotPathGoals(goal, res.hotpath)
	for _, name := range outsideRows {
		outsideGoal(goal, name, overhead["tether "+name])
	}
	policyGoals(goal, res.policy)
	sweepGoals(goal, res.sweep)
	killGoals(goal, res.kill)
	telemetryGoals(goal, res.telemetry)
	if res.dns != nil {
		dnsGoals(goal, res.dns)
	}
}

// ratio says how many times a is b, where b may be zero or negative (within noise).
func ratio(a, b float64) string {
	if b <= 0 {
		return "tether within noise"
	}
	return fmt.Sprintf("%.1fx", a/b)
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return "unknown CPU"
}

func runtimeCPUs() int {
	var set unix.CPUSet
	if unix.SchedGetaffinity(0, &set) != nil {
		return 0
	}
	return set.Count()
}

func reportPolicy(w io.Writer, pr *policyResults) {
	fmt.Fprintln(w, "\nPOLICY TO KERNEL (registry -> OPA with the shipped policy -> compile -> kernel maps, as tetherd does it;")
	fmt.Fprintf(w, "a context change returns once the kernel holds the result; one agent's changes %s apart;\n", changeGap)
	fmt.Fprintln(w, "CPU is the time the calling thread ran: a latency far above it is waiting, not work)")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WHAT\tP50\tP99\tMAX\tCPU P50\tCPU P99\tSAMPLES")
	for _, n := range policyGrants {
		for _, c := range []struct {
			what string
			v    []sample
		}{{"step-up approved (one rule added)", pr.approve[n]}, {"task type changed (every rule replaced)", pr.replace[n]}} {
			wall, cpu := walls(c.v), cpus(c.v)
			fmt.Fprintf(tw, "%s -> kernel, %d %s grants\t%s\t%s\t%s\t%s\t%s\t%d\n", c.what, n, pr.grant,
				dur(percentile(wall, 0.5)), dur(percentile(wall, 0.99)), dur(slices.Max(wall)),
				dur(percentile(cpu, 0.5)), dur(percentile(cpu, 0.99)), len(c.v))
		}
	}
	fmt.Fprintf(tw, "policy change: every agent evaluated and installed, %d agents\t%s\t-\t%s\t-\t-\t%d\n", pr.agents,
		dur(percentile(pr.refresh, 0.5)), dur(slices.Max(pr.refresh)), len(pr.refresh))
	fmt.Fprintf(tw, "  registering those agents and starting their tasks (each evaluated and installed twice)\t%s\t-\t-\t-\t-\t1\n", pr.register.Round(time.Millisecond))
	tw.Flush()
}

func policyGoals(goal func(ok bool, format string, args ...any), pr *policyResults) {
	big := slices.Max(policyGrants)
	for _, c := range []struct {
		what string
		v    []sample
	}{{"step-up approved", pr.approve[big]}, {"every rule replaced", pr.replace[big]}} {
		p99, cpu99 := percentile(walls(c.v), 0.99), percentile(cpus(c.v), 0.99)
		note := ""
		if p99 >= 5e6 && cpu99 < 5e6 {
			note = fmt.Sprintf("; its CPU time's p99 is %s: the rest of the tail is waiting", dur(cpu99))
		}
		goal(p99 < 5e6, "context change -> kernel with %d %s grants, %s: p99 %s (goal under 5 ms)%s", big, pr.grant, c.what, dur(p99), note)
	}
	worst := slices.Max(pr.refresh)
	bound := 5e9 * float64(pr.agents) / fleetSize
	goal(worst < bound, "policy change, %d agents evaluated and installed: slowest of %d rounds %s (goal under %s: 5 s for %d)", pr.agents, len(pr.refresh), dur(worst), dur(bound), fleetSize)
}

// goalPrinter prints one goal line.
func goalPrinter(w io.Writer) func(ok bool, format string, args ...any) {
	return func(ok bool, format string, args ...any) {
		mark := "MET    "
		if !ok {
			mark = "NOT MET"
		}
		fmt.Fprintf(w, "  %s  %s\n", mark, fmt.Sprintf(format, args...))
	}
}

// reportCosts is the programs' run time from the kernel's statistics.
func reportCosts(w io.Writer, o options, res *results) {
	fmt.Fprintln(w, "\nIN-KERNEL COST (kernel BPF statistics, time per program run, one sample per rule count)")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprint(tw, "PROGRAM")
	for _, n := range o.rules {
		fmt.Fprintf(tw, "\t%d RULES", n)
	}
	fmt.Fprintln(tw)
	for _, hook := range []string{"connect4", "sendmsg4", "sock_create", "egress_skb", "setsockopt", "exec", "fork", "exit"} {
		fmt.Fprint(tw, hook)
		for _, n := range o.rules {
			c, ok := res.bpf[n][hook]
			if !ok {
				fmt.Fprint(tw, "\t-")
				continue
			}
			fmt.Fprintf(tw, "\t%s (%d runs)", dur(c.nsPerRun), c.runs)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()

}

// reportHooks is the -hooks-only table: tether's rows and the programs' run time.
// outsideRows are the rows of a process outside agents, tether loaded against nothing loaded.
var outsideRows = []string{"TCP connect, process outside agents, tether loaded", "fork+exec true, process outside agents, tether loaded"}

// reportOutside prints the rows of a process outside agents and their goals (bench -outside-only).
func reportOutside(w io.Writer, o options, res *results) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "OPERATION\tBASELINE (NOTHING LOADED)\tTETHER LOADED")
	for _, r := range rows(o) {
		if slices.Contains(outsideRows, r.name) {
			t, base := res.samples[*r.tether], res.samples[*r.base]
			fmt.Fprintf(tw, "%s\t%s\t%s\n", r.name, dur(summarize(base).med), stat.pct(paired(t, base, relative)))
		}
	}
	tw.Flush()
	fmt.Fprintln(w, "\nGOALS")
	goal := goalPrinter(w)
	for _, r := range rows(o) {
		if slices.Contains(outsideRows, r.name) {
			s := paired(res.samples[*r.tether], res.samples[*r.base], relative)
			outsideGoal(goal, r.name, s)
		}
	}
}

// outsideGoal: a process outside agents pays nothing measurable for tether.
func outsideGoal(goal func(bool, string, ...any), name string, s stat) {
	goal(s.lo <= 0 && s.hi >= 0 || math.Abs(s.med) < 1, "%s: %+.2f%% [%+.2f, %+.2f] (goal: within noise: the quartiles include 0, or under 1%%)", name, s.med, s.lo, s.hi)
}

func reportHooks(w io.Writer, o options, res *results) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "OPERATION\tBASELINE (OUTSIDE THE AGENT)\tTETHER OVERHEAD")
	for _, r := range rows(o) {
		if r.tether == nil || r.tether.part != partTether || len(res.samples[*r.tether]) == 0 {
			continue
		}
		t, base := res.samples[*r.tether], res.samples[*r.base]
		f, show := relative, stat.pct
		if r.abs {
			f, show = absolute, stat.ns
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.name, dur(summarize(base).med), show(paired(t, base, f)))
	}
	tw.Flush()
	reportCosts(w, o, res)
	reportHotPath(w, res.hotpath)
	fmt.Fprintln(w, "\nGOALS")
	hotPathGoals(goalPrinter(w), res.hotpath)
}

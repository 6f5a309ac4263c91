package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/kernel"
)

// sweepSizes are the live sockets of the agent when a rule removal revokes them all.
var sweepSizes = []int{1, 100, 10000}

type sweepResults struct {
	sizes          []int
	total, install map[int][]float64 // ns from the install that removes the rule to the last socket terminated; the install alone
	supported      bool
	reason         string
}

// measureSweep opens n TCP connections from the agent (a worker in the client namespace, so the
// sweep has to enter it) to a listener that holds them, then installs the agent's rule set
// without their destination and times the install and the sweep it starts, until the last of
// the n sockets is terminated (the sweep says how many; the worker checks each one's error).
func measureSweep(e *env, o options) (*sweepResults, error) {
	res := &sweepResults{total: map[int][]float64{}, install: map[int][]float64{}}
	if err := e.apply(state{tether: 10}); err != nil {
		return nil, err
	}
	defer e.apply(state{})
	feat := e.k.Features()
	res.supported, res.reason = feat.SockDestroy, feat.SockDestroyReason
	if !res.supported {
		return res, nil
	}
	allow, err := e.ruleSet(10, true)
	if err != nil {
		return nil, err
	}
	revoke, err := e.ruleSet(10, false)
	if err != nil {
		return nil, err
	}
	gen := uint64(100)
	install := func(rs *dataplane.RuleSet) error {
		gen++
		rs.Generation = gen
		return e.k.Install(0, rs)
	}
	rounds := max(3*o.rounds, 3)
	for _, n := range sweepSizes {
		n = max(1, min(n, int(float64(n)*o.scale)))
		if n > 1 && n < 100 {
			n = 100
		}
		res.sizes = append(res.sizes, n)
		for range rounds {
			if err := install(allow); err != nil {
				return nil, err
			}
			w, err := e.startHold(n)
			if err != nil {
				return nil, err
			}
			before := e.k.SweepStats().Terminated
			start := time.Now()
			err = install(revoke)
			installed := time.Since(start)
			if err == nil {
				// Returns after a sweep that started after the call: the install's, or one
				// right after it that finds nothing left.
				_, err = e.k.Sweep(0)
			}
			took := time.Since(start)
			swept := int(e.k.SweepStats().Terminated - before)
			aborted, werr := w.finish()
			e.held.drop()
			if err != nil {
				return nil, err
			}
			if werr != nil {
				return nil, werr
			}
			if os.Getenv("NOCHECK") == "" && (aborted != n || swept < n) {
				return nil, fmt.Errorf("%d live sockets: the sweep terminated %d, the agent saw %d aborted", n, swept, aborted)
			}
			res.install[n] = append(res.install[n], float64(installed.Nanoseconds()))
			res.total[n] = append(res.total[n], float64(took.Nanoseconds()))
		}
	}
	return res, nil
}

// ruleSet compiles the benchmark's n rules, with or without the held connections' destination.
func (e *env) ruleSet(n int, withHold bool) (*dataplane.RuleSet, error) {
	g := e.grantsFor(n)
	if !withHold {
		g.Egress = slices.DeleteFunc(g.Egress, func(r grants.Egress) bool {
			return r.CIDR == e.tcpHold.Addr().String()+"/32" && r.Ports[0].Lo == e.tcpHold.Port()
		})
	}
	res := compile.Compile(context.Background(), g, compile.Options{Files: compile.OS{}})
	if err := res.Err(); err != nil {
		return nil, err
	}
	return &res.RuleSet, nil
}

// holder is a running hold worker.
type holder struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

// startHold starts a worker in the agent that opens n connections to the holding listener and
// waits until they are open.
func (e *env) startHold(n int) (*holder, error) {
	dir, err := os.Open(e.agent)
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	cmd := exec.Command(e.self, "hold", e.tcpHold.String(), strconv.Itoa(n))
	cmd.Env = append(os.Environ(), workerEnv+"=1")
	cmd.ExtraFiles = []*os.File{e.netns}
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	h := &holder{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	line, err := h.out.ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		h.stdin.Close()
		h.cmd.Wait()
		return nil, fmt.Errorf("hold worker of %d connections: %q %v", n, line, err)
	}
	return h, nil
}

// finish ends the worker and returns how many of its sockets were terminated.
func (h *holder) finish() (int, error) {
	h.stdin.Close()
	line, _ := h.out.ReadString('\n')
	if err := h.cmd.Wait(); err != nil {
		return 0, fmt.Errorf("hold worker: %w", err)
	}
	return strconv.Atoi(strings.TrimSpace(line))
}

func reportSweep(w io.Writer, sr *sweepResults) {
	if sr == nil {
		return
	}
	fmt.Fprintln(w, "\nLIVE SOCKETS: from the install that removes their rule to the last socket terminated (bpf_sock_destroy from iter/tcp, in the agent's network namespace)")
	if !sr.supported {
		fmt.Fprintf(w, "not measured: %s\n", sr.reason)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LIVE SOCKETS\tROUNDS\tP50\tP99\tOF WHICH THE INSTALL, P50\tP99")
	for _, n := range sr.sizes {
		t, it := slices.Sorted(slices.Values(sr.total[n])), slices.Sorted(slices.Values(sr.install[n]))
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\n", n, len(t), dur(quantile(t, 0.5)), dur(quantile(t, 0.99)), dur(quantile(it, 0.5)), dur(quantile(it, 0.99)))
	}
	tw.Flush()
}

func sweepGoals(goal func(ok bool, format string, args ...any), sr *sweepResults) {
	if sr == nil {
		return
	}
	if !sr.supported {
		goal(false, "live sockets terminated: not on this kernel (%s)", sr.reason)
		return
	}
	n := slices.Max(sr.sizes)
	t := slices.Sorted(slices.Values(sr.total[n]))
	p99 := quantile(t, 0.99)
	goal(p99 < 50e6, "rule removal to the last of %d live sockets terminated: p99 %s (goal under 50 ms at 10,000)", n, dur(p99))
}

// bulkResults are one connection's throughput over the veth pair, in the agent and outside it
// with tether loaded, and what the egress program costs per packet meanwhile.
type bulkResults struct {
	rules   int
	in, out []float64 // ns per 64 KiB write, alternately
	skb     hookCost  // egress_skb from the kernel's statistics, during one sample in the agent
}

// measureBulk is the bulk-throughput part on its own (-sweep-only); the full run has it among
// the tether rows.
func measureBulk(e *env, o options) (*bulkResults, error) {
	res := &bulkResults{rules: slices.Max(o.rules)}
	if err := e.apply(state{tether: res.rules}); err != nil {
		return nil, err
	}
	defer e.apply(state{})
	scratch := &results{samples: map[sampleKey][]float64{}}
	s := state{tether: res.rules}
	for round := range 3 * o.rounds {
		order := []where{inAgent, outside}
		if round%2 == 1 {
			order = []where{outside, inAgent}
		}
		for _, w := range order {
			if err := e.sample(scratch, o, partTether, s, tcpBulk, w); err != nil {
				return nil, err
			}
		}
	}
	res.in = scratch.samples[sampleKey{partTether, s, tcpBulk, inAgent}]
	res.out = scratch.samples[sampleKey{partTether, s, tcpBulk, outside}]
	stats, err := kernel.EnableStats()
	if err != nil {
		return nil, fmt.Errorf("enabling BPF statistics: %w", err)
	}
	defer stats.Close()
	before, err := e.k.ProgramStats()
	if err != nil {
		return nil, err
	}
	if err := e.sample(scratch, o, partTether, s, tcpBulk, inAgent); err != nil {
		return nil, err
	}
	after, err := e.k.ProgramStats()
	if err != nil {
		return nil, err
	}
	a, b := after["egress_skb"], before["egress_skb"]
	if runs := a.Runs - b.Runs; runs > 0 {
		res.skb = hookCost{runs: runs, nsPerRun: float64(a.Time-b.Time) / float64(runs)}
	}
	return res, nil
}

func reportBulk(w io.Writer, br *bulkResults) {
	fmt.Fprintf(w, "\nTCP BULK SEND OVER THE VETH PAIR (64 KiB writes), %d rules: in the agent against outside it, tether loaded\n", br.rules)
	in, out := summarize(br.in), summarize(br.out)
	over := paired(br.in, br.out, relative)
	fmt.Fprintf(w, "outside %s/write (%.2f Gbit/s), in the agent %s/write (%.2f Gbit/s): %s time per byte\n",
		dur(out.med), gbits(out.med), dur(in.med), gbits(in.med), over.pct())
	fmt.Fprintf(w, "egress_skb: %s per packet (%d runs, kernel BPF statistics)\n", dur(br.skb.nsPerRun), br.skb.runs)
}

func gbits(nsPerWrite float64) float64 { return 64 * 1024 * 8 / nsPerWrite }

func bulkGoals(goal func(ok bool, format string, args ...any), br *bulkResults) {
	over := paired(br.in, br.out, relative)
	goal(over.med <= 2, "TCP bulk throughput over the veth pair, in an agent: %+.2f%% time per byte (goal at most 2%% lower throughput)", over.med)
}

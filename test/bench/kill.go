package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/tether-sh/tether/internal/spiretest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/identity"
	"github.com/tether-sh/tether/pkg/killpath"
)

// killSizes are the process counts of the agents the kill path is measured on.
var killSizes = []int{1, 100, 1000}

// killSettle is the pause between kill rounds (see measureKill).
const killSettle = 200 * time.Millisecond

type killResults struct {
	denied, frozen map[string][]float64 // ns from the kill request, by case
	cases          []string
	spire          []float64 // ns from the kill request to the SPIRE entry deleted
	// freezeAlone: ns from writing cgroup.freeze to frozen for the largest agent's processes
	// in a cgroup of no agent, outside the agent parent, in the same rounds: what the kernel
	// takes to freeze them, the floor of the kill's freeze.
	freezeAlone []float64
	cpu         string // how the bench and the agents shared the CPU (see cpuSplit)
}

type noGrants struct{}

func (noGrants) Grants(context.Context, agents.Context) (grants.Grants, error) {
	return grants.Grants{}, nil
}

// measureKill runs the kill path (tetherd's: registry, kernel, killpath) on agents of 1, 100 and
// 1,000 sleeping processes and on a fork bomb (a shell recursion bounded at 1,023 shells, frozen
// while it forks), and records the time from the kill request to network denied and to every
// process frozen. Each agent is halted afterwards.
func measureKill(e *env, o options) (*killResults, error) {
	res := &killResults{denied: map[string][]float64{}, frozen: map[string][]float64{}}
	newRegistry, closeKernel, err := e.chain("-kill", noGrants{})
	if err != nil {
		return nil, err
	}
	defer closeKernel()
	reg := newRegistry()
	defer reg.Close()
	dir, err := os.MkdirTemp("", "tether-bench-kill")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	killer, err := killpath.New(killpath.Options{Registry: reg, StateFile: filepath.Join(dir, "state.json")})
	if err != nil {
		return nil, err
	}
	split, err := newCPUSplit(filepath.Base(e.base))
	if err != nil {
		return nil, fmt.Errorf("weighting the bench against the agents: %w", err)
	}
	if split != nil {
		defer split.close()
	}
	res.cpu = split.describe()
	type kase struct {
		name  string
		n     int // processes to wait for before the kill (0: the fork bomb, killed after 50 ms)
		shell string
	}
	var cases []kase
	for _, n := range killSizes {
		cases = append(cases, kase{processes(n), n, fmt.Sprintf(`for i in $(seq %d); do sleep 600 & done; exec sleep 600`, n-1)})
	}
	cases = append(cases, kase{"fork bomb (freezes while it forks)", 0, `f() { if [ "$1" -gt 0 ]; then f $(($1-1)) & f $(($1-1)) & fi; sleep 600; wait; }; f 9`})
	rounds := max(3*o.rounds, 10) // p99 of fewer is the worst sample
	for _, c := range cases {
		res.cases = append(res.cases, c.name)
		for r := range rounds {
			cg := filepath.Join(e.parent, fmt.Sprintf("kill-%d-%d", c.n, r))
			if _, err := cgroups.Create(cg); err != nil {
				return nil, err
			}
			denied, frozen, err := killOnce(reg, killer, cg, c.n, split.agentShell(c.shell))
			if err != nil {
				cgroups.Remove(cg, 10*time.Second)
				return nil, fmt.Errorf("%s: %w", c.name, err)
			}
			res.denied[c.name] = append(res.denied[c.name], denied)
			res.frozen[c.name] = append(res.frozen[c.name], frozen)
			if err := cgroups.Remove(cg, 10*time.Second); err != nil {
				return nil, err
			}
			// The kernel frees the round's processes after they are gone from the cgroup
			// (RCU callbacks, outside any cgroup's weight): let that end before the next.
			time.Sleep(killSettle)
			if c.n == slices.Max(killSizes) {
				took, err := freezeAlone(filepath.Join(e.base, fmt.Sprintf("freeze-%d", r)), c.n, split.agentShell(c.shell))
				if err != nil {
					return nil, fmt.Errorf("freezing %d processes of no agent: %w", c.n, err)
				}
				res.freezeAlone = append(res.freezeAlone, took)
			}
		}
	}
	if res.spire, err = measureSPIRERevoke(reg, e, rounds); err != nil {
		return nil, fmt.Errorf("revoking at SPIRE: %w", err)
	}
	return res, nil
}

// measureSPIRERevoke runs a real SPIRE server and agent (internal/spiretest) and measures the
// time from a kill request to the agent's registration entry deleted through the SPIRE Server
// API (the revoke step), one entry per round.
func measureSPIRERevoke(reg *agents.Registry, e *env, rounds int) ([]float64, error) {
	bin, err := spiretest.Binaries(".")
	if err != nil {
		return nil, err
	}
	sp, err := spiretest.Start(bin, "bench.tether", "spiffe://bench.tether/tetherd")
	if err != nil {
		return nil, err
	}
	defer sp.Close()
	server, err := identity.DialSPIREServer(sp.ServerSock)
	if err != nil {
		return nil, err
	}
	defer server.Close()
	dir, err := os.MkdirTemp("", "tether-bench-kill")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	killer, err := killpath.New(killpath.Options{Registry: reg, StateFile: filepath.Join(dir, "state.json"), DeleteEntries: server.DeleteEntries})
	if err != nil {
		return nil, err
	}
	const id = "spiffe://bench.tether/kill-spire"
	var out []float64
	for r := range rounds {
		if _, err := sp.Entry(id, "unix:uid:4242"); err != nil {
			return nil, err
		}
		cg := filepath.Join(e.parent, fmt.Sprintf("kill-spire-%d", r))
		if _, err := cgroups.Create(cg); err != nil {
			return nil, err
		}
		a, err := reg.Register(agents.Registration{SpiffeID: id, Cgroup: cg})
		if err != nil {
			return nil, err
		}
		x, err := killer.Kill(context.Background(), killpath.Request{Slot: a.Slot, Reason: "bench", Requester: "bench"})
		reg.Unregister(a.Slot)
		cgroups.Remove(cg, 10*time.Second)
		if err != nil {
			return nil, err
		}
		for _, s := range x.Steps {
			if s.Name == killpath.StepRevoke {
				if !s.Done || !strings.Contains(s.Detail, "1 SPIRE entries deleted") {
					return nil, fmt.Errorf("revoke step: %+v", s)
				}
				out = append(out, float64(s.Since.Nanoseconds()))
			}
		}
		if left, err := sp.Server("entry", "show", "-spiffeID", id); err != nil || !strings.Contains(left, "Found 0 entries") {
			return nil, fmt.Errorf("entries left after the kill: %v %s", err, left)
		}
		if _, err := killer.Readmit(id); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// freezeAlone starts shell's n processes in a new cgroup at cg (of no agent) and returns the ns
// killpath.Freeze takes to freeze them; the cgroup and its processes go afterwards.
func freezeAlone(cg string, n int, shell string) (float64, error) {
	if _, err := cgroups.Create(cg); err != nil {
		return 0, err
	}
	defer cgroups.Remove(cg, 10*time.Second)
	stop, err := startIn(cg, n, shell)
	if err != nil {
		return 0, err
	}
	defer stop()
	start := time.Now()
	if _, err := killpath.Freeze(cg, 30*time.Second); err != nil {
		return 0, err
	}
	return float64(time.Since(start).Nanoseconds()), nil
}

// startIn starts shell born in cgroup cg and waits until n processes run there (n 0: 50 ms, for
// a fork bomb caught while it forks). stop kills the cgroup's processes and reaps the shell.
func startIn(cg string, n int, shell string) (stop func(), err error) {
	d, err := os.Open(cg)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("sh", "-c", shell)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(d.Fd())}
	err = cmd.Start()
	d.Close()
	if err != nil {
		return nil, err
	}
	stop = func() {
		cgroups.Kill(cg)
		cmd.Wait()
	}
	if n == 0 {
		time.Sleep(50 * time.Millisecond)
		return stop, nil
	}
	for deadline := time.Now().Add(30 * time.Second); len(cgroups.Procs(cg)) < n; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			stop()
			return nil, fmt.Errorf("%d of %d processes started", len(cgroups.Procs(cg)), n)
		}
	}
	return stop, nil
}

func killOnce(reg *agents.Registry, killer *killpath.Killer, cg string, n int, shell string) (float64, float64, error) {
	// Registered once its processes run (an agent granted nothing may not exec sleep); the fork
	// bomb while it forks.
	stop, err := startIn(cg, n, shell)
	if err != nil {
		return 0, 0, err
	}
	defer stop()
	a, err := reg.Register(agents.Registration{SpiffeID: "spiffe://bench.tether/kill", Cgroup: cg})
	if err != nil {
		return 0, 0, err
	}
	defer reg.Unregister(a.Slot)
	x, err := killer.Kill(context.Background(), killpath.Request{Slot: a.Slot, Reason: "bench", Requester: "bench", Terminate: true})
	if err != nil {
		return 0, 0, err
	}
	var denied, frozen float64
	for _, s := range x.Steps {
		if !s.Done {
			return 0, 0, fmt.Errorf("step %s: %s", s.Name, s.Error)
		}
		switch s.Name {
		case killpath.StepDeny:
			denied = float64(s.Since.Nanoseconds())
		case killpath.StepFreeze:
			frozen = float64(s.Since.Nanoseconds())
		}
	}
	if _, err := killer.Readmit("spiffe://bench.tether/kill"); err != nil {
		return 0, 0, err
	}
	return denied, frozen, nil
}

func reportKill(w io.Writer, kr *killResults) {
	fmt.Fprintln(w, "\nKILL PATH (tetherd's: registry -> kernel killed flag -> cgroup.freeze until frozen; time from the kill request;")
	fmt.Fprintf(w, "%s; rounds %v apart, after the last round's processes are gone)\n", kr.cpu, killSettle)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "AGENT\tNETWORK DENIED P50\tP99\tALL FROZEN P50\tP99\tROUNDS")
	for _, c := range kr.cases {
		d, f := kr.denied[c], kr.frozen[c]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\n", c, dur(percentile(d, 0.5)), dur(percentile(d, 0.99)), dur(percentile(f, 0.5)), dur(percentile(f, 0.99)), len(d))
	}
	fmt.Fprintf(tw, "agent with a SPIRE entry: entry deleted at the SPIRE server\t%s\t%s\t-\t-\t%d\n", dur(percentile(kr.spire, 0.5)), dur(percentile(kr.spire, 0.99)), len(kr.spire))
	fmt.Fprintf(tw, "baseline: %d processes of no agent, cgroup.freeze alone\t-\t-\t%s\t%s\t%d\n", slices.Max(killSizes), dur(percentile(kr.freezeAlone, 0.5)), dur(percentile(kr.freezeAlone, 0.99)), len(kr.freezeAlone))
	tw.Flush()
}

// killGoals checks the goals: network denied within 1 ms, frozen p99 under 50 ms at 1,000
// processes (the fork bomb's freeze is in the table: it competes for the CPU with tetherd).
func killGoals(goal func(ok bool, format string, args ...any), kr *killResults) {
	var worst float64
	for _, c := range kr.cases {
		worst = max(worst, slices.Max(kr.denied[c]))
	}
	goal(worst < 1e6, "kill -> network denied, agents of 1 to %d processes and a fork bomb: slowest %s (goal within 1 ms)", slices.Max(killSizes), dur(worst))
	big := processes(slices.Max(killSizes))
	p99 := percentile(kr.frozen[big], 0.99)
	goal(p99 < 50e6, "kill -> all frozen, %s: p99 %s (goal under 50 ms); the kernel's freeze of as many processes of no agent: p99 %s",
		big, dur(p99), dur(percentile(kr.freezeAlone, 0.99)))
	goal(slices.Max(kr.spire) < 1e9, "kill -> SPIRE entry deleted (real SPIRE server): slowest %s (goal within 1 s)", dur(slices.Max(kr.spire)))
}

// processes names an agent of n processes.
func processes(n int) string {
	if n == 1 {
		return "1 process"
	}
	return fmt.Sprintf("%d processes", n)
}

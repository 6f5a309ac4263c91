// Command bench measures tether against what a user would run instead, in one run, and prints
// one table: connect() of an agent process with tether's rules in the kernel against no tether,
// against the same rules as nftables rules, and against a per-request OPA evaluation in
// userspace; fork+exec with and without the exec hook; a process outside agents with tether
// loaded; and the BPF programs' own run time from the kernel's statistics.
//
// Every sample of every configuration is taken in turn, round after round, so that drift of the
// machine hits all of them alike; the table gives the median and the spread (min-max) of the
// rounds. Run it as root: `sudo make bench`. It creates, and removes, a tether-bench-* cgroup, a
// network namespace with a veth pair (all measured traffic and every nftables rule stay in it)
// and a pin directory.
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
)

func main() {
	if os.Getenv(workerEnv) != "" {
		os.Exit(worker(os.Args[1:]))
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type options struct {
	rounds int
	rules  []int
	scale  float64 // multiplies the operations per sample
	policy bool    // only the policy-to-kernel part
	kill   bool    // only the kill path
	telem  bool    // only the telemetry part
	sweep  bool    // only the live-socket part
	hooks  bool    // only tether's rows and the programs' run time
	ranges bool    // the policy part's grants are /24 ranges, not /32 hosts
	launch bool    // only the launch latency of tetherctl run
	// outside: only what a process outside agents pays with tether loaded (the bystander rows)
	outside bool
	hotpath bool // only the hot path: instructions per path and run time against an empty program
	dns     bool // only the DNS part
}

func run() error {
	o, cpuProfile, err := parseFlags()
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("run as root (sudo make bench): it loads BPF programs and creates cgroups and network namespaces")
	}
	e, err := setup()
	if err != nil {
		return err
	}
	defer e.close()
	if cpuProfile != "" {
		f, err := os.Create(cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	return measureAndReport(e, o)
}

// parseFlags reads the command line.
func parseFlags() (options, string, error) {
	var o options
	var rules, cpuProfile string
	flag.IntVar(&o.rounds, "rounds", 7, "samples of every configuration (the table shows their median and spread)")
	flag.StringVar(&rules, "rules", "10,1000,10000", "rule counts to measure")
	flag.Float64Var(&o.scale, "scale", 1, "operations per sample, relative to the default")
	flag.BoolVar(&o.policy, "policy-only", false, "measure only the policy-to-kernel part")
	flag.BoolVar(&o.kill, "kill-only", false, "measure only the kill path")
	flag.BoolVar(&o.telem, "telemetry-only", false, "measure only the telemetry part (tetherd's events per second and CPU)")
	flag.BoolVar(&o.hooks, "hooks-only", false, "measure only tether's overhead rows (in the agent against outside it) and the programs' run time")
	flag.BoolVar(&o.sweep, "sweep-only", false, "measure only the live-socket part (rule removal to the last socket terminated, bulk throughput in and outside the agent)")
	flag.BoolVar(&o.ranges, "grant-ranges", false, "make the policy part's egress grants /24 ranges (kept in the tries) instead of /32 hosts (kept in tether_hosts)")
	flag.BoolVar(&o.launch, "launch-only", false, "measure only the launch latency of tetherctl run -- true with each sandbox profile, against true alone")
	flag.BoolVar(&o.outside, "outside-only", false, "measure only what a process outside agents pays with tether loaded against nothing loaded (TCP connect, fork+exec)")
	flag.BoolVar(&o.hotpath, "hotpath-only", false, "measure only the hot path: the instructions each socket hook executes per path, and its run time against an empty program")
	flag.BoolVar(&o.dns, "dns-only", false, "measure only the DNS part: an agent's queries through tetherd's DNS proxy against straight to the server, and answer to rule installed")
	flag.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the whole run to this file (go tool pprof reads it)")
	flag.Parse()
	for _, r := range strings.Split(rules, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(r))
		if err != nil || n < 1 {
			return o, "", fmt.Errorf("-rules: %q is not a rule count", r)
		}
		o.rules = append(o.rules, n)
	}
	if o.rounds < 1 {
		return o, "", fmt.Errorf("-rounds must be at least 1")
	}
	return o, cpuProfile, nil
}

// measureAndReport measures what o asks for (one part, or the hooks' table) and prints it with
// its goals.
func measureAndReport(e *env, o options) error {
	if o.launch {
		lr, err := measureLaunch(e)
		if err != nil {
			return err
		}
		reportLaunch(os.Stdout, lr)
		return nil
	}
	if done, err := measureOnePart(e, o); done || err != nil {
		return err
	}
	res, err := measure(e, o)
	if err != nil {
		return err
	}
	if o.hooks {
		reportHooks(os.Stdout, o, res)
		return nil
	}
	if o.outside {
		reportOutside(os.Stdout, o, res)
		return nil
	}
	report(os.Stdout, e, o, res)
	return nil
}

// measureOnePart measures and reports the one part o asks for, if it asks for one.
func measureOnePart(e *env, o options) (bool, error) {
	if o.hotpath {
		hp, err := measureHotPath(e, o)
		if err != nil {
			return true, err
		}
		reportHotPath(os.Stdout, hp)
		printGoals(func(g goalFunc) { hotPathGoals(g, hp) })
		return true, nil
	}
	if o.telem {
		tr, err := measureTelemetry(e, o)
		if err != nil {
			return true, err
		}
		reportTelemetry(os.Stdout, tr)
		printGoals(func(g goalFunc) { telemetryGoals(g, tr) })
		return true, nil
	}
	if o.sweep {
		sr, err := measureSweep(e, o)
		if err != nil {
			return true, err
		}
		bulk, err := measureBulk(e, o)
		if err != nil {
			return true, err
		}
		reportSweep(os.Stdout, sr)
		reportBulk(os.Stdout, bulk)
		printGoals(func(g goalFunc) { sweepGoals(g, sr); bulkGoals(g, bulk) })
		return true, nil
	}
	if o.dns {
		dr, err := measureDNS(e, o)
		if err != nil {
			return true, err
		}
		reportDNS(os.Stdout, dr)
		printGoals(func(g goalFunc) { dnsGoals(g, dr) })
		return true, nil
	}
	if o.kill {
		kr, err := measureKill(e, o)
		if err != nil {
			return true, err
		}
		reportKill(os.Stdout, kr)
		printGoals(func(g goalFunc) { killGoals(g, kr) })
		return true, nil
	}
	if o.policy {
		pr, err := measurePolicy(e, o)
		if err != nil {
			return true, err
		}
		reportPolicy(os.Stdout, pr)
		printGoals(func(g goalFunc) { policyGoals(g, pr) })
		return true, nil
	}
	return false, nil
}

// goalFunc says whether a goal is met, and what was measured against it.
type goalFunc = func(ok bool, format string, args ...any)

// printGoals prints a part's goals after its table.
func printGoals(check func(goalFunc)) {
	fmt.Println("\nGOALS")
	check(goalPrinter(os.Stdout))
}

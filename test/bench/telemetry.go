package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/bpffs"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/killpath"
	"github.com/tether-sh/tether/policies"
)

// The telemetry part runs the real tetherd (built next to the bench binary) with the shipped
// policy, a decision log file and metrics, on an agent cgroup of its own, and measures:
//
//   - how many events per second it decodes, attributes, answers with the respond policy and
//     logs: the agent makes telemetryBurst denied connects while tetherd is stopped (SIGSTOP),
//     so they wait in the ring buffer, then tetherd is let go and timed until the log has them
//     all; every deny the kernel counted must be in the log or counted lost (unaccounted: 0);
//   - tetherd's CPU (all its threads, from /proc/PID/task/*/schedstat) while the agent makes
//     10,000 denied connects per second (every one an event), 10,000 allowed ones (one event in
//     bpf.allow_sample, the shipped 100), and while it is idle: the baseline.
const (
	telemetryID    = "spiffe://bench.tether/agent/telemetry"
	telemetryBurst = 200_000
	telemetryRate  = 10_000
	cpuWindow      = 5 * time.Second
)

type telemetryResults struct {
	burst       int       // denies per burst
	drain       []float64 // events per second, each round
	lost        []uint64  // counted lost (ring buffer), each round
	unaccounted []int64   // kernel count - logged - lost, each round
	cpu         map[string][]float64
	cases       []string
	// stormDenied and stormFrozen: ns from the kill request (tetherd's record) to the kernel's
	// killed flag, and to the cgroup frozen, of an agent killed while another makes 10,000
	// denied connects per second (an event each).
	stormDenied, stormFrozen []float64
}

type tetherdProc struct {
	cmd      *exec.Cmd
	dir, pin string
	client   *api.Client
	log      string
	stderr   *os.File
}

func measureTelemetry(e *env, o options) (*telemetryResults, error) {
	bin := filepath.Join(filepath.Dir(e.self), "tetherd")
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("the telemetry part runs tetherd, built next to the bench binary (make bench builds both): %w", err)
	}
	parent := filepath.Join(e.base, "tetherd")
	agent := filepath.Join(parent, "agent")
	if _, err := cgroups.Create(agent); err != nil {
		return nil, err
	}
	t, err := startTetherd(e, bin, parent, tetherdSetup{})
	if err != nil {
		return nil, err
	}
	defer t.stop()
	a, err := t.client.Register(api.RegisterRequest{SpiffeID: telemetryID, Cgroup: agent})
	if err != nil {
		return nil, fmt.Errorf("registering the bench agent: %w", err)
	}
	res := &telemetryResults{cpu: map[string][]float64{}, burst: max(int(float64(telemetryBurst)*o.scale), 10_000)}
	window := max(time.Duration(float64(cpuWindow)*o.scale).Round(time.Second), time.Second)
	denied := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 9).String()
	run := func(mode, target string, ops int, sample time.Duration, rate int) error {
		_, err := e.runWorker(agent, mode, target, ops, sampleEnv+"="+sample.String(), rateEnv+"="+strconv.Itoa(rate))
		return err
	}

	for range o.rounds {
		if err := measureDrain(t, a.Slot, res, run, denied); err != nil {
			return nil, err
		}
		if err := measureDaemonCPU(e, t, res, run, denied, window); err != nil {
			return nil, err
		}
	}
	// The kill path while tetherd handles a storm of denials.
	if err := killDuringStorm(e, t, res, agent, parent, max(3*o.rounds, 21), func(d time.Duration) error {
		return run("udpdeny", denied, telemetryRate*int(d/time.Second), d, telemetryRate)
	}); err != nil {
		return nil, fmt.Errorf("kill during a storm of denials: %w", err)
	}
	// Every deny of every round is in the log or counted lost.
	final, err := t.accounting(a.Slot)
	if err != nil {
		return nil, err
	}
	logged, err := countLogged(t.log)
	if err != nil {
		return nil, err
	}
	res.unaccounted = append(res.unaccounted, int64(final.denies)-int64(logged)-int64(final.lost))
	return res, nil
}

// workerRun runs the bench worker in the agent: mode against target, ops operations, sampling
// allows every sample, at rate operations per second (0: as fast as it can).
type workerRun func(mode, target string, ops int, sample time.Duration, rate int) error

// measureDrain measures the events tetherd decodes and logs per second: a burst of denials
// while tetherd is stopped, then the time it takes to log them all.
func measureDrain(t *tetherdProc, slot dataplane.Slot, res *telemetryResults, run workerRun, denied string) error {
	before, err := t.accounting(slot)
	if err != nil {
		return err
	}
	if err := t.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		return err
	}
	err = run("udpdeny", denied, res.burst, time.Minute, 0)
	t.cmd.Process.Signal(syscall.SIGCONT)
	if err != nil {
		return err
	}
	start := time.Now()
	var after accounting
	for {
		if after, err = t.accounting(slot); err != nil {
			return err
		}
		if after.written-before.written >= after.denies-before.denies-(after.lost-before.lost) {
			break
		}
		if time.Since(start) > time.Minute {
			return fmt.Errorf("tetherd did not log the burst within a minute: before %+v, after %+v", before, after)
		}
		time.Sleep(5 * time.Millisecond)
	}
	took := time.Since(start)
	denies := after.denies - before.denies
	lost := after.lost - before.lost
	res.drain = append(res.drain, float64(denies-lost)/took.Seconds())
	res.lost = append(res.lost, lost)
	if denies != uint64(res.burst) {
		return fmt.Errorf("the kernel counted %d denies of the agent's %d connects", denies, res.burst)
	}
	return nil
}

// measureDaemonCPU measures tetherd's CPU: idle, at 10,000 denied connects/s, at 10,000 allowed
// connects/s.
func measureDaemonCPU(e *env, t *tetherdProc, res *telemetryResults, run workerRun, denied string, window time.Duration) error {
	for _, c := range []struct {
		name, mode, target string
	}{
		{"idle (baseline)", "", ""},
		{"10,000 denied connects/s (an event each)", "udpdeny", denied},
		{"10,000 allowed connects/s (1 event in 100)", "udpconnect", e.udpLo.String()},
	} {
		if len(res.cpu[c.name]) == 0 {
			res.cases = append(res.cases, c.name)
		}
		cpu0, err := processCPU(t.cmd.Process.Pid)
		if err != nil {
			return err
		}
		w0 := time.Now()
		if c.mode == "" {
			time.Sleep(window)
		} else if err := run(c.mode, c.target, telemetryRate*int(window/time.Second), 2*window, telemetryRate); err != nil {
			return err
		}
		cpu1, err := processCPU(t.cmd.Process.Pid)
		if err != nil {
			return err
		}
		res.cpu[c.name] = append(res.cpu[c.name], 100*float64(cpu1-cpu0)/float64(time.Since(w0)))
	}
	return nil
}

// accounting is what tetherd and the kernel say of the agent's denies.
type accounting struct {
	denies  uint64 // the kernel's count for the agent
	lost    uint64 // the ring buffer could not take them
	written uint64 // records handed to the sinks
}

func (t *tetherdProc) accounting(slot dataplane.Slot) (accounting, error) {
	st, err := t.client.Status()
	if err != nil {
		return accounting{}, err
	}
	list, err := t.client.Agents() // with the kernel's counts
	if err != nil {
		return accounting{}, err
	}
	for _, a := range list {
		if a.Slot == slot {
			return accounting{denies: a.Counts[agents.CountKey{Kind: dataplane.KindConnect4, Verdict: dataplane.VerdictDeny}], lost: st.Kernel.RingBufferDrops, written: st.Events.Written}, nil
		}
	}
	return accounting{}, fmt.Errorf("the bench agent (slot %d) is gone", slot)
}

// countLogged counts the bench agent's denied connect records in the decision log.
func countLogged(path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec struct {
			SpiffeID string `json:"spiffe_id"`
			Kind     string `json:"kind"`
			Verdict  string `json:"verdict"`
		}
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			return 0, fmt.Errorf("decision log: %w", err)
		}
		if rec.SpiffeID == telemetryID && rec.Kind == "connect4" && rec.Verdict == "deny" {
			n++
		}
	}
	return n, sc.Err()
}

// processCPU is the CPU time of every thread of pid, in nanoseconds (schedstat's first field).
func processCPU(pid int) (int64, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("threads of tetherd (pid %d): %v", pid, err)
	}
	var sum int64
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread ended
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		sum += n
	}
	return sum, nil
}

// writeBenchPolicy writes the shipped Rego and the bench's data (profiles and identities, more's
// added) to dir/policy and returns that directory.
func writeBenchPolicy(e *env, dir string, more tetherdSetup) (string, error) {
	pol := filepath.Join(dir, "policy")
	rego, _ := fs.Glob(policies.FS, "tether/*.rego")
	os.MkdirAll(filepath.Join(pol, "tether"), 0o755)
	for _, name := range rego {
		if strings.HasSuffix(name, "_test.rego") {
			continue
		}
		b, _ := policies.FS.ReadFile(name)
		if err := os.WriteFile(filepath.Join(pol, name), b, 0o644); err != nil {
			return "", err
		}
	}
	profile := map[string]any{
		"exec":      []string{e.self},
		"egress":    []any{map[string]any{"cidr": "127.0.0.1/32", "ports": []int{int(e.udpLo.Port())}, "protocol": "udp"}},
		"unix":      []any{},
		"high_risk": []string{},
	}
	profiles, identities := map[string]any{"bench": profile}, map[string]any{telemetryID: map[string]any{"task_type": "bench"}}
	maps.Copy(profiles, more.profiles)
	maps.Copy(identities, more.identities)
	data := map[string]any{"tether_settings": map[string]any{
		"networks": map[string]any{"metadata": []string{"169.254.169.254/32"}}, "internal_networks": []string{},
		"git_binary": "/usr/bin/git", "tools": map[string]any{},
		"profiles":   profiles,
		"identities": identities,
		// The agent floods denied connects on purpose: the shipped respond policy would freeze it.
		"respond": map[string]any{"freeze_after_denied_egress": 0},
	}}
	b, _ := json.Marshal(data)
	if err := os.WriteFile(filepath.Join(pol, "data.json"), b, 0o644); err != nil {
		return "", err
	}
	return pol, nil
}

// startTetherd runs tetherd with the shipped policy (its data give the bench agent exec of the
// worker and UDP to the bench's loopback listener), a decision log file and a large ring buffer.
// tetherdSetup adds to what startTetherd gives tetherd: more profiles and identities in the
// policy's data, more configuration.
type tetherdSetup struct {
	profiles, identities map[string]any
	config               string
}

func startTetherd(e *env, bin, parent string, more tetherdSetup) (_ *tetherdProc, err error) {
	dir, err := os.MkdirTemp("", "tether-bench-tetherd")
	if err != nil {
		return nil, err
	}
	t := &tetherdProc{dir: dir, pin: e.pin + "-tetherd", log: filepath.Join(dir, "decisions.jsonl")}
	defer func() {
		if err != nil {
			t.stop()
		}
	}()
	pol, err := writeBenchPolicy(e, dir, more)
	if err != nil {
		return nil, err
	}
	rel, err := filepath.Rel(e.root, parent)
	if err != nil {
		return nil, err
	}
	socket := filepath.Join(dir, "t.sock")
	cfg := fmt.Sprintf(`cgroup:
  agent_parents: [%s]
  launch_parent: %s
bpf:
  pin_dir: %s
  ring_buffer_bytes: %d
api:
  socket: %s
  agent_socket: %s
policy:
  dir: %s
decision_log:
  path: %s
  max_bytes: 0
log:
  level: warn
kill:
  state_file: %s
credentials:
  dir: %s
  key_file: %s
`, rel, rel, t.pin, 512<<20, socket, filepath.Join(dir, "agent.sock"), pol, t.log, filepath.Join(dir, "kill.json"), filepath.Join(dir, "creds"), filepath.Join(dir, "key")) + more.config
	if err := os.WriteFile(filepath.Join(dir, "tetherd.yaml"), []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	if t.stderr, err = os.Create(filepath.Join(dir, "tetherd.log")); err != nil {
		return nil, err
	}
	t.cmd = exec.Command(bin, "--config", filepath.Join(dir, "tetherd.yaml"))
	t.cmd.Stderr, t.cmd.Stdout = t.stderr, io.Discard
	if err := t.cmd.Start(); err != nil {
		return nil, err
	}
	t.client = api.NewClient(socket)
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := t.client.Status(); err == nil {
			return t, nil
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "tetherd.log"))
			return nil, fmt.Errorf("tetherd did not start: %s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends tetherd, removes its pins (its programs go with the last reference) and its files.
func (t *tetherdProc) stop() {
	if t.cmd != nil && t.cmd.Process != nil {
		t.cmd.Process.Signal(syscall.SIGCONT)
		t.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- t.cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.cmd.Process.Kill()
			<-done
		}
	}
	if t.stderr != nil {
		t.stderr.Close()
	}
	if err := bpffs.RemovePins(t.pin); err != nil && !errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintln(os.Stderr, "bench: removing tetherd's pins:", err)
	}
	unix.Unmount(filepath.Join(t.dir, "creds"), unix.MNT_DETACH)
	os.RemoveAll(t.dir)
}

func reportTelemetry(w io.Writer, r *telemetryResults) {
	fmt.Fprintf(w, "\nTELEMETRY: tetherd (shipped policy, respond policy on every deny, decision log file), %d rounds, median [min, max]\n", len(r.drain))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "MEASURE\tVALUE")
	fmt.Fprintf(tw, "events decoded and logged per second (burst of %d denies)\t%s\n", r.burst, spread(r.drain, "%.0f"))
	var lost []float64
	for _, l := range r.lost {
		lost = append(lost, float64(l))
	}
	fmt.Fprintf(tw, "  of them lost (ring buffer full), counted\t%s\n", spread(lost, "%.0f"))
	fmt.Fprintf(tw, "  denies unaccounted (kernel count - logged - lost)\t%d\n", r.unaccounted[0])
	for _, c := range r.cases {
		fmt.Fprintf(tw, "tetherd CPU, %s\t%s %% of one core\n", c, spread(r.cpu[c], "%.2f"))
	}
	fmt.Fprintf(tw, "kill -> network denied (kernel flag), during 10,000 denied connects/s of another agent, p50 / p99 (%d kills)\t%s / %s\n",
		len(r.stormDenied), dur(percentile(r.stormDenied, 0.5)), dur(percentile(r.stormDenied, 0.99)))
	fmt.Fprintf(tw, "kill -> frozen (1 process), same storm, p50 / p99\t%s / %s\n", dur(percentile(r.stormFrozen, 0.5)), dur(percentile(r.stormFrozen, 0.99)))
	tw.Flush()
}

// spread is the median and the range of v.
func spread(v []float64, format string) string {
	return fmt.Sprintf(format+" ["+format+", "+format+"]", percentile(v, 0.5), slices.Min(v), slices.Max(v))
}

func telemetryGoals(goal func(ok bool, format string, args ...any), r *telemetryResults) {
	p99 := percentile(r.stormDenied, 0.99)
	goal(p99 < 1e6, "kill -> network denied during 10,000 denied connects/s: p99 %s of %d kills (goal under 1 ms)", dur(p99), len(r.stormDenied))
	rate := percentile(r.drain, 0.5)
	goal(rate >= 200_000 && r.unaccounted[0] == 0, "events decoded and logged: %.0f/s, %d unaccounted (goal: at least 200,000/s, none unaccounted)", rate, r.unaccounted[0])
	// The goal is for agents' connects as they run (the shipped allow sampling); a storm of
	// denials, every one a record, is in the table beside it, not held to it.
	for _, c := range r.cases {
		if strings.HasPrefix(c, "10,000 allowed") {
			cpu := percentile(r.cpu[c], 0.5)
			goal(cpu < 5, "tetherd CPU at %s: %.2f%% of one core (goal: under 5%%)", c, cpu)
		}
	}
}

// killDuringStorm kills, through tetherd's API, rounds agents of one sleeping process each
// while the storm agent makes 10,000 denied connects per second (storm runs it for a given
// time), and records from each kill's record the time to the kernel's flag and to frozen.
func killDuringStorm(e *env, t *tetherdProc, res *telemetryResults, stormAgent, parent string, rounds int, storm func(time.Duration) error) error {
	const victim = "spiffe://bench.tether/agent/victim"
	stop := make(chan error, 1)
	// Long enough for every round; cut short by killing the worker when done.
	go func() { stop <- storm(time.Duration(rounds)*time.Second + 30*time.Second) }()
	defer func() {
		for _, pid := range cgroups.Procs(stormAgent) {
			syscall.Kill(pid, syscall.SIGKILL) // the storm worker: our child, in our test cgroup
		}
		<-stop
	}()
	time.Sleep(time.Second) // the storm is running
	for r := range rounds {
		cg := filepath.Join(parent, fmt.Sprintf("victim-%d", r))
		if _, err := cgroups.Create(cg); err != nil {
			return err
		}
		d, err := os.Open(cg)
		if err != nil {
			return err
		}
		cmd := exec.Command("sleep", "600")
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(d.Fd())}
		err = cmd.Start()
		d.Close()
		if err != nil {
			return err
		}
		a, err := t.client.Register(api.RegisterRequest{SpiffeID: victim, Cgroup: cg})
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return err
		}
		kills, err := t.client.Kill(api.KillRequest{Slot: &a.Slot, Reason: "bench", Terminate: true})
		cmd.Wait()
		if err != nil {
			return err
		}
		if len(kills) != 1 {
			return fmt.Errorf("kill of slot %d: %d records", a.Slot, len(kills))
		}
		for _, s := range kills[0].Steps {
			switch {
			case !s.Done && (s.Name == killpath.StepDeny || s.Name == killpath.StepFreeze):
				return fmt.Errorf("kill step %s: %s", s.Name, s.Error)
			case s.Name == killpath.StepDeny:
				res.stormDenied = append(res.stormDenied, float64(s.Since))
			case s.Name == killpath.StepFreeze:
				res.stormFrozen = append(res.stormFrozen, float64(s.Since))
			}
		}
		if _, err := t.client.Readmit(victim); err != nil {
			return err
		}
		if err := t.client.Unregister(a.Slot); err != nil {
			return err
		}
		if err := cgroups.Remove(cg, 10*time.Second); err != nil {
			return err
		}
	}
	select {
	case err := <-stop:
		return fmt.Errorf("the storm ended before the kills did: %v", err)
	default:
	}
	return nil
}

package e2e

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/events"
)

const agentID = "spiffe://test.local/agent"

func tcpPort(t *testing.T, h *privtest.Host) (uint16, *counter) {
	t.Helper()
	l := h.ListenTCP(t, h.V4)
	ap := netip.MustParseAddrPort(l.Addr().String())
	return ap.Port(), accept(l)
}

func grantsFor(self string, h *privtest.Host, okPort uint16) profile {
	return profile{
		"egress": []any{map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(okPort)}, "protocol": "tcp"}},
		"exec":   []string{self},
	}
}

// scene is a tetherd whose agent identity may reach one of two listeners on a test host.
type scene struct {
	h                *privtest.Host
	d                *tetherd
	self             string
	ok, no           string // host:port granted, and not
	okPort           uint16
	okCount, noCount *counter
}

func newScene(t *testing.T) *scene {
	s := &scene{h: privtest.NewHost(t)}
	var noPort uint16
	s.okPort, s.okCount = tcpPort(t, s.h)
	noPort, s.noCount = tcpPort(t, s.h)
	s.self = privtest.AgentBinary(t)
	s.d = newTetherd(t, grantsFor(s.self, s.h, s.okPort))
	s.d.start()
	s.ok = netip.AddrPortFrom(s.h.V4, s.okPort).String()
	s.no = netip.AddrPortFrom(s.h.V4, noPort).String()
	return s
}

// TestPrivilegedRunEndToEnd launches agents with tetherctl run against a tetherd on its own
// configuration: allowed and denied connects, a denied exec, the decision log, the API socket
// refused to agents, and cleanup of the agent cgroups.
func TestPrivilegedRunEndToEnd(t *testing.T) {
	s := newScene(t)
	d, self, ok, no, okCount, noCount := s.d, s.self, s.ok, s.no, s.okCount, s.noCount
	out, err := d.agentRun(agentID, "dial", "tcp", ok, "tcp", no, "unix", d.socket).Output()
	if err != nil {
		t.Fatalf("agent: %v\n%s", err, out)
	}
	if got := lines(string(out)); !slices.Equal(got, []string{"ok", "eperm", "eperm"}) {
		t.Errorf("agent verdicts %v, want ok (granted), eperm (not granted), eperm (tetherd's socket)", got)
	}
	if okCount.await(1) != 1 || noCount.get() != 0 {
		t.Errorf("listeners accepted %d (granted) and %d (not granted)", okCount.get(), noCount.get())
	}

	// Outside agents nothing changes: the test process reaches the port the agent may not.
	if got := privtest.Dial(t, "", "tcp", no); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("non-agent dial: %v", got)
	}

	// An exec the grants do not name: the process dies before running (SIGKILL, or EPERM
	// where BPF LSM enforces).
	other := privtest.SelfCopy(t)
	_, stderr, code := d.ctlRaw("run", "--id", agentID, "--", other)
	if code != 128+int(syscall.SIGKILL) && code != 126 && code != 1 {
		t.Errorf("denied exec: exit %d, stderr %q", code, stderr)
	}
	// An identity without grants gets nothing, not even its first exec.
	if _, _, code := d.ctlRaw("run", "--id", "spiffe://test.local/nobody", "--", self); code == 0 {
		t.Error("an identity without grants ran")
	}

	rec := d.decision("connect deny", func(r events.Decision) bool {
		return r.Kind == "connect4" && r.Verdict == "deny" && r.Destination == no
	})
	if rec.SpiffeID != agentID || rec.Binary != self || rec.Reason != "no-rule" || rec.RuleGeneration != 1 || rec.Mode != "enforce" || rec.PolicyRevision == "" {
		t.Errorf("deny record %+v", rec)
	}
	d.decision("exec deny", func(r events.Decision) bool {
		return r.Kind == "exec" && r.Verdict == "deny" && r.Executable == other && r.SpiffeID == agentID
	})
	d.decision("unix deny of tetherd's socket", func(r events.Decision) bool {
		return r.Kind == "connect_unix" && r.SocketPath == d.socket && r.Verdict == "deny"
	})
	d.decision("sampled allow", func(r events.Decision) bool {
		return r.Kind == "connect4" && r.Verdict == "allow" && r.Destination == ok
	})

	if list := d.agents(); len(list) != 0 {
		t.Errorf("agents left after their commands ended: %+v", list)
	}
	entries, _ := os.ReadDir(d.parent)
	for _, e := range entries {
		if e.IsDir() {
			t.Errorf("agent cgroup %s left behind", e.Name())
		}
	}
	st := d.ctl("status")
	for _, want := range []string{"exec mode", "connect4", "cgroup/connect6", "tp_btf/sched_process_exec"} {
		if !strings.Contains(st, want) {
			t.Errorf("status lacks %q:\n%s", want, st)
		}
	}
}

// TestPrivilegedRestartKeepsEnforcement is the crash test: an agent loops on connects to a
// granted and a denied listener while tetherd is killed with SIGKILL and started again. The
// denied listener never accepts; the granted one keeps accepting while no tetherd runs; the new
// tetherd adopts the agent.
func TestPrivilegedRestartKeepsEnforcement(t *testing.T) {
	s := newScene(t)
	d, ok, no, okCount, noCount := s.d, s.ok, s.no, s.okCount, s.noCount
	agent := d.agentRun(agentID, "tcploop", ok, no)
	stdin, _ := agent.StdinPipe()
	stdout, _ := agent.StdoutPipe()
	agent.Stderr = os.Stderr
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the agent's first accepted connect", func() bool { return okCount.get() > 0 })
	before := d.agents()
	if len(before) != 1 {
		t.Fatalf("agents: %+v", before)
	}

	d.kill9()
	down := okCount.get()
	time.Sleep(500 * time.Millisecond)
	if okCount.get() <= down {
		t.Errorf("no granted connect got through while tetherd was down")
	}
	if _, _, code := d.ctlRaw("status"); code == 0 {
		t.Fatal("tetherd still answers after SIGKILL")
	}

	d.start()
	after := d.agents()
	if len(after) != 1 || after[0].Slot != before[0].Slot || after[0].SpiffeID != agentID || after[0].Generation != before[0].Generation+1 {
		t.Errorf("after restart: %+v (before %+v)", after, before)
	}
	time.Sleep(300 * time.Millisecond)

	stdin.Close()
	report, _ := io.ReadAll(stdout)
	if err := agent.Wait(); err != nil {
		t.Errorf("tetherctl run: %v", err)
	}
	t.Logf("agent report:\n%s", report)
	if noCount.get() != 0 {
		t.Fatalf("the denied listener accepted %d connections", noCount.get())
	}
	if !strings.Contains(string(report), no+" ok=0 ") || strings.Contains(string(report), no+" ok=0 eperm=0") {
		t.Errorf("agent report for the denied listener: %s", report)
	}
	if len(d.agents()) != 0 {
		t.Error("the agent was not removed by the restarted tetherd when it ended")
	}
}

// TestPrivilegedReloadModeAndKill drives a long-running agent through configuration reloads (a
// broken one is refused), a mode override and the killed flag.
func TestPrivilegedReloadModeAndKill(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, grantsFor(self, h, okPort))
	d.start()

	sleeper := d.agentRun(agentID, "sleep")
	stdin, _ := sleeper.StdinPipe()
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); sleeper.Wait() }()
	waitFor(t, "the agent", func() bool { return len(d.agents()) == 1 })
	slot := fmt.Sprint(d.agents()[0].Slot)
	// The agent cannot nest cgroups deeper than the hooks look up.
	if n, limited, err := cgroups.MaxDepth(d.agents()[0].Cgroup); err != nil || !limited || n != 16 {
		t.Errorf("agent cgroup.max.depth: %d %v %v", n, limited, err)
	}

	checkRefusedReloads(t, d)
	// A changed policy (the file watch sees it) is evaluated for the agent: generation 2.
	p := grantsFor(self, h, okPort)
	p["egress"] = append(p["egress"].([]any), map[string]any{"cidr": "192.0.2.0/24", "ports": []int{443}, "protocol": "tcp"})
	d.writePolicy(p)
	waitFor(t, "generation 2", func() bool { return d.agents()[0].Generation == 2 })
	// SIGHUP and tetherctl policy reload read it again; unchanged, nothing is installed.
	d.cmd.Process.Signal(syscall.SIGHUP)
	if out := d.ctl("policy", "reload"); !strings.Contains(out, "in force") {
		t.Errorf("policy reload: %q", out)
	}
	if a := d.agents()[0]; a.Generation != 2 {
		t.Errorf("an unchanged policy installed generation %d", a.Generation)
	}

	d.ctl("mode", slot, "audit")
	if a := d.agents()[0]; a.Mode != "audit" || a.ModeOverride != "audit" || a.Generation != 3 {
		t.Errorf("after mode audit: %+v", a)
	}
	d.ctl("mode", agentID, "default")
	if a := d.agents()[0]; a.Mode != "enforce" || a.ModeOverride != "" {
		t.Errorf("after mode default: %+v", a)
	}
	d.ctl("set-killed", slot, "true")
	if a := d.agents()[0]; !a.Killed {
		t.Errorf("after set-killed: %+v", a)
	}
	// The killed agent cannot even spawn: the helper's exec of itself is denied.
	cg := d.agents()[0].Cgroup
	if out, err := privtest.Command(t, cg, "dial", "tcp", netip.AddrPortFrom(h.V4, okPort).String()).Output(); err == nil {
		t.Errorf("a killed agent ran: %q", out)
	}
	d.ctl("set-killed", slot, "false")
	if got := privtest.Dial(t, cg, "tcp", netip.AddrPortFrom(h.V4, okPort).String()); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("after clearing killed: %v", got)
	}
	_, stderr, code := d.ctlRaw("mode", slot, "loud")
	if code == 0 || !strings.Contains(stderr, "want enforce, audit or default") {
		t.Errorf("bad mode: exit %d %q", code, stderr)
	}
}

// checkRefusedReloads: a configuration that does not parse is refused, and so is the file on
// which the YAML decoder panicked (a SIGHUP with it in place ended tetherd), with its line; a
// policy that does not compile is refused with the file and line; none changes generation 1.
func checkRefusedReloads(t *testing.T, d *tetherd) {
	t.Helper()
	os.WriteFile(d.config, []byte("grants: [\n"), 0o600)
	d.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the refusal in tetherd's log", func() bool {
		return strings.Contains(d.stderr.String(), "configuration refused")
	})
	if a := d.agents()[0]; a.Generation != 1 {
		t.Errorf("generation after a refused reload: %d", a.Generation)
	}
	// The file on which the YAML decoder panicked (a SIGHUP with it in place ended tetherd) is
	// refused like any other, with its line; tetherd goes on.
	os.WriteFile(d.config, []byte("cgroup:\n  agent_parents: !00\n"), 0o600)
	d.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the refusal of the file that crashed the decoder", func() bool {
		return strings.Contains(d.stderr.String(), `:2: the YAML tag \"!00\"`)
	})
	if a := d.agents(); len(a) != 1 || a[0].Generation != 1 {
		t.Errorf("tetherd after the file that crashed the decoder: %+v", a)
	}
	d.writeConfig()
	// A policy that does not compile is refused, with the file and line, and changes nothing.
	os.WriteFile(filepath.Join(d.policy, "tether", "broken.rego"), []byte("package tether\n\nx := nosuch(1)\n"), 0o644)
	waitFor(t, "the policy refusal", func() bool {
		return strings.Contains(d.stderr.String(), "broken.rego:3") && strings.Contains(d.stderr.String(), "policy revision refused")
	})
	if a := d.agents()[0]; a.Generation != 1 {
		t.Errorf("generation after a refused policy: %d", a.Generation)
	}
	if !strings.Contains(d.ctl("status"), "1 revisions refused") {
		t.Error("status does not count the refused revision")
	}
	os.Remove(filepath.Join(d.policy, "tether", "broken.rego"))
}

// TestPrivilegedReaper kills tetherctl run itself: tetherd notices when the orphaned agent ends
// and removes it.
func TestPrivilegedReaper(t *testing.T) {
	self := privtest.AgentBinary(t)
	d := newTetherd(t, profile{"exec": []string{self}})
	d.start()
	sleeper := d.agentRun(agentID, "sleep")
	stdin, _ := sleeper.StdinPipe()
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the agent", func() bool { return len(d.agents()) == 1 })
	cg := d.agents()[0].Cgroup
	// Registered is not yet running: the launcher is killed once the agent's own program runs.
	waitFor(t, "the agent's program", func() bool {
		for _, pid := range cgroups.Procs(cg) {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) == filepath.Base(self) {
				return true
			}
		}
		return false
	})
	sleeper.Process.Signal(syscall.SIGKILL)
	for sleeper.ProcessState == nil {
		// Not Wait: it would close stdin, which the agent holds too.
		var ws syscall.WaitStatus
		if _, err := syscall.Wait4(sleeper.Process.Pid, &ws, 0, nil); err == nil {
			break
		}
	}
	time.Sleep(1500 * time.Millisecond) // a reaper sweep with the launcher gone
	if populated, _ := cgroups.Populated(cg); !populated || len(d.agents()) != 1 {
		t.Fatal("the agent did not outlive its launcher")
	}
	stdin.Close() // the agent ends
	waitFor(t, "tetherd to remove the ended agent", func() bool { return len(d.agents()) == 0 })
	if _, err := os.Stat(cg); !os.IsNotExist(err) {
		t.Errorf("agent cgroup %s still exists: %v", cg, err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestPrivilegedRunDropsPrivileges checks the uid tetherctl run picks (--user, a uid of the
// agent's own by default, root only when asked and allowed) and the capabilities it drops.
func TestPrivilegedRunDropsPrivileges(t *testing.T) {
	privtest.Gate(t)
	// The agent runs a copy of the test binary that the unprivileged user can execute.
	agentBin := privtest.SelfCopy(t)
	d := newTetherd(t, profile{"exec": []string{agentBin}})
	d.self = agentBin
	d.start()

	whoami := func(args ...string) ([]string, string, error) {
		cmd := d.ctlCmd(append(append([]string{"run", "--id", agentID}, args...), "--", agentBin)...)
		cmd.Env = append(os.Environ(), "TETHER_TEST_HELPER=whoami")
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		return lines(string(out)), stderr.String(), err
	}
	mustWhoami := func(args ...string) []string {
		got, stderr, err := whoami(args...)
		if err != nil || len(got) < 4 {
			t.Fatalf("run %v: %v %q %s", args, err, got, stderr)
		}
		return got
	}
	capBit := func(hex string, bit uint) bool {
		var v uint64
		fmt.Sscanf(hex, "%x", &v)
		return v&(1<<bit) != 0
	}
	const sysAdmin, netRaw, bpf = 21, 13, 39

	if got := mustWhoami("--user", "nobody"); got[0] != "65534" {
		t.Errorf("--user nobody: %v", got)
	}
	got := mustWhoami()
	if uid, _ := strconv.Atoi(got[0]); uid < 2130706432 || got[1] != got[0] || got[2] != "0000000000000000" {
		t.Errorf("default: uid %s gid %s bounding set %s, want a uid of confinement.uids and no capabilities", got[0], got[1], got[2])
	}
	// tetherctl does not stop for SIGINT, but COMMAND must: it may not inherit it ignored.
	if capBit(got[3], uint(syscall.SIGINT)-1) || capBit(got[3], uint(syscall.SIGQUIT)-1) {
		t.Errorf("the agent ignores SIGINT or SIGQUIT: SigIgn %s", got[3])
	}
	// Root needs --allow-root and a launch rule with root: true; --keep-caps one with unconfined.
	if _, stderr, err := whoami("--allow-root"); err == nil || !strings.Contains(stderr, "root: true") {
		t.Errorf("--allow-root without a launch rule: %v %s", err, stderr)
	}
	d.extra = "launch:\n  - ids: [" + agentID + "]\n    uids: [0]\n    root: true\n"
	d.writeConfig()
	d.stop()
	d.start()
	got, stderr, err := whoami("--allow-root")
	if err != nil || got[0] != "0" || capBit(got[2], sysAdmin) || capBit(got[2], netRaw) || capBit(got[2], bpf) {
		t.Errorf("root agent: %v uid %v, bounding set %v still holds SYS_ADMIN, NET_RAW or BPF", err, got, stderr)
	}
	if !strings.Contains(stderr, "root can still") {
		t.Errorf("--allow-root does not say what root can still do: %s", stderr)
	}
	if _, stderr, err := whoami("--allow-root", "--keep-caps"); err == nil || !strings.Contains(stderr, "unconfined: true") {
		t.Errorf("--keep-caps without an unconfined launch rule: %v %s", err, stderr)
	}
	d.extra = "launch:\n  - ids: [" + agentID + "]\n    uids: [0]\n    root: true\n    unconfined: true\n"
	d.writeConfig()
	d.stop()
	d.start()
	got = mustWhoami("--allow-root", "--keep-caps")
	if !capBit(got[2], sysAdmin) || !capBit(got[2], netRaw) {
		t.Errorf("--keep-caps: bounding set %s", got[2])
	}
}

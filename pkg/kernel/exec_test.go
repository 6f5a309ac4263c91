package kernel

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

func killedBySignal(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// execDenied reports whether starting a command failed the way a denied exec fails: SIGKILL
// (signal mode) or EPERM from execve (LSM mode).
func execDenied(err error) bool {
	return killedBySignal(err) || errors.Is(err, syscall.EPERM)
}

// execResult runs the exec helper in the agent: "ran" when the target ran, "eperm" when exec
// failed with EPERM (LSM mode), "killed" when the process was SIGKILLed (signal mode).
func execResult(t *testing.T, cgroup string, argv ...string) string {
	t.Helper()
	out, err := privtest.Command(t, cgroup, "exec", argv...).Output()
	switch {
	case killedBySignal(err):
		return "killed"
	case err != nil:
		t.Fatalf("exec helper %v: %v (output %q)", argv, err, out)
	}
	if s := strings.TrimSpace(string(out)); s != "" {
		return s
	}
	return "ran"
}

func (f *fixture) denied() string {
	if f.k.Features().ExecMode == ExecLSM {
		return "eperm"
	}
	return "killed"
}

// TestPrivilegedExec checks that an agent may exec only what its rule set allows, in nested
// cgroups too, and that the global exec program leaves other processes alone.
func TestPrivilegedExec(t *testing.T) {
	f := newFixture(t, Options{})
	// Two copies of the test binary: one granted, one not. (No file of the host is needed, so
	// the test runs the same in a minimal guest.)
	trueBin, falseBin := privtest.SelfCopy(t), privtest.SelfCopy(t)
	agent := f.agent(t, "agent", 10, dataplane.RuleSet{Exec: execs(fileID(t, trueBin))})
	nested, _ := privtest.SubCgroup(t, agent, "child")
	events := f.events(t)

	if got := execResult(t, agent, trueBin); got != "ran" {
		t.Errorf("allowed exec: %s", got)
	}
	if got := execResult(t, agent, falseBin); got != f.denied() {
		t.Errorf("denied exec: %s, want %s", got, f.denied())
	}
	if got := execResult(t, nested, falseBin); got != f.denied() {
		t.Errorf("denied exec in a child cgroup: %s, want %s", got, f.denied())
	}
	e := events.wait(t, "exec deny event", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindExec && e.Verdict == dataplane.VerdictDeny && e.Slot == 10
	})
	if e.Binary != fileID(t, falseBin) || e.Target != falseBin {
		t.Errorf("exec event names %+v %q, want %s", e.Binary, e.Target, falseBin)
	}

	// Outside agents the same exec runs: it exits with status 1 instead of being killed.
	outside := privtest.Cgroup(t)
	cmd := privtest.Command(t, outside, "exec", falseBin, "1")
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Errorf("exec outside agents: %v, want exit status 1", err)
	}
}

// TestPrivilegedExecAudit checks audit mode for exec: the exec runs and a would-deny is reported.
func TestPrivilegedExecAudit(t *testing.T) {
	f := newFixture(t, Options{})
	trueBin := privtest.SelfCopy(t)
	agent := f.agent(t, "agent", 11, dataplane.RuleSet{Mode: dataplane.ModeAudit})
	events := f.events(t)
	if got := execResult(t, agent, trueBin); got != "ran" {
		t.Errorf("audit exec: %s", got)
	}
	events.wait(t, "exec audit event", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindExec && e.Verdict == dataplane.VerdictAudit && e.Slot == 11
	})
}

// TestPrivilegedLineage checks that events name the calling binary and its parent chain.
func TestPrivilegedLineage(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p := port(t, h.ListenTCP(t, h.V4).Addr())
	agent := f.agent(t, "agent", 12, dataplane.RuleSet{})
	events := f.events(t)
	out := privtest.Run(t, agent, "spawn", "dial", "tcp", hostPort(h.V4, p))
	expect(t, "child dial", out, []string{"eperm"})
	e := events.wait(t, "deny from the spawned child", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindConnect4 && e.Slot == 12
	})
	if len(e.Chain) < 1 || e.Chain[0].Binary != f.self {
		t.Fatalf("chain %+v: want the spawning helper (the test binary) as parent", e.Chain)
	}
	if want := privtest.AgentBinary(t); e.BinaryPath != want {
		t.Errorf("binary path %q: want the helper binary %s", e.BinaryPath, want)
	}
}

// TestPrivilegedExecScript shows the difference between the exec modes for a script: under BPF
// LSM both the script and its interpreter must be granted (bprm_check_security sees each); in
// signal mode the file that finally runs, the interpreter, decides.
func TestPrivilegedExecScript(t *testing.T) {
	f := newFixture(t, Options{})
	interp := privtest.SelfCopy(t)
	script := filepath.Join(filepath.Dir(interp), "script")
	if err := os.WriteFile(script, []byte("#!"+interp+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	agent := f.agent(t, "agent", 16, dataplane.RuleSet{Exec: execs(fileID(t, interp))})
	want := "ran"
	if f.k.Features().ExecMode == ExecLSM {
		want = "eperm"
	}
	if got := execResult(t, agent, script); got != want {
		t.Errorf("script with a granted interpreter in %s mode: %s, want %s", f.k.Features().ExecMode, got, want)
	}
	both := f.agent(t, "both", 17, dataplane.RuleSet{Exec: execs(fileID(t, interp), fileID(t, script))})
	if got := execResult(t, both, script); got != "ran" {
		t.Errorf("script and interpreter granted: %s", got)
	}
}

// TestPrivilegedExecHeldUntilRootResolved: in a pod agent (AgentContainers) an exec no rule
// allows, in a container cgroup whose root tetherd has not resolved the rules in, is stopped
// (SIGSTOP), in either exec mode, and reported with reason unresolved-root; once tetherd records
// the root (SetRoot) the kernel decides the container's execs by the rules again. The negative
// control, the same agent without the flag, denies at once.
func TestPrivilegedExecHeldUntilRootResolved(t *testing.T) {
	f := newFixture(t, Options{})
	granted, other := privtest.SelfCopy(t), privtest.SelfCopy(t)
	agent := f.agent(t, "pod", 18, dataplane.RuleSet{Exec: execs(fileID(t, granted))})
	ctr, ctrID := privtest.SubCgroup(t, agent, "ctr")
	events := f.events(t)

	if got := execResult(t, ctr, other); got != f.denied() {
		t.Fatalf("negative control, no AgentContainers: %s, want %s", got, f.denied())
	}
	if err := f.k.SetFlags(18, dataplane.AgentActive|dataplane.AgentContainers); err != nil {
		t.Fatal(err)
	}
	if got := execResult(t, ctr, granted); got != "ran" {
		t.Errorf("granted exec in an unresolved container: %s, want ran (only what no rule allows is held)", got)
	}
	cmd := privtest.Command(t, ctr, "exec", other, "7")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitStopped(t, cmd.Process.Pid)
	e := events.wait(t, "unresolved-root event", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindExec && e.Reason == dataplane.ReasonUnresolvedRoot && e.Slot == 18
	})
	if e.CgroupID != ctrID || e.PID != uint32(cmd.Process.Pid) || e.Binary != fileID(t, other) || e.Verdict != dataplane.VerdictDeny {
		t.Errorf("event %+v: want cgroup %d, pid %d, binary %v, verdict deny", e, ctrID, cmd.Process.Pid, fileID(t, other))
	}

	// tetherd's part, by hand: the root is resolved, and the held exec let go.
	if err := f.k.SetRoot(ctrID, Root{Slot: 18, Dir: dataplane.FileID{Dev: 1, Ino: 2}}); err != nil {
		t.Fatal(err)
	}
	if roots, err := f.k.Roots(); err != nil || roots[ctrID] != (Root{Slot: 18, Dir: dataplane.FileID{Dev: 1, Ino: 2}}) {
		t.Errorf("Roots: %v, %v", roots, err)
	}
	cmd.Process.Signal(syscall.SIGCONT)
	var ee *exec.ExitError
	if err := cmd.Wait(); !errors.As(err, &ee) || ee.ExitCode() != 7 {
		t.Errorf("held exec continued: %v, want exit status 7", err)
	}
	if got := execResult(t, ctr, other); got != f.denied() {
		t.Errorf("exec in a resolved container: %s, want %s", got, f.denied())
	}
	// A container gone: its record goes.
	if err := f.k.ForgetRoot(ctrID); err != nil {
		t.Fatal(err)
	}
	if roots, _ := f.k.Roots(); len(roots) != 0 {
		t.Errorf("Roots after ForgetRoot: %v", roots)
	}
}

// waitStopped waits until process pid is stopped (state T).
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatalf("process %d: %v", pid, err)
		}
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && len(b) > i+2 && b[i+2] == 'T' {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("process %d was not stopped", pid)
}

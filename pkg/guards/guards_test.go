package guards

import (
	"os/exec"
	"syscall"
	"testing"

	"github.com/tether-sh/tether/pkg/cgroups"
)

// TestKillMoved kills a process that is where the record says it went, and leaves one that is
// not (another process under a reused PID, or moved again).
func TestKillMoved(t *testing.T) {
	start := func() *exec.Cmd {
		cmd := exec.Command("sleep", "30")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	cmd := start()
	where, err := cgroups.PathOf(cmd.Process.Pid)
	if err != nil {
		t.Skipf("no cgroup2 membership here: %v", err)
	}
	if err := killMoved(cmd.Process.Pid, where+"/elsewhere"); err == nil {
		t.Error("a process not in the recorded cgroup: no error")
	}
	if err := killMoved(cmd.Process.Pid, where); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Errorf("process ended with %v, want SIGKILL", err)
	}
}

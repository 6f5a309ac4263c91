package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/stepup"
)

// inAgent runs tetherctl with args in the agent cgroup cg, as a process of the agent.
func (d *tetherd) inAgent(cg string, args ...string) (string, string, int) {
	d.t.Helper()
	dir, err := os.Open(cg)
	if err != nil {
		d.t.Fatal(err)
	}
	defer dir.Close()
	cmd := exec.Command(filepath.Join(d.bin, "tetherctl"), args...)
	cmd.Env = append(os.Environ(), "TETHER_AGENT_SOCKET="+filepath.Join(d.dir, "agent.sock"))
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		d.t.Fatalf("tetherctl %v in the agent: %v", args, err)
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// TestPrivilegedStepupFlow: an agent asks for production access on the agent socket (it is who
// its cgroup says); the request waits for an admin; the agent cannot reach the admin socket to
// approve itself, even as root (the kernel refuses the connect); an admin approves it once for
// one use; the kernel allows one connect and denies the next; replaying the approval, an
// unknown request and a request the kernel cannot enforce are refused with why; every step is
// in the decision log with the approver.
func TestPrivilegedStepupFlow(t *testing.T) {
	h := privtest.NewHost(t)
	base, _ := tcpPort(t, h)
	prod, _ := tcpPort(t, h)
	at := func(p uint16) string { return netip.AddrPortFrom(h.V4, p).String() }
	self := privtest.AgentBinary(t)
	d := newTetherd(t, profile{})
	p := grantsFor(self, h, base)
	p["exec"] = []string{self, filepath.Join(d.bin, "tetherctl")}
	p["network_egress"] = []any{map[string]any{"network": "prodnet", "ports": []int{int(prod)}, "protocol": "tcp", "production": true}}
	data := policyData(p)
	data["tether_settings"].(map[string]any)["networks"].(map[string]any)["prodnet"] = []string{h.V4.String() + "/32"}
	b, _ := json.MarshalIndent(data, "", "  ")
	os.WriteFile(filepath.Join(d.policy, "data.json"), b, 0o644)
	d.extra = "env:\n  environment: production\n"
	d.writeConfig()
	d.start()
	cg := d.sleeper()
	d.ctl("task", "start", agentID, "--type", "e2e", "--sensitivity", "internal", "--ttl", "10m")
	dial := func(targets ...uint16) []string {
		var args []string
		for _, p := range targets {
			args = append(args, "tcp", at(p))
		}
		return privtest.Dial(t, cg, args...)
	}
	if got := dial(base, prod); !slices.Equal(got, []string{"ok", "eperm"}) {
		t.Fatalf("before the step-up: %v", got)
	}

	// The agent asks; the request waits for an admin.
	out, stderr, code := d.inAgent(cg, "stepup", "request", "--resource", "prodnet", "--reason", "incident 42", "-o", "json")
	var req stepup.Request
	if code != 0 || json.Unmarshal([]byte(out), &req) != nil || req.State != stepup.Pending || req.SpiffeID != agentID {
		t.Fatalf("step-up request: exit %d %q %q", code, out, stderr)
	}
	checkStepupsRefused(t, d, cg, req)
	if got := dial(prod); !slices.Equal(got, []string{"eperm"}) {
		t.Fatalf("after the refused self-approval: %v", got)
	}

	// The admin sees it (only the pending one: the refused ones never waited) and approves it
	// once, for one use.
	if out := d.ctl("approvals"); !strings.Contains(out, req.ID) || !strings.Contains(out, "pending") || strings.Count(out, "\n") != 1 {
		t.Errorf("approvals: %q", out)
	}
	if out := d.ctl("approve", req.ID, "--uses", "1"); !strings.Contains(out, "approved") {
		t.Errorf("approve: %q", out)
	}
	if got := dial(prod, prod, base); !slices.Equal(got, []string{"ok", "eperm", "ok"}) {
		t.Fatalf("with the approval for one use: %v", got)
	}
	// Replaying the approval, or approving what does not exist, is refused and changes nothing.
	if _, stderr, code := d.ctlRaw("approve", req.ID, "--uses", "5"); code == 0 || !strings.Contains(stderr, "already decided") {
		t.Errorf("replayed approval: exit %d %q", code, stderr)
	}
	if _, stderr, code := d.ctlRaw("approve", "req-0000000000000000"); code == 0 || !strings.Contains(stderr, "no such step-up request") {
		t.Errorf("unknown request: exit %d %q", code, stderr)
	}
	if got := dial(prod); !slices.Equal(got, []string{"eperm"}) {
		t.Fatalf("after the refused replay: %v", got)
	}
	if out, _, _ := d.inAgent(cg, "stepup", "list"); !strings.Contains(out, "approved") || !strings.Contains(out, "uid:0") {
		t.Errorf("the agent's view of its requests: %q", out)
	}
	// Used up, the approval stays listed until it expires (its connection lives as long).
	if a := d.agents()[0]; a.Task == nil || len(a.Task.Approvals) != 1 || a.Task.Approvals[0].UsesLeft == nil || *a.Task.Approvals[0].UsesLeft != 0 {
		t.Errorf("the used-up approval: %+v, want it listed with no uses left", a.Task)
	}
	checkDeniedAndEnded(t, d, cg, func() []string { return dial(prod) })
	checkStepupRecords(t, d, req)
}

// checkStepupsRefused: what the policy refuses is refused with its reason and nothing waits;
// what the kernel cannot enforce is refused with why; the agent cannot reach the admin socket to
// approve req itself; a process outside agents is refused on the agent socket.
func checkStepupsRefused(t *testing.T, d *tetherd, cg string, req stepup.Request) {
	t.Helper()
	if _, stderr, code := d.inAgent(cg, "stepup", "request", "--resource", "nosuchnet"); code == 0 || !strings.Contains(stderr, "no rule allows this request") {
		t.Errorf("a step-up the policy refuses: exit %d %q", code, stderr)
	}
	// What the kernel cannot enforce is refused, with why.
	if _, stderr, code := d.inAgent(cg, "stepup", "request", "--action", "read-secret", "--resource", "db"); code == 0 || !strings.Contains(stderr, "connect only") {
		t.Errorf("a read-secret step-up: exit %d %q", code, stderr)
	}
	// The agent cannot reach the admin socket, even as root: the kernel refuses the connect.
	if _, stderr, code := d.inAgent(cg, "--socket", d.socket, "approve", req.ID, "--uses", "100"); code == 0 || !strings.Contains(stderr, "operation not permitted") {
		t.Fatalf("the agent approving itself: exit %d %q", code, stderr)
	}
	// A process outside agents is refused on the agent socket.
	if _, stderr, code := d.ctlRaw("stepup", "request", "--resource", "prodnet", "--agent-socket", filepath.Join(d.dir, "agent.sock")); code == 0 || !strings.Contains(stderr, "only processes inside an agent") {
		t.Errorf("a step-up from outside agents: exit %d %q", code, stderr)
	}
}

// checkDeniedAndEnded: a denied request stays denied and the agent sees why; a request is bound to
// its task: once the task ends, it cannot be approved. dialProd dials the production port.
func checkDeniedAndEnded(t *testing.T, d *tetherd, cg string, dialProd func() []string) {
	t.Helper()
	out, _, _ := d.inAgent(cg, "stepup", "request", "--resource", "prodnet", "-o", "json")
	var denied stepup.Request
	if err := json.Unmarshal([]byte(out), &denied); err != nil || denied.State != stepup.Pending {
		t.Fatalf("request to deny: %q", out)
	}
	if out := d.ctl("deny", denied.ID, "--why", "not during the freeze"); !strings.Contains(out, "denied") {
		t.Errorf("deny: %q", out)
	}
	if _, stderr, code := d.ctlRaw("approve", denied.ID); code == 0 || !strings.Contains(stderr, "already decided") {
		t.Errorf("approving a denied request: exit %d %q", code, stderr)
	}
	if got := dialProd(); !slices.Equal(got, []string{"eperm"}) {
		t.Fatalf("after the denial: %v", got)
	}
	// A request is bound to its task: once the task ends, it cannot be approved.
	out, _, _ = d.inAgent(cg, "stepup", "request", "--resource", "prodnet", "-o", "json")
	var again stepup.Request
	if err := json.Unmarshal([]byte(out), &again); err != nil || again.State != stepup.Pending {
		t.Fatalf("second request: %q", out)
	}
	d.ctl("task", "end", agentID)
	if _, stderr, code := d.ctlRaw("approve", again.ID); code == 0 || !strings.Contains(stderr, "has ended") {
		t.Errorf("approving for an ended task: exit %d %q", code, stderr)
	}
}

// checkStepupRecords: request req's steps (pending, approved) are in the decision log, the
// approval with who decided, its uses and the approval it made.
func checkStepupRecords(t *testing.T, d *tetherd, req stepup.Request) {
	t.Helper()
	for _, state := range []events.Verdict{events.VerdictPending, "approved"} {
		rec := d.decision("the step-up "+string(state), func(r events.Decision) bool {
			return r.Kind == "stepup" && r.Verdict == state && r.Stepup != nil && r.Stepup.RequestID == req.ID
		})
		if state == "approved" && (rec.Stepup.DecidedBy != "uid:0" || rec.Stepup.Uses != 1 || rec.Stepup.ApprovalID == "") {
			t.Errorf("approval record: %+v", rec.Stepup)
		}
	}
}

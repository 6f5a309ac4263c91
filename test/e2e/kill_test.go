package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/escalation"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/killpath"
)

// TestPrivilegedKill: tetherctl kill stops an agent that loops on connects: deny, freeze and
// revoke are done, each timed; the agent is frozen; a process outside it keeps running; a new
// agent with the same SPIFFE ID is denied; resume thaws it and every connect is then denied;
// killing again with --terminate halts it; readmit lets the identity run again.
func TestPrivilegedKill(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	p := grantsFor(self, h, okPort)
	p["egress"] = []any{map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(okPort)}}} // tcp and udp: the loop connects UDP sockets
	d := newTetherd(t, p)
	rcv, alerts := escalationReceiver(t)
	defer rcv.Close()
	d.extra = fmt.Sprintf("telemetry:\n  escalation_webhook: %s\n", rcv.URL)
	d.writeConfig()
	d.start()
	ok := fmt.Sprintf("%s:%d", h.V4, okPort)

	// Outside the agent: a process in a cgroup of the test's own, not below the agent parent.
	sibling := privtest.Cgroup(t)
	sib := privtest.Command(t, sibling, "sleep")
	sibIn, _ := sib.StdinPipe()
	if err := sib.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sibIn.Close(); sib.Wait() })

	run := d.agentRun(agentID, "loop", ok)
	stdin, _ := run.StdinPipe()
	stdout, _ := run.StdoutPipe()
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); run.Process.Kill(); run.Wait() })
	await := agentPrints(t, stdout)
	await("0 ok")
	a := d.agentAt(d.agents()[0].Cgroup)

	checkKilled(t, d, a, sibling, sib, alerts)

	// The same identity in a new cgroup: everything denied, its first exec included.
	if _, _, code := d.ctlRaw("run", "--id", agentID, "--", self); code == 0 {
		t.Error("a new agent with the killed SPIFFE ID ran")
	}
	var st struct {
		Denied []killpath.Denied `json:"denied"`
	}
	json.Unmarshal([]byte(d.ctl("kills")), &st)
	if len(st.Denied) != 1 || st.Denied[0].SpiffeID != agentID {
		t.Errorf("deny list %+v", st.Denied)
	}

	// Thawed for investigation: it runs again, and every connect is denied.
	d.ctl("resume", fmt.Sprint(a.Slot))
	await("0 eperm")

	// Killing again is harmless, and --terminate halts it.
	var kills []killpath.Kill
	if err := json.Unmarshal([]byte(d.ctl("kill", fmt.Sprint(a.Slot), "--reason", "e2e: stop it", "--terminate", "-o", "json")), &kills); err != nil {
		t.Fatal(err)
	}
	if len(kills) != 1 || !kills[0].Done || len(kills[0].Steps) != 4 {
		t.Errorf("second kill %+v", kills)
	}
	done := make(chan error, 1)
	go func() { done <- run.Wait() }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "exit status 137") {
			t.Errorf("the halted agent's tetherctl run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the halted agent did not end")
	}

	// Readmitted, the identity runs again.
	d.ctl("readmit", agentID)
	if got := d.runDial(agentID, "tcp", ok); got != "ok" {
		t.Errorf("after readmit: %q", got)
	}

	checkKillByPID(t, d)
}

// escalationReceiver is an escalation receiver on loopback that takes what Alertmanager's API
// takes (POST /api/v2/alerts, an array of alerts with their end), and what it received.
func escalationReceiver(t *testing.T) (*httptest.Server, func() []escalation.Alert) {
	var alertMu sync.Mutex
	var alerts []escalation.Alert
	rcv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var batch []escalation.PostableAlert
		if err := json.NewDecoder(r.Body).Decode(&batch); err != nil || r.URL.Path != "/api/v2/alerts" {
			http.Error(w, "bad payload", http.StatusBadRequest)
			return
		}
		for _, a := range batch {
			if !a.EndsAt.After(a.StartsAt) {
				http.Error(w, "an alert without its end", http.StatusBadRequest)
				return
			}
		}
		alertMu.Lock()
		for _, a := range batch {
			alerts = append(alerts, escalation.Alert{Labels: a.Labels, Annotations: a.Annotations, StartsAt: a.StartsAt, EndsAt: a.EndsAt})
		}
		alertMu.Unlock()
	}))
	return rcv, func() []escalation.Alert {
		alertMu.Lock()
		defer alertMu.Unlock()
		return slices.Clone(alerts)
	}
}

// agentPrints reads the agent's lines from stdout; the function it returns waits up to 10 s for
// the agent to print want.
func agentPrints(t *testing.T, stdout io.Reader) func(want string) {
	results := make(chan string, 1<<16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case results <- sc.Text():
			default: // the test reads what it needs; the rest is dropped
			}
		}
		close(results)
	}()
	return func(want string) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case r, open := <-results:
				if !open {
					t.Fatalf("the agent ended before printing %q", want)
				}
				if r == want {
					return
				}
			case <-deadline:
				t.Fatalf("the agent never printed %q", want)
			}
		}
	}
}

// checkKilled: kill of the agent a by SPIFFE ID took its three steps, froze it, left the
// process outside the agent (sib, in sibling) alone, was recorded and escalated.
func checkKilled(t *testing.T, d *tetherd, a agents.Agent, sibling string, sib *exec.Cmd, alerts func() []escalation.Alert) {
	t.Helper()
	var kills []killpath.Kill
	if err := json.Unmarshal([]byte(d.ctl("kill", agentID, "--reason", "e2e: exfiltration suspected", "-o", "json")), &kills); err != nil {
		t.Fatal(err)
	}
	if len(kills) != 1 || !kills[0].Done || len(kills[0].Steps) != 3 {
		t.Fatalf("kill %+v", kills)
	}
	for _, s := range kills[0].Steps {
		t.Logf("kill step %-6s %10s %s", s.Name, s.Took, s.Detail)
		if !s.Done {
			t.Errorf("step %s not done: %s", s.Name, s.Error)
		}
	}
	if !frozen(a.Cgroup) {
		t.Error("the agent is not frozen")
	}
	if frozen(sibling) || sib.Process.Signal(syscall.Signal(0)) != nil {
		t.Error("the process outside the agent was touched")
	}
	rec := d.decision("the kill record", func(r events.Decision) bool { return r.Kind == "kill" && r.Kill != nil })
	if rec.SpiffeID != agentID || rec.Reason != "e2e: exfiltration suspected" || rec.Kill.Requester != "uid:0" || !rec.Kill.Done {
		t.Errorf("kill record %+v %+v", rec, rec.Kill)
	}
	waitFor(t, "the kill escalated to the webhook", func() bool {
		for _, a := range alerts() {
			if a.Labels["alertname"] == "TetherAgentKilled" && a.Labels["spiffe_id"] == agentID && a.Labels["severity"] == "critical" {
				return true
			}
		}
		return false
	})

}

// checkKillByPID: a kill by process, while the policy is reloaded over and over, holds.
func checkKillByPID(t *testing.T, d *tetherd) {
	t.Helper()
	var kills []killpath.Kill
	cg := d.sleeper()
	waitFor(t, "the sleeper's process in its cgroup", func() bool { return len(cgroups.Procs(cg)) > 0 })
	pid := cgroups.Procs(cg)[0]
	stop := make(chan struct{})
	reloads := make(chan int)
	go func() {
		n := 0
		defer func() { reloads <- n }()
		for {
			select {
			case <-stop:
				return
			default:
				d.ctlRaw("policy", "reload")
				n++
			}
		}
	}()
	if err := json.Unmarshal([]byte(d.ctl("kill", "--pid", fmt.Sprint(pid), "--reason", "e2e: by pid", "-o", "json")), &kills); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	t.Logf("%d policy reloads during the kill", <-reloads)
	if len(kills) != 1 || kills[0].Cgroup != cg || !kills[0].Done {
		t.Errorf("kill by pid: %+v", kills)
	}
	if a := d.agentAt(cg); !a.Killed || !frozen(cg) {
		t.Errorf("after a kill during policy reloads: killed %v, frozen %v", a.Killed, frozen(cg))
	}
	d.ctl("kill", "--pid", fmt.Sprint(pid), "--reason", "e2e: cleanup", "--terminate")
	if _, stderr, code := d.ctlRaw("kill", "--task", "no-such-task", "--reason", "x"); code == 0 || !strings.Contains(stderr, "no agent matches") {
		t.Errorf("kill of no task: exit %d, %q", code, stderr)
	}
}

// runDial runs the dial helper as agent id and returns its one result.
func (d *tetherd) runDial(id, network, address string) string {
	d.t.Helper()
	out, err := d.agentRun(id, "dial", network, address).Output()
	if err != nil {
		return "error:" + err.Error()
	}
	return strings.TrimSpace(string(out))
}

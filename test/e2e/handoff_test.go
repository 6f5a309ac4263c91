package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/events"
)

// TestPrivilegedHandoff: an agent hands its task to another; the receiver's grants for it are
// at most the sender's, even where the policy would give it more; a handoff the policy does not
// allow, or with a superseded credential, is refused; the log names both identities.
func TestPrivilegedHandoff(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, _ := tcpPort(t, h)
	noPort, _ := tcpPort(t, h)
	ok := fmt.Sprintf("%s:%d", h.V4, okPort)
	no := fmt.Sprintf("%s:%d", h.V4, noPort)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, profile{})
	const helper, stranger = "spiffe://test.local/helper", "spiffe://test.local/stranger"
	narrow := grantsFor(self, h, okPort)
	narrow["handoff_to"] = []string{"spiffe://test.local/help*"}
	wide := grantsFor(self, h, okPort)
	wide["egress"] = append(wide["egress"].([]any), map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(noPort)}, "protocol": "tcp"})
	idle := profile{"exec": []string{self}}
	d.writeProfiles(map[string]profile{"narrow": narrow, "wide": wide, "idle": idle},
		map[string]string{agentID: "idle", helper: "idle", stranger: "idle"})
	d.start()

	launch := func(id string) (agents.Agent, func()) { return launchSleeper(t, d, self, id) }
	sender, _ := launch(agentID)
	receiver, _ := launch(helper)
	other, _ := launch(stranger)

	d.ctl("task", "start", fmt.Sprint(sender.Slot), "--type", "narrow", "--ttl", "10m")
	var cred credentials.Credential
	if err := json.Unmarshal([]byte(d.ctl("credential", "show", fmt.Sprint(sender.Slot))), &cred); err != nil {
		t.Fatal(err)
	}
	if got := privtest.Dial(t, sender.Cgroup, "tcp", ok, "tcp", no); strings.Join(got, " ") != "ok eperm" {
		t.Fatalf("sender: %v", got)
	}

	// The policy does not let "narrow" tasks go to the stranger.
	_, stderr, code := d.ctlRaw("task", "handoff", fmt.Sprint(sender.Slot), "--to", fmt.Sprint(other.Slot), "--credential", cred.Token)
	if code == 0 || !strings.Contains(stderr, "the policy does not allow") {
		t.Errorf("handoff to a stranger: exit %d, %q", code, stderr)
	}

	// To the helper, as a "wide" task: the policy would give it the second listener too, but
	// the sender does not have it.
	var res api.HandoffResult
	out := d.ctl("task", "handoff", "-o", "json", fmt.Sprint(sender.Slot), "--to", fmt.Sprint(receiver.Slot), "--credential", cred.Token, "--type", "wide")
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if res.Agent.Task == nil || res.Agent.Task.HandoffFrom != agentID || res.Credential.TaskID != res.Agent.Task.ID {
		t.Errorf("handoff result %+v", res)
	}
	if got := privtest.Dial(t, receiver.Cgroup, "tcp", ok, "tcp", no); strings.Join(got, " ") != "ok eperm" {
		t.Errorf("receiver of a handed task: %v, want ok (the sender has it), eperm (it does not)", got)
	}
	rec := d.decision("the receiver's denial", func(r events.Decision) bool { return r.SpiffeID == helper && r.Verdict == "deny" })
	if rec.TaskID != res.Agent.Task.ID || rec.TaskType != "wide" {
		t.Errorf("the receiver's decision record names task %q (%q), want %q (wide)", rec.TaskID, rec.TaskType, res.Agent.Task.ID)
	}
	checkHandoffRecorded(t, d, res.Credential.Token)

	// Control: the same task type started directly (not handed over) gets the second listener.
	d.ctl("task", "end", fmt.Sprint(receiver.Slot))
	d.ctl("task", "start", fmt.Sprint(receiver.Slot), "--type", "wide", "--ttl", "10m")
	if got := privtest.Dial(t, receiver.Cgroup, "tcp", ok, "tcp", no); strings.Join(got, " ") != "ok ok" {
		t.Errorf("receiver with its own wide task: %v, want ok ok", got)
	}

	// A superseded sender credential hands nothing over.
	next, _, _ := d.ctlRaw("credential", "heartbeat", fmt.Sprint(sender.Slot), "--credential", cred.Token, "--ttl", "10m")
	if !strings.Contains(next, "token") {
		t.Fatalf("heartbeat: %q", next)
	}
	d.ctl("task", "end", fmt.Sprint(receiver.Slot))
	_, stderr, code = d.ctlRaw("task", "handoff", fmt.Sprint(sender.Slot), "--to", fmt.Sprint(receiver.Slot), "--credential", cred.Token)
	if code == 0 || !strings.Contains(stderr, "credential replayed") {
		t.Errorf("handoff with a superseded credential: exit %d, %q", code, stderr)
	}
}

// launchSleeper launches an agent with id that sleeps until stopped; its view, and what stops it.
func launchSleeper(t *testing.T, d *tetherd, self, id string) (agents.Agent, func()) {
	t.Helper()
	cmd := d.ctlCmd("run", "--id", id, "--", self)
	cmd.Env = append(os.Environ(), "TETHER_TEST_HELPER=sleep")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop := func() { stdin.Close(); cmd.Wait() }
	t.Cleanup(stop)
	var a agents.Agent
	waitFor(t, "agent "+id, func() bool {
		for _, x := range d.agents() {
			if x.SpiffeID == id {
				a = x
				return true
			}
		}
		return false
	})
	return a, stop
}

// checkHandoffRecorded: the receiver's credential (token) names it and the sender it came from,
// and the log records the handoff with both identities.
func checkHandoffRecorded(t *testing.T, d *tetherd, token string) {
	t.Helper()
	const helper = "spiffe://test.local/helper"
	var claims credentials.Claims
	if err := json.Unmarshal([]byte(d.ctl("credential", "verify", token)), &claims); err != nil {
		t.Fatal(err)
	}
	if claims.Subject != helper || claims.HandoffFrom != agentID {
		t.Errorf("receiver's credential claims %+v", claims)
	}
	if !strings.Contains(d.stderr.String(), `msg=handoff`) || !strings.Contains(d.stderr.String(), "from="+agentID) {
		t.Errorf("the log does not record the handoff with both identities")
	}

}

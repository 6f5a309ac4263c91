package e2e

// Fault cases: tetherd killed (SIGKILL) in the middle of a change.

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/api"
)

// TestFaultKilledDuringPolicySwap: tetherd is SIGKILLed while a policy swap installs the new rule
// sets of three agents (each of 300 host rules, the old and the new disjoint), at delays from 0 to
// 40 ms after the reload was asked for. With tetherd dead, each agent has the whole old rule set
// or the whole new one, never a mix (checked at the first and last rule of each); restarted,
// tetherd installs the new one for all.
func TestFaultKilledDuringPolicySwap(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	oldL, newL := listenStamped(t, h), listenStamped(t, h)
	// 300 rules each, to hosts nobody listens on, around the one listener: the first and the
	// last rule of each set is a listener's port on the test host.
	rules := func(l *stamped, base int) []any {
		out := []any{l.rule()}
		for i := range 298 {
			out = append(out, map[string]any{"cidr": fmt.Sprintf("10.%d.%d.%d/32", base, i/250, i%250+1), "ports": []int{443}, "protocol": "tcp"})
		}
		return append(out, map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(l.port) + 1}, "protocol": "tcp"})
	}
	oldP := profile{"egress": rules(oldL, 1), "exec": []string{self}}
	newP := profile{"egress": rules(newL, 2), "exec": []string{self}}
	d := newTetherd(t, oldP)
	mport := d.faultMetrics(t)
	d.start()
	cgs := []string{d.sleeper(), d.sleeper(), d.sleeper()}
	// Denied connects all along (500 a second): records in flight at every kill.
	l := startLoop(t, cgs[0], h.V4.String()+":9")
	var mixed, rounds, killedOld, killedNew int
	cur := oldP
	for _, delay := range []time.Duration{0, 5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 40 * time.Millisecond, 60 * time.Millisecond,
		80 * time.Millisecond, 120 * time.Millisecond, 160 * time.Millisecond, 240 * time.Millisecond} {
		next, want, wantL, otherL := newP, "new", newL, oldL
		if cur["egress"].([]any)[0].(map[string]any)["ports"].([]int)[0] == int(newL.port) {
			next, want, wantL, otherL = oldP, "old", oldL, newL
		}
		d.carryLost()
		d.writePolicy(next)
		reload := d.ctlCmd("policy", "reload")
		if err := reload.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		d.kill9()
		reload.Wait()
		rounds++
		// Allowed or not, at the first and the last rule of the set in force before and of the
		// one the swap installs (the last rule's port has no listener: refused when allowed).
		probe := func(cg string) string {
			got := privtest.Dial(t, cg, "tcp", otherL.addr, "tcp", last(otherL), "tcp", wantL.addr, "tcp", last(wantL))
			var b strings.Builder
			for _, r := range got {
				b.WriteByte("AD"[boolInt(r == "eperm")])
			}
			return b.String()
		}
		for _, cg := range cgs {
			switch got := probe(cg); got {
			case "AADD":
				killedOld++
			case "DDAA":
				killedNew++
			default:
				mixed++
				t.Errorf("killed %s after the reload to the %s policy: agent %s allows (A) and denies (D) %s, want AADD or DDAA", delay, want, cg, got)
			}
		}
		d.start()
		for _, cg := range cgs {
			waitFor(t, "the restarted tetherd's rule set", func() bool { return probe(cg) == "DDAA" })
		}
		cur = next
	}
	counts := l.stop()
	unaccounted, acct := d.accounting(t, mport)
	acct = "loop " + counts + "; " + acct
	privtest.RecordFault(t, privtest.Fault{
		Case:     "tetherd SIGKILLed during a policy swap (3 agents x 300 rules; killed 0-240 ms into it, 10 rounds)",
		MustHold: "with tetherd dead, each agent wholly on the old or the new rule set; after the restart all on the new",
		Measured: fmt.Sprintf("%d agent checks with tetherd dead: %d on the old rule set, %d on the new, %d mixed; all on the new after each restart; %s",
			rounds*len(cgs), killedOld, killedNew, mixed, acct),
		WronglyAllowed: mixed, Unaccounted: unaccounted,
	})
}

// last is the address of the last rule of a swap's rule set: the listener's port plus one.
func last(l *stamped) string {
	ap := netip.MustParseAddrPort(l.addr)
	return netip.AddrPortFrom(ap.Addr(), ap.Port()+1).String()
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// killDelays are the moments after a request at which the kill cases SIGKILL tetherd: before it
// reads the request, in the middle of its work, after it.
var killDelays = []time.Duration{0, 10 * time.Millisecond, 30 * time.Millisecond, 60 * time.Millisecond, 120 * time.Millisecond,
	250 * time.Millisecond, 500 * time.Millisecond, time.Second}

// reaches says whether the agent's loop still reaches l: a connection accepted within 300 ms
// from now.
func reaches(l *stamped) bool {
	from := time.Now().Add(20 * time.Millisecond)
	time.Sleep(320 * time.Millisecond)
	return l.since(from) > 0
}

// TestFaultKilledDuringKill: tetherd is SIGKILLed at delays from 0 to 1 s after `tetherctl
// kill` of an agent that connects to an allowed listener every 2 ms. With tetherd dead, the kill
// has either begun (the agent is denied everything) or not (it connects as before); restarted,
// tetherd finishes a kill that began (the agent killed and frozen, still denied) and leaves an
// agent it never began to kill as it was. A killed agent reaches nothing once denied.
func TestFaultKilledDuringKill(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	ok := listenStamped(t, h)
	d := newTetherd(t, profile{})
	// An identity a kill ended is denied from then on: each round's agent has its own.
	ids := map[string]string{}
	for i := range killDelays {
		ids[fmt.Sprintf("%s-%d", agentID, i)] = "e2e"
	}
	d.writeProfiles(map[string]profile{"e2e": {"egress": []any{ok.rule()}, "exec": []string{self}}}, ids)
	mport := d.faultMetrics(t)
	d.start()
	var begun, notBegun, wrong, halfway int
	for i, delay := range killDelays {
		cg := d.sleeperAs(fmt.Sprintf("%s-%d", agentID, i))
		a := d.agentAt(cg)
		l := startLoop(t, cg, ok.addr)
		if !reaches(ok) {
			t.Fatalf("the agent does not reach its allowed listener before the kill")
		}
		d.carryLost()
		kill := d.ctlCmd("kill", fmt.Sprint(a.Slot), "--reason", "fault suite")
		var killBuf strings.Builder
		kill.Stdout, kill.Stderr = &killBuf, &killBuf
		if err := kill.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		d.kill9()
		kill.Wait()
		denied := !reaches(ok)
		t.Logf("killed %s into the kill: tetherctl said %q", delay, strings.TrimSpace(killBuf.String()))
		d.start()
		after := d.agentAt(cg)
		cut := time.Now()
		switch {
		case denied && after.Killed:
			begun++
			waitFor(t, "the kill finished after the restart", func() bool {
				var st api.KillStatus
				json.Unmarshal([]byte(d.ctl("kills")), &st)
				return len(st.Pending) == 0
			})
			if n := ok.since(cut); n > 0 {
				wrong += n
				t.Errorf("killed %s into the kill: the agent reached its listener %d times after the restart", delay, n)
			}
			// Let it end (frozen, it cannot).
			d.ctl("kill", fmt.Sprint(a.Slot), "--reason", "fault suite: cleanup", "--terminate")
			l.stop()
		case !denied && !after.Killed:
			notBegun++
			if !reaches(ok) {
				halfway++
				t.Errorf("killed %s into the kill: a kill that never began denies the agent after the restart", delay)
			}
			l.stop()
		default:
			halfway++
			t.Errorf("killed %s into the kill: denied with tetherd dead %v, killed after the restart %v", delay, denied, after.Killed)
		}
	}
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:           fmt.Sprintf("tetherd SIGKILLed during a kill (0 to 1 s into it, %d rounds)", len(killDelays)),
		MustHold:       "with tetherd dead the kill has begun (all denied) or not; restarted, tetherd finishes it or the agent is untouched",
		Measured:       fmt.Sprintf("%d kills had begun and finished after the restart, %d had not begun (agent untouched), %d half-applied; %s", begun, notBegun, halfway, acct),
		WronglyAllowed: wrong + halfway, Unaccounted: unaccounted,
	})
}

// approvalScene is an agent whose task may reach prod only with an approval (the shipped
// policy's production egress), and base without one.
func approvalScene(t *testing.T) (*tetherd, *privtest.Host, *stamped, *stamped, string, int) {
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	base, prod := listenStamped(t, h), listenStamped(t, h)
	d := newTetherd(t, profile{})
	data := policyData(profile{"egress": []any{base.rule()}, "exec": []string{self},
		"network_egress": []any{map[string]any{"network": "prodnet", "ports": []int{int(prod.port)}, "protocol": "tcp", "production": true}}})
	settings := data["tether_settings"].(map[string]any)
	settings["networks"].(map[string]any)["prodnet"] = []string{h.V4.String() + "/32"}
	b, _ := json.MarshalIndent(data, "", "  ")
	if err := os.WriteFile(filepath.Join(d.policy, "data.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	d.extra = "env:\n  environment: production\n"
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	return d, h, base, prod, cg, mport
}

// restartRollsBack starts tetherd again after a kill in the middle of a task's change and checks
// that the task is rolled back: the agent in cg has none, reaches base (its baseline) and never
// reaches lost (what the task or its approval granted) from the restart on. It returns how many
// connects reached lost.
func (d *tetherd) restartRollsBack(t *testing.T, cg string, base, lost *stamped, what string) int {
	t.Helper()
	d.start()
	waitFor(t, "the agent without its task after the restart", func() bool { return d.agentAt(cg).Task == nil })
	cut := time.Now().Add(20 * time.Millisecond)
	if !reaches(base) {
		t.Errorf("%s: the baseline destination is denied after the restart", what)
	}
	n := lost.since(cut)
	if n > 0 {
		t.Errorf("%s: what the task granted was reached %d times after the restart", what, n)
	}
	return n
}

// TestFaultKilledDuringApproval: tetherd is SIGKILLed at delays from 0 to 1 s after a step-up
// approval (a production destination for the agent's task) was asked for, while the agent
// connects to it and to its baseline destination every 2 ms. With tetherd dead the approval is
// wholly in force or not at all; restarted, tetherd has lost the task (tasks live in tetherd) and
// with it the approval: the production destination is denied from the restart on (rolled back),
// the baseline one allowed.
func TestFaultKilledDuringApproval(t *testing.T) {
	privtest.FaultGate(t)
	d, _, base, prod, cg, mport := approvalScene(t)
	l := startLoop(t, cg, base.addr, prod.addr)
	var inForce, notYet, wrong int
	for _, delay := range killDelays {
		d.ctl("task", "start", agentID, "--type", "e2e", "--ttl", "10m")
		if reaches(prod) {
			t.Fatal("the production destination is reached without an approval")
		}
		d.carryLost()
		approve := d.ctlCmd("task", "approve", agentID, "--action", "connect", "--resource", "prodnet", "--ttl", "10m")
		if err := approve.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		d.kill9()
		approve.Wait()
		if reaches(prod) {
			inForce++
		} else {
			notYet++
		}
		wrong += d.restartRollsBack(t, cg, base, prod, fmt.Sprintf("killed %s into the approval", delay))
	}
	l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:           fmt.Sprintf("tetherd SIGKILLed during a step-up approval (0 to 1 s into it, %d rounds)", len(killDelays)),
		MustHold:       "with tetherd dead the approval in force or not; restarted, the task and its approval rolled back: its destination denied",
		Measured:       fmt.Sprintf("with tetherd dead: approval in force %d times, not yet %d; production destination reached %d times after the restarts; %s", inForce, notYet, wrong, acct),
		WronglyAllowed: wrong, Unaccounted: unaccounted,
	})
}

// TestFaultKilledDuringRenewal: tetherd is SIGKILLed at delays from 0 to 1 s after the agent's
// credential heartbeat (which renews the task and issues the next credential) was sent. With
// tetherd dead the task's grants stay as they were; restarted, tetherd has lost the task: neither
// the credential presented nor one issued by the interrupted heartbeat renews it (the heartbeat
// is refused), and the task's destination is denied.
func TestFaultKilledDuringRenewal(t *testing.T) {
	privtest.FaultGate(t)
	h := privtest.NewHost(t)
	self := privtest.AgentBinary(t)
	base, task := listenStamped(t, h), listenStamped(t, h)
	d := newTetherd(t, profile{})
	d.writeProfiles(map[string]profile{
		"base":  {"egress": []any{base.rule()}, "exec": []string{self}},
		"wider": {"egress": []any{base.rule(), task.rule()}, "exec": []string{self}},
	}, map[string]string{agentID: "base"})
	mport := d.faultMetrics(t)
	d.start()
	cg := d.sleeper()
	a := d.agentAt(cg)
	l := startLoop(t, cg, base.addr, task.addr)
	var wrong, renewedAfter, taskReached int
	for _, delay := range killDelays {
		d.ctl("task", "start", fmt.Sprint(a.Slot), "--type", "wider", "--ttl", "10m")
		var cred struct {
			Token string `json:"token"`
		}
		if err := json.Unmarshal([]byte(d.ctl("credential", "show", fmt.Sprint(a.Slot))), &cred); err != nil {
			t.Fatal(err)
		}
		if !reaches(task) {
			t.Fatal("the task's destination is not reached with the task")
		}
		d.carryLost()
		var out strings.Builder
		hb := d.ctlCmd("credential", "heartbeat", fmt.Sprint(a.Slot), "--credential", cred.Token, "--ttl", "10m", "-o", "json")
		hb.Stdout = &out
		if err := hb.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		d.kill9()
		hb.Wait()
		if reaches(task) {
			taskReached++ // the grants in force when tetherd died
		}
		wrong += d.restartRollsBack(t, cg, base, task, fmt.Sprintf("killed %s into a heartbeat", delay))
		tokens := []string{cred.Token}
		var next struct {
			Token string `json:"token"`
		}
		if json.Unmarshal([]byte(out.String()), &next) == nil && next.Token != "" {
			tokens = append(tokens, next.Token)
		}
		for _, tok := range tokens {
			if _, _, code := d.ctlRaw("credential", "heartbeat", fmt.Sprint(a.Slot), "--credential", tok, "--ttl", "10m"); code == 0 {
				renewedAfter++
				t.Errorf("killed %s into a heartbeat: a credential of the lost task renewed it after the restart", delay)
			}
		}
		if reaches(task) {
			wrong++
			t.Errorf("killed %s into a heartbeat: the task's destination is reached after the renewals were refused", delay)
		}
	}
	l.stop()
	unaccounted, acct := d.accounting(t, mport)
	privtest.RecordFault(t, privtest.Fault{
		Case:     fmt.Sprintf("tetherd SIGKILLed during a credential renewal (heartbeat; 0 to 1 s into it, %d rounds)", len(killDelays)),
		MustHold: "restarted, the task rolled back: no credential of it renews it, its destination denied",
		Measured: fmt.Sprintf("task destination reached with tetherd dead in %d of %d rounds (the grants then in force); renewals accepted after the restart %d; task destination reached %d times after the restarts; %s",
			taskReached, len(killDelays), renewedAfter, wrong, acct),
		WronglyAllowed: wrong + renewedAfter, Unaccounted: unaccounted,
	})
}

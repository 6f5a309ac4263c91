package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/events"
)

// Live connections follow the agent's context through the real tetherd: an agent keeps streams
// open while its policy is reloaded without a rule, its approval expires, its task ends and it is
// killed and resumed. Each time, nothing reaches the revoked destinations 100 ms after the
// change (by the test host kernel's count), a stream to the same place from outside agents goes
// on, and the decision log has the record.

// liveStatus is what tetherctl status says of live sockets.
func (d *tetherd) liveStatus() api.SocketStatus {
	d.t.Helper()
	var st api.Status
	if err := json.Unmarshal([]byte(d.ctl("status", "-o", "json")), &st); err != nil {
		d.t.Fatal(err)
	}
	return st.Sockets
}

// TestPrivilegedLiveSocketsFollowContext: a policy reload that drops a rule, an approval that
// expires and a task that ends each cut the agent's live streams they revoke, TCP and connected
// UDP, within 100 ms; the streams they do not revoke, and the same streams from outside agents,
// go on.
func TestPrivilegedLiveSocketsFollowContext(t *testing.T) {
	h := privtest.NewHost(t)
	base, reload := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "tcp", h.V4)
	wideTCP, wideUDP := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "udp", h.V4)
	prod := h.ListenPeer(t, "tcp", h.V4)
	control := h.ListenPeer(t, "tcp", h.V4)
	self := privtest.AgentBinary(t)
	rule := func(p *privtest.Peer, proto string) map[string]any {
		return map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(p.Addr.Port())}, "protocol": proto}
	}
	write := func(d *tetherd, withReload bool) {
		baseEgress := []any{rule(base, "tcp")}
		if withReload {
			baseEgress = append(baseEgress, rule(reload, "tcp"))
		}
		data := policyData(profile{"egress": baseEgress, "exec": []string{self}})
		settings := data["tether_settings"].(map[string]any)
		settings["networks"].(map[string]any)["prodnet"] = []string{h.V4.String() + "/32"}
		wider := profile{"egress": append(slices.Clone(baseEgress), rule(wideTCP, "tcp"), rule(wideUDP, "udp")), "exec": []string{self},
			"network_egress": []any{map[string]any{"network": "prodnet", "ports": []int{int(prod.Addr.Port())}, "protocol": "tcp", "production": true}},
			"unix":           []any{}, "high_risk": []string{}}
		settings["profiles"].(map[string]any)["wider"] = wider
		b, _ := json.MarshalIndent(data, "", "  ")
		if err := os.WriteFile(filepath.Join(d.policy, "data.json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d := newTetherd(t, profile{})
	write(d, true)
	d.extra = "env:\n  environment: production\n"
	d.writeConfig()
	d.start()
	terminate := d.liveStatus().Terminate
	t.Logf("live sockets terminated: %v", terminate)
	cg := d.sleeper()
	outside := privtest.Cgroup(t)
	d.ctl("task", "start", agentID, "--type", "wider", "--ttl", "10m")

	baseS := privtest.StartStream(t, cg, "tcp", base.Addr.String())
	reloadS := privtest.StartStream(t, cg, "tcp", reload.Addr.String())
	wideT := privtest.StartStream(t, cg, "tcp", wideTCP.Addr.String())
	wideU := privtest.StartStream(t, cg, "udp", wideUDP.Addr.String())
	privtest.StartStream(t, outside, "tcp", control.Addr.String())
	privtest.StartStream(t, outside, "tcp", reload.Addr.String())
	for _, p := range []*privtest.Peer{base, reload, wideTCP, wideUDP, control} {
		p.WaitReceiving(t)
	}

	// The policy reloaded without a rule.
	gen := d.agents()[0].Generation
	write(d, false)
	d.ctl("policy", "reload")
	at := time.Now()
	// The reload peer's first connection is the agent's, its second the one from outside agents.
	privtest.QuietAfter(t, "the stream the reload revoked", reload.Conn(0), at, 100*time.Millisecond)
	privtest.Flowing(t, "the same stream outside agents", reload.Conn(1))
	privtest.Flowing(t, "the stream still allowed", base)
	reloadS.Ended(t, "the stream the reload revoked", "tcp", terminate)
	rec := d.decision("the revoked socket's record", func(r events.Decision) bool {
		return (r.Kind == "terminate" || r.Kind == "packet") && r.Reason == "revoked" && r.Destination == reload.Addr.String()
	})
	if rec.SpiffeID != agentID || rec.RuleGeneration <= gen || rec.Verdict != "deny" {
		t.Errorf("record %+v: want a deny of %s at a generation after %d", rec, agentID, gen)
	}

	checkApprovalStreamEnds(t, d, cg, prod, terminate)

	// The task ends.
	d.ctl("task", "end", agentID)
	at = time.Now()
	privtest.QuietAfter(t, "the task's tcp stream", wideTCP, at, 100*time.Millisecond)
	privtest.QuietAfter(t, "the task's udp stream", wideUDP, at, 100*time.Millisecond)
	privtest.Flowing(t, "the stream still allowed", base)
	privtest.Flowing(t, "the stream outside agents", control)
	wideT.Ended(t, "the task's tcp stream", "tcp", terminate)
	wideU.Ended(t, "the task's udp stream", "udp", terminate)
	if got := baseS.Next(t, 10*time.Millisecond); got != "none" {
		t.Errorf("the stream still allowed says %q", got)
	}
}

// checkApprovalStreamEnds: the stream an approval (of 2 s) opened to prod goes quiet, and ends,
// when the approval expires.
func checkApprovalStreamEnds(t *testing.T, d *tetherd, cg string, prod *privtest.Peer, terminate bool) {
	t.Helper()
	d.ctl("task", "approve", agentID, "--action", "connect", "--resource", "prodnet", "--ttl", "2s")
	a := d.agents()[0] // at once: a loaded machine may take the approval's 2 s to start the stream
	if a.Task == nil || len(a.Task.Approvals) != 1 {
		t.Fatalf("agent %+v: want one approval", a)
	}
	prodS := privtest.StartStream(t, cg, "tcp", prod.Addr.String())
	prod.WaitReceiving(t)
	privtest.QuietAfter(t, "the stream the expired approval opened", prod, a.Task.Approvals[0].ExpiresAt, 100*time.Millisecond)
	prodS.Ended(t, "the approval's stream", "tcp", terminate)
}

// TestPrivilegedKillResumeStaysCut: after tetherctl kill returns, not one byte of the agent's
// established stream reaches the peer, and none after tetherctl resume thaws it either; the
// stream from outside agents goes on.
func TestPrivilegedKillResumeStaysCut(t *testing.T) {
	h := privtest.NewHost(t)
	tcp, udp, control := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "udp", h.V6), h.ListenPeer(t, "tcp", h.V4)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, profile{"exec": []string{self}, "egress": []any{
		map[string]any{"cidr": h.V4.String() + "/32", "ports": []int{int(tcp.Addr.Port())}, "protocol": "tcp"},
		map[string]any{"cidr": h.V6.String() + "/128", "ports": []int{int(udp.Addr.Port())}, "protocol": "udp"},
	}})
	d.start()
	terminate := d.liveStatus().Terminate
	cg := d.sleeper()
	ts := privtest.StartStream(t, cg, "tcp", tcp.Addr.String())
	us := privtest.StartStream(t, cg, "udp", udp.Addr.String())
	privtest.StartStream(t, privtest.Cgroup(t), "tcp", control.Addr.String())
	tcp.WaitReceiving(t)
	udp.WaitReceiving(t)

	d.ctl("kill", agentID, "--reason", "live sockets test")
	at := time.Now()
	privtest.QuietAfter(t, "tcp after the kill returned", tcp, at, 0)
	privtest.QuietAfter(t, "udp after the kill returned", udp, at, 0)
	slot := d.agents()[0].Slot
	d.ctl("resume", strconv.Itoa(int(slot)))
	if frozen(cg) {
		t.Fatal("resume left the agent frozen")
	}
	privtest.QuietAfter(t, "tcp after resume", tcp, at, 0)
	privtest.QuietAfter(t, "udp after resume", udp, at, 0)
	privtest.Flowing(t, "the stream outside agents", control)
	ts.Ended(t, "the killed agent's tcp stream, thawed", "tcp", terminate)
	us.Ended(t, "the killed agent's udp stream, thawed", "udp", terminate)
	kind := events.RecordKind("packet")
	if terminate {
		kind = "terminate"
	}
	rec := d.decision("the killed agent's socket", func(r events.Decision) bool {
		return r.Kind == kind && r.Reason == "killed" && r.Destination == tcp.Addr.String()
	})
	if rec.SpiffeID != agentID || rec.Verdict != "deny" {
		t.Errorf("record %+v", rec)
	}
}

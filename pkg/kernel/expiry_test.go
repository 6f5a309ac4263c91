package kernel

import (
	"slices"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestPrivilegedRuleSetExpires: the kernel ends a rule set at its expiry with no daemon acting.
// Two agents hold the same rules; one rule set expires 1.5 s after it is installed, the other
// (the negative control) never. Nobody touches the kernel at the expiry: from then on nothing of
// the expiring agent's live TCP stream reaches its peer, its new sockets and its execs are
// refused, recorded with reason expired; the control agent's stream and connects go on. Moving
// the expiry (a task renewed) lets the agent connect again, and its stalled stream resumes.
func TestPrivilegedRuleSetExpires(t *testing.T) {
	f := newFixture(t, Options{NoSockDestroy: true})
	h := privtest.NewHost(t)
	peer, controlPeer := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "tcp", h.V4)
	udp := port(t, h.ListenUDP(t, h.V4).LocalAddr())
	rules := func(expires time.Time) *dataplane.RuleSet {
		return &dataplane.RuleSet{Generation: 1, Expires: expires, Exec: execs(f.self), Egress: []dataplane.Egress{hostRule(h.V4,
			portRule(dataplane.ProtoTCP, peer.Addr.Port()), portRule(dataplane.ProtoTCP, controlPeer.Addr.Port()),
			portRule(dataplane.ProtoUDP, udp))}}
	}
	const life = 1500 * time.Millisecond
	agent := f.agent(t, "agent", 6, dataplane.RuleSet{})
	forever := rules(time.Time{})
	forever.Exec = nil // f.agent adds it
	control := f.agent(t, "control", 7, *forever)
	at := time.Now().Add(life)
	if err := f.k.Install(6, rules(bootclock.Now().Add(life))); err != nil {
		t.Fatal(err)
	}
	events := f.events(t)
	stream := privtest.StartStream(t, agent, "tcp", peer.Addr.String())
	privtest.StartStream(t, control, "tcp", controlPeer.Addr.String())
	peer.WaitReceiving(t)
	controlPeer.WaitReceiving(t)
	targets := []string{"tcp", hostPort(h.V4, peer.Addr.Port()), "udpsend", hostPort(h.V4, udp)}
	left := time.Until(at)
	if left < 300*time.Millisecond {
		t.Fatalf("the machine is too slow for this test: %s of the rule set's %s left after the streams started", left, life)
	}
	// One process dials before the expiry and again after it: an exec past the expiry is denied
	// too (below).
	dials := append(append(slices.Clone(targets), "sleep", (left+100*time.Millisecond).String()), targets...)
	expect(t, "before and past the expiry", privtest.Dial(t, agent, dials...), []string{"ok", "ok", "slept", "eperm", "eperm"})

	privtest.QuietAfter(t, "the live stream past the expiry", peer, at, 50*time.Millisecond)
	privtest.Flowing(t, "the control agent's stream", controlPeer)
	expect(t, "the control agent past the expiry", privtest.Dial(t, control, targets...), []string{"ok", "ok"})
	if err := privtest.Command(t, agent, "dial", targets...).Run(); !execDenied(err) {
		t.Errorf("a program started in the agent past the expiry: %v, want its exec denied", err)
	}
	// New sockets are refused at socket(), before any connect.
	for _, k := range []dataplane.Kind{dataplane.KindSocket, dataplane.KindPacket, dataplane.KindExec} {
		e := events.wait(t, k.String()+" denied as expired", func(e dataplane.Event) bool {
			return e.Slot == 6 && e.Kind == k && e.Reason == dataplane.ReasonExpired
		})
		if e.Verdict != dataplane.VerdictDeny || e.Generation != 1 {
			t.Errorf("%s record %+v, want a deny at generation 1", k, e)
		}
	}
	if got := stream.Next(t, time.Second); got != "stalled" {
		t.Errorf("the expired agent's stream: %q, want stalled", got)
	}

	if err := f.k.SetExpiry(6, bootclock.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	expect(t, "after the expiry moved", privtest.Dial(t, agent, targets...), []string{"ok", "ok"})
	peer.WaitReceivingWithin(t, 10*time.Second)
}

// TestPrivilegedExpiredAuditRuleSet: an audit-mode rule set past its expiry reports what it would
// deny (verdict audit, reason expired) and denies nothing.
func TestPrivilegedExpiredAuditRuleSet(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p := port(t, h.ListenTCP(t, h.V4).Addr())
	agent := f.agent(t, "agent", 8, dataplane.RuleSet{Mode: dataplane.ModeAudit, Generation: 3, Expires: bootclock.Now().Add(-time.Second),
		Egress: []dataplane.Egress{hostRule(h.V4, portRule(dataplane.ProtoTCP, p))}})
	events := f.events(t)
	expect(t, "expired, in audit mode", privtest.Dial(t, agent, "tcp", hostPort(h.V4, p)), []string{"ok"})
	e := events.wait(t, "would-deny as expired", func(e dataplane.Event) bool { return e.Slot == 8 && e.Reason == dataplane.ReasonExpired })
	if e.Verdict != dataplane.VerdictAudit || e.Generation != 3 {
		t.Errorf("record %+v, want verdict audit at generation 3", e)
	}
}

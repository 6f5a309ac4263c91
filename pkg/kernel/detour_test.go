package kernel

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestPrivilegedDetours: a datagram to a destination the agent may reach, carrying a routing
// header (IPv6, type 4) or a loose source route (IPv4, by setsockopt or as ancillary data of one
// message), leaves for another host nobody granted. From outside agents (the negative control)
// the capture on that host's link sees it. From the agent, the socket options are refused with
// EPERM and recorded, and a packet that carries a detour anyway (ancillary data, or the option
// set with the setsockopt program detached) is dropped at egress (the send fails with EPERM) and
// recorded: the capture sees nothing.
func TestPrivilegedDetours(t *testing.T) {
	f := newFixture(t, Options{})
	allowed, detour := privtest.NewHost(t), privtest.NewHost(t)
	u4, u6 := allowed.ListenUDP(t, allowed.V4), allowed.ListenUDP(t, allowed.V6)
	p4, p6 := port(t, u4.LocalAddr()), port(t, u6.LocalAddr())
	agent := f.agent(t, "agent", 9, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{
		hostRule(allowed.V4, portRule(dataplane.ProtoUDP, p4)),
		hostRule(allowed.V6, portRule(dataplane.ProtoUDP, p6)),
	}})
	events := f.events(t)
	capture := detour.Capture(t)
	outside := privtest.Cgroup(t)

	cases := []struct {
		kind, to string
		via      string
	}{
		{"rthdr6", hostPort(allowed.V6, p6), detour.V6.String()},
		{"ipopt4", hostPort(allowed.V4, p4), detour.V4.String()},
		{"lsrr4cmsg", hostPort(allowed.V4, p4), detour.V4.String()},
	}
	send := func(cg, kind, to, via, marker string) string {
		out := privtest.Run(t, cg, "detour", kind, to, via, marker)
		return fmt.Sprint(out)
	}
	// The attack works outside agents: the packets reach the detour host's link.
	for _, c := range cases {
		marker := "tether-detour-control-" + c.kind
		if got := send(outside, c.kind, c.to, c.via, marker); got != "[setsockopt:ok send:ok]" && got != "[setsockopt:- send:ok]" {
			t.Fatalf("%s outside agents: %s", c.kind, got)
		}
		waitCapture(t, capture, marker, c.kind+" outside agents")
	}

	// From the agent: the options are refused, the ancillary data is dropped at egress.
	wants := map[string]string{"rthdr6": "[setsockopt:eperm send:-]", "ipopt4": "[setsockopt:eperm send:-]", "lsrr4cmsg": "[setsockopt:- send:eperm]"}
	for _, c := range cases {
		marker := "tether-detour-agent-" + c.kind
		if got := send(agent, c.kind, c.to, c.via, marker); got != wants[c.kind] {
			t.Errorf("%s from the agent: %s, want %s", c.kind, got, wants[c.kind])
		}
	}
	e := events.wait(t, "IPV6_RTHDR refused", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindSockopt && e.Target == "IPV6_RTHDR"
	})
	if e.Verdict != dataplane.VerdictDeny || e.Reason != dataplane.ReasonDetour || e.Slot != 9 {
		t.Errorf("record %+v, want deny, detour, slot 9", e)
	}
	events.wait(t, "IP_OPTIONS refused", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindSockopt && e.Target == "IP_OPTIONS" && e.Reason == dataplane.ReasonDetour
	})
	e = events.wait(t, "the source-routed packet dropped", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindPacket && e.Reason == dataplane.ReasonDetour && e.Port == p4
	})
	if e.Verdict != dataplane.VerdictDeny || e.Addr != detour.V4 {
		t.Errorf("record %+v, want a deny of the packet to %s", e, detour.V4)
	}

	// The egress program alone: with the setsockopt program detached (as an agent that got at
	// the links could), the routing header is set, and the packet dropped all the same.
	id, err := cgroupID(f.parent)
	if err != nil {
		t.Fatal(err)
	}
	detachSetsockopt(t, f, id)
	if got := send(agent, "rthdr6", hostPort(allowed.V6, p6), detour.V6.String(), "tether-detour-agent-unguarded"); got != "[setsockopt:ok send:eperm]" {
		t.Fatalf("rthdr6 from the agent without the setsockopt program: %s", got)
	}
	events.wait(t, "the routed packet dropped", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindPacket && e.Reason == dataplane.ReasonDetour && e.Port == p6
	})

	time.Sleep(200 * time.Millisecond)
	for _, m := range []string{"tether-detour-agent-rthdr6", "tether-detour-agent-ipopt4", "tether-detour-agent-lsrr4cmsg", "tether-detour-agent-unguarded"} {
		if n := capture.Saw(m); n > 0 {
			t.Errorf("%s reached the detour host's link (%d packets)", m, n)
		}
	}
}

func waitCapture(t *testing.T, c *privtest.Capture, marker, what string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if c.Saw(marker) > 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: the packet never reached the detour host (the negative control does not work)", what)
}

// detachSetsockopt detaches the setsockopt program from the agent parent id: its pin goes, and
// this process's handle of the link.
func detachSetsockopt(t *testing.T, f *fixture, id uint64) {
	t.Helper()
	if err := os.Remove(filepath.Join(f.pin, "links", fmt.Sprintf("cg-%d-setsockopt", id))); err != nil {
		t.Fatal(err)
	}
	prog, err := f.k.coll.Programs[bpfProgTetherSetsockopt].Info()
	if err != nil {
		t.Fatal(err)
	}
	want, _ := prog.ID()
	f.k.mu.Lock()
	defer f.k.mu.Unlock()
	for _, l := range f.k.parents[id] {
		if info, err := l.Info(); err == nil && info.Program == want {
			l.Close()
			return
		}
	}
	t.Fatal("no setsockopt link at the agent parent")
}

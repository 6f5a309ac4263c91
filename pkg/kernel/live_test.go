package kernel

import (
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// Live connections follow the rule set: these tests keep streams open from an agent to a test
// host, change what the agent may do, and look at what still reaches the host and when, by the
// host kernel's count. Each runs with bpf_sock_destroy (the sockets are terminated) and without
// it (their packets are dropped), as on a kernel before 6.5.

// liveModes runs f with and without socket termination. Where the kernel has no bpf_sock_destroy
// (TETHER_EXPECT_SOCK_DESTROY=0: the 6.1 kernel of make test-vm), the first checks that the probe
// says so, with the reason, and turns the sweep off.
func liveModes(t *testing.T, f func(t *testing.T, destroy bool)) {
	t.Run("sock_destroy", func(t *testing.T) {
		if noSockDestroyExpected() {
			checkNoSockDestroy(t)
			return
		}
		f(t, true)
	})
	t.Run("packet_drop", func(t *testing.T) { f(t, false) })
}

// checkNoSockDestroy checks that on a kernel without bpf_sock_destroy the probe says so, with
// the reason, and the sweep's programs are inactive.
func checkNoSockDestroy(t *testing.T) {
	fx := newFixture(t, Options{})
	feat := fx.k.Features()
	if feat.SockDestroy || !strings.Contains(feat.SockDestroyReason, "bpf_sock_destroy") || feat.hook("sweep_tcp").Active {
		t.Fatalf("a kernel without bpf_sock_destroy: sock_destroy %v, sweep_tcp active %v, reason %q",
			feat.SockDestroy, feat.hook("sweep_tcp").Active, feat.SockDestroyReason)
	}
	t.Logf("this kernel terminates no socket, as expected: %s", feat.SockDestroyReason)
}

// noSockDestroyExpected: the environment says this kernel has no bpf_sock_destroy.
func noSockDestroyExpected() bool { return os.Getenv("TETHER_EXPECT_SOCK_DESTROY") == "0" }

func liveFixture(t *testing.T, destroy bool) *fixture {
	t.Helper()
	f := newFixture(t, Options{NoSockDestroy: !destroy})
	if destroy && !f.k.Features().SockDestroy {
		t.Fatalf("bpf_sock_destroy is needed here: %s", f.k.Features().SockDestroyReason)
	}
	return f
}

func hostRule(a netip.Addr, ports ...dataplane.PortRule) dataplane.Egress {
	return dataplane.Egress{Prefix: netip.PrefixFrom(a, a.BitLen()), Ports: ports}
}

func portRule(proto dataplane.Proto, p uint16) dataplane.PortRule {
	return dataplane.PortRule{Proto: proto, Lo: p, Hi: p}
}

// TestPrivilegedRevocationReachesLiveSockets: an agent keeps TCP and connected UDP streams open
// over IPv4 and IPv6 to destinations its rule set allows; a new rule set takes all but one away.
// Nothing reaches the revoked destinations 100 ms after the install returned; the one still
// allowed goes on, and so does a process outside agents streaming to the same host (the negative
// control: without tether nothing stops it). With bpf_sock_destroy the agent's TCP sockets fail
// with ECONNABORTED, its UDP sockets are disconnected (a send fails with EDESTADDRREQ, a receive
// with ECONNABORTED), and every socket is one "terminate" record with reason revoked and the
// revoking generation; without it, the packets are dropped (TCP stalls, UDP sends fail with
// EPERM), recorded as "packet".
func TestPrivilegedRevocationReachesLiveSockets(t *testing.T) {
	liveModes(t, func(t *testing.T, destroy bool) {
		f := liveFixture(t, destroy)
		h := privtest.NewHost(t)
		tcp4, udp4 := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "udp", h.V4)
		tcp6, udp6 := h.ListenPeer(t, "tcp", h.V6), h.ListenPeer(t, "udp", h.V6)
		kept, control := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "tcp", h.V4)
		keep := portRule(dataplane.ProtoTCP, kept.Addr.Port())
		agent := f.agent(t, "agent", 3, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{
			hostRule(h.V4, portRule(dataplane.ProtoTCP, tcp4.Addr.Port()), portRule(dataplane.ProtoUDP, udp4.Addr.Port()), keep),
			hostRule(h.V6, portRule(dataplane.ProtoTCP, tcp6.Addr.Port()), portRule(dataplane.ProtoUDP, udp6.Addr.Port())),
		}})
		events := f.events(t)
		outside := privtest.Cgroup(t)

		revoked := map[string]*privtest.Peer{"tcp4": tcp4, "udp4": udp4, "tcp6": tcp6, "udp6": udp6}
		networks := map[string]string{"tcp4": "tcp", "udp4": "udp", "tcp6": "tcp", "udp6": "udp"}
		streams := map[string]*privtest.Stream{}
		for name, p := range revoked {
			streams[name] = privtest.StartStream(t, agent, networks[name], p.Addr.String())
			p.WaitReceiving(t)
		}
		keptStream := privtest.StartStream(t, agent, "tcp", kept.Addr.String())
		privtest.StartStream(t, outside, "tcp", control.Addr.String())
		kept.WaitReceiving(t)
		control.WaitReceiving(t)

		if err := f.k.Install(3, &dataplane.RuleSet{Generation: 2, Egress: []dataplane.Egress{hostRule(h.V4, keep)}, Exec: execs(f.self)}); err != nil {
			t.Fatal(err)
		}
		at := time.Now()
		res, err := f.k.Sweep(3)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("install to the end of the sweep: %s (sweep: %+v)", time.Since(at), res)

		for name, p := range revoked {
			privtest.QuietAfter(t, name+" after the revocation", p, at, 100*time.Millisecond)
		}
		privtest.Flowing(t, "the destination still allowed", kept)
		privtest.Flowing(t, "the same stream outside agents", control)
		if got := keptStream.Next(t, 10*time.Millisecond); got != "none" {
			t.Errorf("the stream still allowed says %q", got)
		}

		for name, s := range streams {
			s.Ended(t, name+" stream", networks[name], destroy)
		}
		kind := dataplane.KindTerminate
		if !destroy {
			kind = dataplane.KindPacket
		}
		for name, p := range revoked {
			e := events.wait(t, name+" revoked", func(e dataplane.Event) bool {
				return e.Kind == kind && e.Addr == p.Addr.Addr() && e.Port == p.Addr.Port()
			})
			if e.Verdict != dataplane.VerdictDeny || e.Reason != dataplane.ReasonRevoked || e.Generation != 2 || e.Slot != 3 {
				t.Errorf("%s record: %+v, want deny, revoked, generation 2, slot 3", name, e)
			}
			if e.PID == 0 || e.Comm == "" {
				t.Errorf("%s record names no process: pid %d comm %q", name, e.PID, e.Comm)
			}
		}
		if destroy && res.Destroyed < len(revoked) {
			t.Errorf("the sweep terminated %d sockets, want at least %d", res.Destroyed, len(revoked))
		}
		// The peer of a terminated TCP connection sees a reset.
		for _, p := range []*privtest.Peer{tcp4, tcp6} {
			if got, want := p.Resets(), map[bool]int{true: 1, false: 0}[destroy]; got != want {
				t.Errorf("%s saw %d resets, want %d", p.Addr, got, want)
			}
		}
	})
}

// TestPrivilegedKillCutsLiveSockets: not one byte of an agent's established TCP stream, nor one
// datagram of its connected UDP socket, nor one byte of a connection it accepted, reaches the
// peer after the kill (the killed flag) is written; the stream from outside agents goes on.
// Readmitted, the agent connects again.
func TestPrivilegedKillCutsLiveSockets(t *testing.T) {
	liveModes(t, func(t *testing.T, destroy bool) {
		f := liveFixture(t, destroy)
		h := privtest.NewHost(t)
		tcp, udp, control := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "udp", h.V6), h.ListenPeer(t, "tcp", h.V4)
		agent := f.agent(t, "agent", 4, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{
			hostRule(h.V4, portRule(dataplane.ProtoTCP, tcp.Addr.Port())),
			hostRule(h.V6, portRule(dataplane.ProtoUDP, udp.Addr.Port())),
		}})
		events := f.events(t)
		ts := privtest.StartStream(t, agent, "tcp", tcp.Addr.String())
		us := privtest.StartStream(t, agent, "udp", udp.Addr.String())
		privtest.StartStream(t, privtest.Cgroup(t), "tcp", control.Addr.String())
		ss, served := privtest.StartServer(t, agent, "127.0.0.1:0")
		tcp.WaitReceiving(t)
		udp.WaitReceiving(t)
		served.WaitReceiving(t)

		if err := f.k.SetFlags(4, dataplane.AgentActive|dataplane.AgentKilled); err != nil {
			t.Fatal(err)
		}
		at := time.Now()
		privtest.QuietAfter(t, "tcp after the kill", tcp, at, 0)
		privtest.QuietAfter(t, "udp after the kill", udp, at, 0)
		privtest.QuietAfter(t, "the accepted connection after the kill", served, at, 0)
		privtest.Flowing(t, "the stream outside agents", control)
		ts.Ended(t, "tcp stream of the killed agent", "tcp", destroy)
		us.Ended(t, "udp stream of the killed agent", "udp", destroy)
		if destroy { // dropped, its send buffer (loopback: megabytes) takes long to fill
			ss.Ended(t, "the accepted connection of the killed agent", "tcp", destroy)
		}
		kind := dataplane.KindTerminate
		if !destroy {
			kind = dataplane.KindPacket
		}
		e := events.wait(t, "the kill of the tcp stream", func(e dataplane.Event) bool {
			return e.Kind == kind && e.Port == tcp.Addr.Port()
		})
		if e.Reason != dataplane.ReasonKilled || e.Verdict != dataplane.VerdictDeny {
			t.Errorf("record %+v, want deny, killed", e)
		}

		if err := f.k.SetFlags(4, dataplane.AgentActive); err != nil {
			t.Fatal(err)
		}
		privtest.StartStream(t, agent, "tcp", tcp.Addr.String())
	})
}

// TestPrivilegedMaxDuration: a connection allowed by a rule with a max_duration ends then; a new
// connection gets the whole duration again.
func TestPrivilegedMaxDuration(t *testing.T) {
	liveModes(t, func(t *testing.T, destroy bool) {
		f := liveFixture(t, destroy)
		h := privtest.NewHost(t)
		tcp := h.ListenPeer(t, "tcp", h.V4)
		// Long enough that a loaded machine (the whole suite in parallel) gets the stream's
		// first bytes through before the limit ends it.
		limit := time.Second
		r := portRule(dataplane.ProtoTCP, tcp.Addr.Port())
		r.MaxDuration = limit
		agent := f.agent(t, "agent", 5, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{hostRule(h.V4, r)}})
		events := f.events(t)
		s := privtest.StartStream(t, agent, "tcp", tcp.Addr.String())
		// StartStream returns once the helper has connected: the connection's limit runs from
		// before now (measured from before the helper started, a slow machine's process start
		// would count against the limit).
		start := time.Now()
		tcp.WaitReceiving(t)
		privtest.QuietAfter(t, "tcp past its max_duration", tcp, start, limit+50*time.Millisecond)
		s.Ended(t, "stream past its max_duration", "tcp", destroy)
		e := events.wait(t, "max_duration", func(e dataplane.Event) bool { return e.Reason == dataplane.ReasonMaxDuration })
		if e.Verdict != dataplane.VerdictDeny || e.Port != tcp.Addr.Port() {
			t.Errorf("record %+v, want a deny of port %d", e, tcp.Addr.Port())
		}
		privtest.StartStream(t, agent, "tcp", tcp.Addr.String())
		tcp.WaitReceiving(t)
	})
}

// TestPrivilegedRestartKeepsPacketsCut: the egress program and the socket storage are pinned. With
// no socket termination, a killed agent's stream and a revoked stream of another agent are held
// back by the egress program alone; tetherd's handles are closed (a crash) and opened again from
// the pins: not one byte gets through meanwhile, the program at the agent parent is replaced in
// place, and the new one judges by the same storage: readmitted and allowed again, both streams
// flow.
func TestPrivilegedRestartKeepsPacketsCut(t *testing.T) {
	f := liveFixture(t, false)
	h := privtest.NewHost(t)
	killed, revoked := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "tcp", h.V4)
	allowKilled := dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{hostRule(h.V4, portRule(dataplane.ProtoTCP, killed.Addr.Port()))}}
	allowRevoked := dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{hostRule(h.V4, portRule(dataplane.ProtoTCP, revoked.Addr.Port()))}}
	a := f.agent(t, "killed", 10, allowKilled)
	b := f.agent(t, "revoked", 11, allowRevoked)
	privtest.StartStream(t, a, "tcp", killed.Addr.String())
	privtest.StartStream(t, b, "tcp", revoked.Addr.String())
	killed.WaitReceiving(t)
	revoked.WaitReceiving(t)
	before := attachedAt(t, f.parent, ebpf.AttachCGroupInetEgress)

	if err := f.k.SetFlags(10, dataplane.AgentActive|dataplane.AgentKilled); err != nil {
		t.Fatal(err)
	}
	if err := f.k.Install(11, &dataplane.RuleSet{Generation: 2, Exec: execs(f.self)}); err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	time.Sleep(50 * time.Millisecond)
	f.k.Close()
	privtest.QuietAfter(t, "the killed stream without tetherd", killed, at, 0)
	privtest.QuietAfter(t, "the revoked stream without tetherd", revoked, at, 0)
	f.k = openKernel(t, f.pin, Options{NoSockDestroy: true})
	if err := f.k.AttachParent(f.parent); err != nil {
		t.Fatal(err)
	}
	after := attachedAt(t, f.parent, ebpf.AttachCGroupInetEgress)
	if len(before) != 1 || len(after) != 1 || after[0] == before[0] {
		t.Errorf("egress programs at the parent: before %v, after %v; want one, replaced", before, after)
	}
	privtest.QuietAfter(t, "the killed stream after the restart", killed, at, 0)
	privtest.QuietAfter(t, "the revoked stream after the restart", revoked, at, 0)

	if err := f.k.SetFlags(10, dataplane.AgentActive); err != nil {
		t.Fatal(err)
	}
	rs := allowRevoked
	rs.Generation, rs.Exec = 3, execs(f.self)
	if err := f.k.Install(11, &rs); err != nil {
		t.Fatal(err)
	}
	// Dropped since the kill, through a restart that loads every program again (seconds in the
	// QEMU guest), each stream resumes at its next retransmission: TCP has backed off meanwhile.
	killed.WaitReceivingWithin(t, 30*time.Second)
	revoked.WaitReceivingWithin(t, 30*time.Second)
}

// TestPrivilegedSweepFindsOtherNamespaces: an agent whose process lives in another network
// namespace than tetherd (a pod's, say) has its sockets terminated there: the sweep enters the
// namespaces of the agent's processes. The helper's threads other than the socket's may be in the
// test's namespace (setns moves one thread), which the sweep then iterates too.
func TestPrivilegedSweepFindsOtherNamespaces(t *testing.T) {
	sweepOtherNamespace(t, 12, privtest.StartStreamIn, 1)
}

// TestPrivilegedSweepFindsThreadNamespaces: an agent process whose socket was made by a thread
// that alone joined another network namespace (setns applies to one thread; /proc/PID/ns/net
// names the first thread's) has that socket terminated too: the sweep enters the namespace of
// every thread of the agent's processes.
func TestPrivilegedSweepFindsThreadNamespaces(t *testing.T) {
	sweepOtherNamespace(t, 13, privtest.StartStreamInThread, 2)
}

// sweepOtherNamespace connects an agent in slot to a peer in a test host's namespace with start,
// revokes the peer, and checks that the sweep terminated the stream, iterating at least
// namespaces namespaces.
func sweepOtherNamespace(t *testing.T, slot dataplane.Slot, start func(testing.TB, *privtest.Host, string, string, string) *privtest.Stream, namespaces int) {
	if noSockDestroyExpected() {
		checkNoSockDestroy(t)
		return
	}
	f := liveFixture(t, true)
	h := privtest.NewHost(t)
	peer := h.ListenPeer(t, "tcp", h.V4)
	agent := f.agent(t, "agent", slot, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{
		hostRule(h.V4, portRule(dataplane.ProtoTCP, peer.Addr.Port())),
	}})
	s := start(t, h, agent, "tcp", peer.Addr.String())
	peer.WaitReceiving(t)
	if err := f.k.Install(slot, &dataplane.RuleSet{Generation: 2, Exec: execs(f.self)}); err != nil {
		t.Fatal(err)
	}
	res, err := f.k.Sweep(slot)
	if err != nil {
		t.Fatal(err)
	}
	s.Ended(t, "the stream in the other namespace", "tcp", true)
	if res.Namespaces < namespaces {
		t.Errorf("the sweep iterated %d namespaces, want at least %d", res.Namespaces, namespaces)
	}
}

// TestPrivilegedClearCutsLiveSockets: an agent removed from its slot (unregistered, its identity
// gone) keeps no connection: its sockets are terminated while they are still known as its, and
// a socket left over is attributed again by its cgroup, which is now no agent's (denied by
// default, as its connects are).
func TestPrivilegedClearCutsLiveSockets(t *testing.T) {
	liveModes(t, func(t *testing.T, destroy bool) {
		f := liveFixture(t, destroy)
		h := privtest.NewHost(t)
		tcp := h.ListenPeer(t, "tcp", h.V4)
		agent := f.agent(t, "agent", 13, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{hostRule(h.V4, portRule(dataplane.ProtoTCP, tcp.Addr.Port()))}})
		events := f.events(t)
		s := privtest.StartStream(t, agent, "tcp", tcp.Addr.String())
		tcp.WaitReceiving(t)
		if err := f.k.Clear(13); err != nil {
			t.Fatal(err)
		}
		at := time.Now()
		privtest.QuietAfter(t, "the stream of the cleared agent", tcp, at, 0)
		s.Ended(t, "the stream of the cleared agent", "tcp", destroy)
		want := dataplane.KindTerminate
		if !destroy {
			want = dataplane.KindPacket
		}
		e := events.wait(t, "the cleared agent's socket", func(e dataplane.Event) bool { return e.Kind == want && e.Port == tcp.Addr.Port() })
		if e.Verdict != dataplane.VerdictDeny {
			t.Errorf("record %+v, want a deny", e)
		}
	})
}

// TestPrivilegedNonAgentsUnderParentUnaffected: a process below the agent parent that is in no
// agent (a pod that is not one, where unknown cgroups are allowed) streams on while agents beside
// it have their rule sets changed, are killed and cleared: the egress program never drops what
// it sends.
func TestPrivilegedNonAgentsUnderParentUnaffected(t *testing.T) {
	f := newFixture(t, Options{UnknownCgroupAllow: true})
	h := privtest.NewHost(t)
	tcp, udp, other := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "udp", h.V4), h.ListenPeer(t, "tcp", h.V4)
	bystander, _ := privtest.SubCgroup(t, f.parent, "bystander")
	privtest.StartStream(t, bystander, "tcp", tcp.Addr.String())
	privtest.StartStream(t, bystander, "udp", udp.Addr.String())
	tcp.WaitReceiving(t)
	udp.WaitReceiving(t)

	agent := f.agent(t, "agent", 14, dataplane.RuleSet{Generation: 1, Egress: []dataplane.Egress{hostRule(h.V4, portRule(dataplane.ProtoTCP, other.Addr.Port()))}})
	privtest.StartStream(t, agent, "tcp", other.Addr.String())
	other.WaitReceiving(t)
	if err := f.k.Install(14, &dataplane.RuleSet{Generation: 2, Exec: execs(f.self)}); err != nil {
		t.Fatal(err)
	}
	if err := f.k.SetFlags(14, dataplane.AgentActive|dataplane.AgentKilled); err != nil {
		t.Fatal(err)
	}
	privtest.Flowing(t, "the bystander's tcp stream", tcp)
	privtest.Flowing(t, "the bystander's udp stream", udp)
	if err := f.k.Clear(14); err != nil {
		t.Fatal(err)
	}
	privtest.Flowing(t, "the bystander's tcp stream after the clear", tcp)
	privtest.Flowing(t, "the bystander's udp stream after the clear", udp)
}

// TestPrivilegedAuditModeLiveSockets: in audit mode nothing is cut. A connection the rules would
// deny is reported once, at its connect (not again for its packets); when its rule set changes, a
// connection the new one would not allow goes on, reported as a would-be termination.
func TestPrivilegedAuditModeLiveSockets(t *testing.T) {
	liveModes(t, func(t *testing.T, destroy bool) {
		f := liveFixture(t, destroy)
		h := privtest.NewHost(t)
		allowed, denied := h.ListenPeer(t, "tcp", h.V4), h.ListenPeer(t, "tcp", h.V4)
		agent := f.agent(t, "agent", 15, dataplane.RuleSet{Generation: 1, Mode: dataplane.ModeAudit, Egress: []dataplane.Egress{
			hostRule(h.V4, portRule(dataplane.ProtoTCP, allowed.Addr.Port())),
		}})
		events := f.events(t)
		privtest.StartStream(t, agent, "tcp", allowed.Addr.String())
		privtest.StartStream(t, agent, "tcp", denied.Addr.String())
		allowed.WaitReceiving(t)
		denied.WaitReceiving(t)
		events.wait(t, "the audit-deny of the connect", func(e dataplane.Event) bool {
			return e.Kind == dataplane.KindConnect4 && e.Verdict == dataplane.VerdictAudit && e.Port == denied.Addr.Port()
		})
		if err := f.k.Install(15, &dataplane.RuleSet{Generation: 2, Mode: dataplane.ModeAudit, Exec: execs(f.self)}); err != nil {
			t.Fatal(err)
		}
		if _, err := f.k.Sweep(15); err != nil {
			t.Fatal(err)
		}
		privtest.Flowing(t, "the revoked stream in audit mode", allowed)
		privtest.Flowing(t, "the denied stream in audit mode", denied)
		// Recorded by the sweep (terminate) or, when a packet came first, by the egress
		// program (packet): once, either way.
		e := events.wait(t, "the would-be termination", func(e dataplane.Event) bool {
			return (e.Kind == dataplane.KindTerminate || e.Kind == dataplane.KindPacket) && e.Port == allowed.Addr.Port()
		})
		if e.Verdict != dataplane.VerdictAudit || e.Reason != dataplane.ReasonRevoked || e.Generation != 2 {
			t.Errorf("record %+v, want audit-deny, revoked, generation 2", e)
		}
		events.mu.Lock()
		defer events.mu.Unlock()
		for _, e := range events.events {
			if e.Kind == dataplane.KindPacket && e.Port == denied.Addr.Port() && e.Generation == 1 {
				t.Errorf("the audited connect's packets were reported again: %+v", e)
			}
		}
	})
}

package kernel

import (
	"net"
	"net/netip"
	"syscall"
	"testing"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

func port(t *testing.T, a net.Addr) uint16 {
	t.Helper()
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		t.Fatal(err)
	}
	return ap.Port()
}

func hostPort(a netip.Addr, p uint16) string { return netip.AddrPortFrom(a, p).String() }

// TestPrivilegedEgress checks connect and sendmsg verdicts for TCP and UDP over IPv4 and IPv6,
// and that an IPv4 destination written as ::ffff:a.b.c.d gets the IPv4 verdict.
func TestPrivilegedEgress(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	tcpOK4, tcpNo4 := port(t, h.ListenTCP(t, h.V4).Addr()), port(t, h.ListenTCP(t, h.V4).Addr())
	tcpOK6, tcpNo6 := port(t, h.ListenTCP(t, h.V6).Addr()), port(t, h.ListenTCP(t, h.V6).Addr())
	udpOK4, udpNo4 := port(t, h.ListenUDP(t, h.V4).LocalAddr()), port(t, h.ListenUDP(t, h.V4).LocalAddr())
	udpOK6, udpNo6 := port(t, h.ListenUDP(t, h.V6).LocalAddr()), port(t, h.ListenUDP(t, h.V6).LocalAddr())

	v4 := netip.PrefixFrom(h.V4, 32)
	v6 := netip.PrefixFrom(h.V6, 128)
	agent := f.agent(t, "agent", 1, dataplane.RuleSet{Generation: 7, Egress: []dataplane.Egress{
		{Prefix: v4, Ports: []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: tcpOK4, Hi: tcpOK4}, {Proto: dataplane.ProtoUDP, Lo: udpOK4, Hi: udpOK4}}},
		{Prefix: v6, Ports: []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: tcpOK6, Hi: tcpOK6}, {Proto: dataplane.ProtoUDP, Lo: udpOK6, Hi: udpOK6}}},
	}})
	events := f.events(t)

	got := privtest.Dial(t, agent,
		"tcp", hostPort(h.V4, tcpOK4), "tcp", hostPort(h.V4, tcpNo4),
		"tcp", hostPort(h.V6, tcpOK6), "tcp", hostPort(h.V6, tcpNo6),
		"udp", hostPort(h.V4, udpOK4), "udp", hostPort(h.V4, udpNo4),
		"udp", hostPort(h.V6, udpOK6), "udp", hostPort(h.V6, udpNo6),
		"udpsend", hostPort(h.V4, udpOK4), "udpsend", hostPort(h.V4, udpNo4),
		"udpsend", hostPort(h.V6, udpOK6), "udpsend", hostPort(h.V6, udpNo6),
		// The protocol matters: the TCP port over UDP is denied.
		"udpsend", hostPort(h.V4, tcpOK4),
		"tcp4mapped", hostPort(h.V4, tcpOK4), "tcp4mapped", hostPort(h.V4, tcpNo4),
		"udp4mapped", hostPort(h.V4, udpOK4), "udp4mapped", hostPort(h.V4, udpNo4),
	)
	expect(t, "verdicts", got, []string{
		"ok", "eperm", "ok", "eperm",
		"ok", "eperm", "ok", "eperm",
		"ok", "eperm", "ok", "eperm",
		"eperm",
		"ok", "eperm", "ok", "eperm",
	})

	e := events.wait(t, "deny of tcp connect to the denied IPv4 port", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindConnect4 && e.Verdict == dataplane.VerdictDeny && e.Port == tcpNo4
	})
	if e.Addr != h.V4 || e.Slot != 1 || e.Generation != 7 || e.Reason != dataplane.ReasonNoRule || e.Proto != dataplane.ProtoTCP {
		t.Errorf("deny event: %+v", e)
	}
	if e.Binary != f.self {
		t.Errorf("deny event names binary %+v, want the test binary %+v", e.Binary, f.self)
	}
	events.wait(t, "deny of v4-mapped connect", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindConnect6 && e.Verdict == dataplane.VerdictDeny && e.Port == tcpNo4 && e.Addr == h.V4
	})
	events.wait(t, "sampled allow of udp sendmsg over IPv6", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindSendmsg6 && e.Verdict == dataplane.VerdictAllow && e.Port == udpOK6 && e.Addr == h.V6
	})

	counts, err := f.k.AgentCounts(1)
	if err != nil {
		t.Fatal(err)
	}
	if n := counts[dataplane.KindConnect4][dataplane.VerdictDeny]; n < 1 {
		t.Errorf("connect4 denies counted: %d", n)
	}
	// Allows are counted per CPU (tether_agent_allows): 2 connects and 1 datagram over IPv4.
	if n := counts[dataplane.KindConnect4][dataplane.VerdictAllow]; n < 2 {
		t.Errorf("connect4 allows counted: %d, want at least 2", n)
	}
	if n := counts[dataplane.KindSendmsg4][dataplane.VerdictAllow]; n < 1 {
		t.Errorf("sendmsg4 allows counted: %d, want at least 1", n)
	}
}

// TestPrivilegedPortRangesAndPrefixes checks port ranges, "any" protocol, and that the most
// specific prefix carries what the compiler merged into it.
func TestPrivilegedPortRangesAndPrefixes(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	ports := make([]uint16, 3)
	for i := range ports {
		ports[i] = port(t, h.ListenTCP(t, h.V4).Addr())
	}
	lo, hi := min(ports[0], ports[1]), max(ports[0], ports[1])
	agent := f.agent(t, "agent", 2, dataplane.RuleSet{Egress: []dataplane.Egress{
		{Prefix: prefix("198.18.0.0/15"), Ports: []dataplane.PortRule{{Lo: lo, Hi: hi}}},
	}})
	got := privtest.Dial(t, agent, "tcp", hostPort(h.V4, ports[0]), "tcp", hostPort(h.V4, ports[1]), "tcp", hostPort(h.V4, ports[2]))
	want := []string{"ok", "ok", "eperm"}
	if ports[2] > lo && ports[2] < hi {
		want[2] = "ok"
	}
	expect(t, "port range", got, want)
}

// TestPrivilegedOutsideAgents checks that processes outside agents are not affected, and that a
// cgroup under the agent parent bound to no agent gets the default (deny).
func TestPrivilegedOutsideAgents(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p := port(t, h.ListenTCP(t, h.V4).Addr())
	f.agent(t, "agent", 3, dataplane.RuleSet{})

	outside := privtest.Cgroup(t) // a sibling of the agent parent
	expect(t, "outside the agent parent", privtest.Dial(t, outside, "tcp", hostPort(h.V4, p), "socket", "raw4"), []string{"ok", "ok"})
	expect(t, "the test process's own cgroup", privtest.Dial(t, "", "tcp", hostPort(h.V4, p)), []string{"ok"})

	unbound, _ := privtest.SubCgroup(t, f.parent, "unbound")
	expect(t, "unbound cgroup under the parent", privtest.Dial(t, unbound, "tcp", hostPort(h.V4, p)), []string{"eperm"})
	c, err := f.k.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.UnknownCgroup == 0 {
		t.Error("unknown-cgroup counter did not move")
	}
}

// TestPrivilegedNestedCgroups checks that children of an agent cgroup inherit its rule set.
func TestPrivilegedNestedCgroups(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	ok, no := port(t, h.ListenTCP(t, h.V4).Addr()), port(t, h.ListenTCP(t, h.V4).Addr())
	agent := f.agent(t, "agent", 4, dataplane.RuleSet{Egress: []dataplane.Egress{
		{Prefix: netip.PrefixFrom(h.V4, 32), Ports: []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: ok, Hi: ok}}},
	}})
	deep := agent
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		deep, _ = privtest.SubCgroup(t, deep, name)
	}
	expect(t, "five levels below the agent", privtest.Dial(t, deep, "tcp", hostPort(h.V4, ok), "tcp", hostPort(h.V4, no)), []string{"ok", "eperm"})
}

// TestPrivilegedAuditMode checks that audit mode allows what enforce mode would deny and reports
// it as a would-deny.
func TestPrivilegedAuditMode(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p := port(t, h.ListenTCP(t, h.V4).Addr())
	agent := f.agent(t, "agent", 5, dataplane.RuleSet{Mode: dataplane.ModeAudit, Generation: 3})
	events := f.events(t)
	expect(t, "audit mode", privtest.Dial(t, agent, "tcp", hostPort(h.V4, p)), []string{"ok"})
	e := events.wait(t, "audit-deny event", func(e dataplane.Event) bool { return e.Slot == 5 && e.Port == p })
	if e.Verdict != dataplane.VerdictAudit || e.Generation != 3 {
		t.Errorf("event %+v: want verdict audit-deny of generation 3", e)
	}
}

// TestPrivilegedKilled checks that the killed flag denies what the rule set allows, at once, and
// that clearing it restores the rule set's verdicts.
func TestPrivilegedKilled(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p := port(t, h.ListenTCP(t, h.V4).Addr())
	agent := f.agent(t, "agent", 6, dataplane.RuleSet{Mode: dataplane.ModeAudit, Egress: []dataplane.Egress{
		{Prefix: netip.PrefixFrom(h.V4, 32), Ports: []dataplane.PortRule{{Lo: p, Hi: p}}},
	}})
	expect(t, "before", privtest.Dial(t, agent, "tcp", hostPort(h.V4, p)), []string{"ok"})
	if err := f.k.SetFlags(6, dataplane.AgentActive|dataplane.AgentKilled); err != nil {
		t.Fatal(err)
	}
	// Even in audit mode, and for exec too: the helper itself is not allowed to start.
	cmd := privtest.Command(t, agent, "dial", "tcp", hostPort(h.V4, p))
	out, err := cmd.Output()
	if !execDenied(err) {
		t.Errorf("exec of an allowed binary by a killed agent: output %q, error %v; want it denied", out, err)
	}
	if err := f.k.SetFlags(6, dataplane.AgentActive); err != nil {
		t.Fatal(err)
	}
	expect(t, "after", privtest.Dial(t, agent, "tcp", hostPort(h.V4, p)), []string{"ok"})
}

// TestPrivilegedBinaryRule checks a port rule restricted to one calling binary.
func TestPrivilegedBinaryRule(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p := port(t, h.ListenTCP(t, h.V4).Addr())
	other := dataplane.FileID{Dev: f.self.Dev, Ino: f.self.Ino + 1}
	a := f.agent(t, "self", 7, dataplane.RuleSet{Egress: []dataplane.Egress{
		{Prefix: netip.PrefixFrom(h.V4, 32), Ports: []dataplane.PortRule{{Lo: p, Hi: p, Binary: f.self}}},
	}})
	b := f.agent(t, "other", 8, dataplane.RuleSet{Egress: []dataplane.Egress{
		{Prefix: netip.PrefixFrom(h.V4, 32), Ports: []dataplane.PortRule{{Lo: p, Hi: p, Binary: other}}},
	}})
	expect(t, "rule for the calling binary", privtest.Dial(t, a, "tcp", hostPort(h.V4, p)), []string{"ok"})
	expect(t, "rule for another binary", privtest.Dial(t, b, "tcp", hostPort(h.V4, p)), []string{"eperm"})
}

// TestPrivilegedSocketTypes checks that agents cannot open IP sockets whose traffic the address
// hooks do not see (raw, ICMP). cgroup/sock_create runs for AF_INET and AF_INET6 only: packet
// sockets are kept from agents by dropping CAP_NET_RAW (tetherctl run does).
//
// MPTCP is refused too (the kernel opens its further subflows to addresses the peer announces,
// past the connect hooks), and its record names protocol 262, not its low byte 6, which read as
// TCP (Go 1.24 and later try MPTCP first for every listener, then fall back to TCP).
func TestPrivilegedSocketTypes(t *testing.T) {
	f := newFixture(t, Options{})
	agent := f.agent(t, "agent", 9, dataplane.RuleSet{})
	events := f.events(t)
	got := privtest.Dial(t, agent, "socket", "raw4", "socket", "icmp4", "socket", "tcp4", "socket", "udp6", "socket", "mptcp4")
	// An ICMP datagram socket may already fail with EACCES (net.ipv4.ping_group_range).
	if got[1] == "error:permission_denied" {
		got[1] = "eperm"
	}
	mptcp := got[4] != "error:protocol_not_supported"
	if !mptcp {
		t.Logf("this kernel has no MPTCP (%s): its socket is not checked", got[4])
		got[4] = "eperm"
	}
	expect(t, "socket kinds", got, []string{"eperm", "eperm", "ok", "ok", "eperm"})
	if mptcp {
		e := events.wait(t, "the MPTCP socket's record", func(e dataplane.Event) bool {
			return e.Kind == dataplane.KindSocket && e.Slot == 9 && e.Family == syscall.AF_INET && e.SockType == syscall.SOCK_STREAM && e.Proto == 262&0xff
		})
		if e.SockProto != 262 || e.Verdict != dataplane.VerdictDeny || e.Reason != dataplane.ReasonSocketType {
			t.Errorf("MPTCP socket record: protocol %d, %v %v; want 262, deny socket-type", e.SockProto, e.Verdict, e.Reason)
		}
	}
}

// TestPrivilegedRebindInvalidatesCache checks that the programs' per-CPU cache of cgroup -> slot
// answers follows every binding change: the same cgroup unbound, then bound to another agent.
func TestPrivilegedRebindInvalidatesCache(t *testing.T) {
	f := newFixture(t, Options{})
	h := privtest.NewHost(t)
	p, q := port(t, h.ListenTCP(t, h.V4).Addr()), port(t, h.ListenTCP(t, h.V4).Addr())
	only := func(port uint16) dataplane.RuleSet {
		return dataplane.RuleSet{Egress: []dataplane.Egress{{Prefix: netip.PrefixFrom(h.V4, 32), Ports: []dataplane.PortRule{{Lo: port, Hi: port}}}}}
	}
	cg := f.agent(t, "agent", 20, only(p))
	id, err := cgroupID(cg)
	if err != nil {
		t.Fatal(err)
	}
	other := only(q)
	other.Exec = execs(f.self)
	if err := f.k.Install(21, &other); err != nil {
		t.Fatal(err)
	}
	if err := f.k.SetFlags(21, dataplane.AgentActive); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.k.Clear(21) })
	dial := func() []string { return privtest.Dial(t, cg, "tcp", hostPort(h.V4, p), "tcp", hostPort(h.V4, q)) }
	for range 3 { // every CPU may have cached the answer
		expect(t, "bound to the first agent", dial(), []string{"ok", "eperm"})
	}
	if err := f.k.Unbind(id); err != nil {
		t.Fatal(err)
	}
	// Unbound, the cgroup is under the agent parent and in no agent: denied. (The exec of the
	// helper is not: the exec program leaves processes outside agents alone.)
	expect(t, "unbound", dial(), []string{"eperm", "eperm"})
	if err := f.k.Bind(id, 21); err != nil {
		t.Fatal(err)
	}
	expect(t, "bound to the second agent", dial(), []string{"eperm", "ok"})
}

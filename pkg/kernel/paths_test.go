package kernel

import (
	"net/netip"
	"testing"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// pathRules are n /32 host rules (port 9000), a /24 and a /16 range (port 443), and the host
// 127.0.0.1:7000, all TCP.
func pathRules(n int) dataplane.RuleSet {
	var rs dataplane.RuleSet
	tcp := func(p netip.Prefix, port uint16) dataplane.Egress {
		return dataplane.Egress{Prefix: p, Ports: []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: port, Hi: port}}}
	}
	for i := range n {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		rs.Egress = append(rs.Egress, tcp(netip.PrefixFrom(a, 32), 9000))
	}
	rs.Egress = append(rs.Egress, tcp(prefix("172.31.7.0/24"), 443), tcp(prefix("172.30.0.0/16"), 443),
		tcp(prefix("127.0.0.1/32"), 7000))
	return rs
}

// TestPrivilegedPaths runs connect4 and sendmsg4 in the emulator on the maps the real kernel
// holds for an agent of 10,000 host rules: every path decides as the kernel does, and the
// paths tether's hot path depends on stay within their instruction budgets.
func TestPrivilegedPaths(t *testing.T) {
	f := newFixture(t, Options{AllowSample: 100})
	path := f.agent(t, "paths", 0, pathRules(10000))
	id, err := cgroupID(path)
	if err != nil {
		t.Fatal(err)
	}
	_, unbound := privtest.SubCgroup(t, f.parent, "unbound")

	p, err := f.k.Paths()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// budget: the most instructions the path may take (what it takes today, with a little room):
	// a change that makes the hot path longer fails here and has to say why. The DNS proxy's port
	// check (53 or 853: lib/dns.h) added 5 to every connect4 path and 7 to sendmsg4's.
	cases := []struct {
		name    string
		hook    string
		cgroup  uint64
		dst     string
		verdict uint64
		event   bool
		budget  int
	}{
		{"allowed host rule", "connect4", id, "127.0.0.1:7000", 1, false, 310},
		{"allowed host rule, 10,000th", "connect4", id, "10.0.39.15:9000", 1, false, 310},
		{"allowed range rule (/24)", "connect4", id, "172.31.7.9:443", 1, false, 390},
		{"allowed range rule (/16)", "connect4", id, "172.30.200.1:443", 1, false, 390},
		{"denied: no rule", "connect4", id, "192.0.2.1:443", 0, true, 475},
		{"denied: wrong port", "connect4", id, "127.0.0.1:7001", 0, true, 435},
		{"unknown cgroup under the parent", "connect4", unbound, "127.0.0.1:7000", 0, true, 285},
		{"sendmsg4 allowed host rule", "sendmsg4", id, "127.0.0.1:7000", 1, false, 240},
		{"sendmsg4 denied", "sendmsg4", id, "192.0.2.1:443", 0, true, 470},
	}
	for _, c := range cases {
		call := SockCall{Hook: c.hook, Cgroup: c.cgroup, UnderParent: true, Tgid: 1, Proto: 6, Dst: netip.MustParseAddrPort(c.dst)}
		// The first call of a process fills the per-CPU slot cache; the common path is the next.
		if _, err := p.Run(call); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		events := p.Events()
		got, err := p.Run(call)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		t.Logf("%-36s %4d instructions, %2d helper calls, %2d lookups", c.name, got.Insns, got.Helpers, got.Lookups)
		if got.Verdict != c.verdict {
			t.Errorf("%s: verdict %d, want %d (the kernel's)", c.name, got.Verdict, c.verdict)
		}
		if emitted := p.Events() > events; emitted != c.event {
			t.Errorf("%s: event emitted %v, want %v", c.name, emitted, c.event)
		}
		if got.Insns < 20 {
			t.Errorf("%s: %d instructions: the emulator did not run the program", c.name, got.Insns)
		}
		if got.Insns > c.budget {
			t.Errorf("%s: %d instructions, over its budget of %d", c.name, got.Insns, c.budget)
		}
	}
}

// TestPrivilegedMapMemory: the maps' memory is read from the kernel, every map of the load and
// the agents' tries counted once, and an agent's rule set shows in its tries.
func TestPrivilegedMapMemory(t *testing.T) {
	f := newFixture(t, Options{})
	before, err := f.k.MapMemory()
	if err != nil {
		t.Fatal(err)
	}
	if before.Agents != 0 || before.PerSlot == 0 || before.Maps[bpfMapTetherHosts] == 0 {
		t.Fatalf("before any agent: %+v", before)
	}
	rs := pathRules(10)
	for i := range 200 { // ranges of many lengths: they live in the trie
		rs.Egress = append(rs.Egress, dataplane.Egress{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{100, byte(i), 0, 0}), 16+i%8),
			Ports: []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: 443, Hi: 443}}})
	}
	f.agent(t, "memory", 3, rs)
	after, err := f.k.MapMemory()
	if err != nil {
		t.Fatal(err)
	}
	var sum uint64
	for _, n := range after.Maps {
		sum += n
	}
	if after.Agents != 1 || sum != after.Total || after.PerAgentRules <= before.PerAgentRules || after.Maps["rule_set_tries"] < 200*16 {
		t.Fatalf("after an agent of 210 rules: %+v (sum of maps %d)", after, sum)
	}
	t.Logf("total %d bytes, %d a slot, %d for the agent's tries", after.Total, after.PerSlot, after.PerAgentRules)
}

// TestPrivilegedTestRunSkb runs the egress and ingress programs in the kernel with
// BPF_PROG_TEST_RUN on a UDP packet of a socket no agent connected: both let it pass, and each
// run is timed against an empty program.
func TestPrivilegedTestRunSkb(t *testing.T) {
	f := newFixture(t, Options{})
	for _, hook := range []string{"egress_skb", "ingress_skb"} {
		verdict, prog, empty, err := f.k.TestRunSkb(hook, udpPacket(), 1000)
		if err != nil {
			t.Fatal(err)
		}
		if verdict != 1 {
			t.Errorf("%s: verdict %d on a packet of a socket no agent has, want 1 (pass)", hook, verdict)
		}
		if prog <= 0 || empty <= 0 {
			t.Errorf("%s: run times %s and %s", hook, prog, empty)
		}
		t.Logf("%s: %s a run, the empty program %s", hook, prog, empty)
	}
}

// udpPacket is an IPv4 UDP packet from 10.0.0.1:40000 to 10.0.0.2:53 with 8 bytes of payload,
// preceded by the 14-byte Ethernet header BPF_PROG_TEST_RUN takes for skb programs.
func udpPacket() []byte {
	p := make([]byte, 14+20+8+8)
	p[12], p[13] = 0x08, 0x00 // IPv4
	ip := p[14:]
	ip[0], ip[2], ip[3], ip[8], ip[9] = 0x45, 0, byte(len(ip)), 64, 17
	copy(ip[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	udp := ip[20:]
	udp[0], udp[1], udp[2], udp[3], udp[5] = 0x9c, 0x40, 0, 53, 16
	return p
}

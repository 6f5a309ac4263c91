package e2e

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/dnstest"
	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/events"
)

// dnsScene is a tetherd with its DNS proxy on, asking a test DNS server, whose agent is granted
// svc.e2e.test on the first host's port and *.wild.e2e.test on the second's.
type dnsScene struct {
	d          *tetherd
	dns        *dnstest.Server
	h1, h2     *privtest.Host
	cg         string
	svc1, svc2 string // svc.e2e.test's port on each host
	wild2      string // the wildcard's port on the second host
}

func newDNSScene(t *testing.T, proxy string) *dnsScene {
	return newDNSSceneWith(t, proxy, false)
}

// newDNSSceneWith is newDNSScene; pods: the DNS server listens at port 53 of our side of the
// first host's veth pair (reached from the host's namespace, where the test's pod agent lives),
// and the agent is granted it (as a pod is its cluster's DNS server).
func newDNSSceneWith(t *testing.T, proxy string, pods bool) *dnsScene {
	s := &dnsScene{h1: privtest.NewHost(t), h2: privtest.NewHost(t)}
	p1, _ := tcpPort(t, s.h1)
	p2, _ := tcpPort(t, s.h2)
	p2svc, _ := tcpPort(t, s.h2) // svc.e2e.test's port on the second host
	s.svc1 = netip.AddrPortFrom(s.h1.V4, p1).String()
	s.svc2 = netip.AddrPortFrom(s.h2.V4, p2svc).String()
	s.wild2 = netip.AddrPortFrom(s.h2.V4, p2).String()
	egress := []any{
		map[string]any{"fqdn": "svc.e2e.test", "ports": []int{int(p1), int(p2svc)}, "protocol": "tcp"},
		map[string]any{"fqdn": "*.wild.e2e.test", "ports": []int{int(p2)}, "protocol": "tcp"},
	}
	if pods {
		s.dns = dnstest.StartAt(t, netip.AddrPortFrom(s.h1.Ours4, 53))
		for _, proto := range []string{"udp", "tcp"} {
			egress = append(egress, map[string]any{"cidr": s.h1.Ours4.String() + "/32", "ports": []int{53}, "protocol": proto})
		}
	} else {
		s.dns = dnstest.Start(t)
	}
	s.dns.Set("svc.e2e.test", 0, s.h1.V4) // TTL 0: the proxy keeps no answer, each query asks
	s.dns.Set("a.wild.e2e.test", 0, s.h2.V4)
	s.dns.Set("evil.e2e.test", 0, s.h2.V4)
	s.dns.Set("c2VjcmV0.evil.e2e.test", 0, s.h2.V4)
	self := privtest.AgentBinary(t)
	s.d = newTetherd(t, profile{"egress": egress, "exec": []string{self}})
	s.d.extra = fmt.Sprintf("dns:\n  server: %s\n  proxy:\n    enabled: true\n    deny_dot: true\n    state_file: %s\n%s",
		s.dns.Addr, filepath.Join(s.d.dir, "dns-state.json"), proxy)
	s.d.writeConfig()
	s.d.start()
	s.cg = s.d.sleeper()
	return s
}

// TestPrivilegedDNSProxyPods: an agent in another network namespace (a pod's) whose policy
// grants it its DNS server. The attack first: without the proxy's remote addresses its DNS goes
// to that server as sent, data in query names included. With them (tetherd restarted, as a
// configuration change needs), the same query is the proxy's and refused, unseen by the server;
// a granted name is answered (UDP, and TCP with EDNS0 through an IPv6 resolver address) as from
// the resolver the agent asked, and its answer is granted.
func TestPrivilegedDNSProxyPods(t *testing.T) {
	s := newDNSSceneWith(t, "", true)
	d, cg, pod := s.d, s.cg, s.h1
	const secret = "c2VjcmV0.evil.e2e.test"
	asked := s.dns.Queries()
	a := privtest.AskDNSIn(t, pod, cg, "udp", s.dns.Addr, secret, "A", false)
	if a.Rcode != "NOERROR" || s.dns.Queries() == asked {
		t.Fatalf("negative control: without remote addresses a pod's DNS should reach its server unfiltered; got %+v, %d queries", a, s.dns.Queries()-asked)
	}

	d.kill9()
	d.extra += fmt.Sprintf("    remote_addresses: [%q, %q]\n", pod.Ours4, pod.Ours6)
	d.writeConfig()
	d.start()
	asked = s.dns.Queries()
	for _, network := range []string{"udp", "tcp"} {
		a = privtest.AskDNSIn(t, pod, cg, network, s.dns.Addr, secret, "A", false)
		if a.Rcode != "REFUSED" || a.From != s.dns.Addr {
			t.Errorf("an ungranted name from the pod over %s: %+v, want REFUSED from %s", network, a, s.dns.Addr)
		}
	}
	if n := s.dns.Queries() - asked; n != 0 {
		t.Errorf("the server got %d queries for an ungranted name from the pod", n)
	}
	if got := privtest.DialIn(t, pod, cg, "tcp", s.svc1); !slices.Equal(got, []string{"eperm"}) {
		t.Fatalf("before any query, svc.e2e.test's address from the pod: %v, want eperm", got)
	}
	a = privtest.AskDNSIn(t, pod, cg, "udp", "192.0.2.53:53", "svc.e2e.test", "A", false)
	if a.Rcode != "NOERROR" || !slices.Equal(a.Answers, []string{s.h1.V4.String()}) || a.From != "192.0.2.53:53" {
		t.Fatalf("svc.e2e.test over UDP from 192.0.2.53, in the pod: %+v", a)
	}
	if got := privtest.DialIn(t, pod, cg, "tcp", s.svc1); !slices.Equal(got, []string{"ok"}) {
		t.Fatalf("svc.e2e.test's answered address from the pod: %v", got)
	}
	a = privtest.AskDNSIn(t, pod, cg, "tcp", "[2001:db8::53]:53", "svc.e2e.test", "A", true)
	if a.Rcode != "NOERROR" || !slices.Equal(a.Answers, []string{s.h1.V4.String()}) || a.From != "[2001:db8::53]:53" || !a.EDNS {
		t.Fatalf("svc.e2e.test over TCP (EDNS0) from [2001:db8::53], in the pod: %+v", a)
	}
	d.decision("a dns record of the pod's refused query", func(r events.Decision) bool {
		return r.Kind == events.KindDNS && r.DNS != nil && r.DNS.Name == secret && r.Verdict == events.VerdictDeny && r.SpiffeID == agentID
	})
}

// TestPrivilegedDNSProxy: an agent's DNS goes to tetherd's proxy whatever resolver it asks, over
// UDP and TCP, with EDNS0; the answer comes from the resolver it asked; a granted name's answer
// is its grant before it is its answer, even when the server answers differently each time; an
// ungranted name never reaches the server, and its address, learnt elsewhere, stays denied;
// DNS over TLS is denied; every query is a record; learnt addresses end with their TTL and grace.
func TestPrivilegedDNSProxy(t *testing.T) {
	s := newDNSScene(t, "    min_ttl: 5s\n    grace: 2s\n")
	d, cg := s.d, s.cg
	if got := privtest.Dial(t, cg, "tcp", s.svc1); !slices.Equal(got, []string{"eperm"}) {
		t.Fatalf("before any query, svc.e2e.test's address: %v, want eperm", got)
	}

	// Any resolver address: 192.0.2.53 (TEST-NET-1) exists nowhere.
	a := privtest.AskDNS(t, cg, "udp", "192.0.2.53:53", "svc.e2e.test", "A", false)
	if a.Rcode != "NOERROR" || !slices.Equal(a.Answers, []string{s.h1.V4.String()}) || a.From != "192.0.2.53:53" {
		t.Fatalf("svc.e2e.test over UDP from 192.0.2.53: %+v", a)
	}
	// The answer's address is granted by the time the agent has the answer: no wait.
	if got := privtest.Dial(t, cg, "tcp", s.svc1); !slices.Equal(got, []string{"ok"}) {
		t.Fatalf("svc.e2e.test's answered address right after the answer: %v", got)
	}

	// The server now answers the name with another address (round robin, geo DNS): the agent's
	// answer is what is granted. Over TCP, with EDNS0, through an IPv6 resolver address.
	s.dns.Set("svc.e2e.test", 0, s.h2.V4)
	a = privtest.AskDNS(t, cg, "tcp", "[2001:db8::53]:53", "svc.e2e.test", "A", true)
	if a.Rcode != "NOERROR" || !slices.Equal(a.Answers, []string{s.h2.V4.String()}) || a.From != "[2001:db8::53]:53" || !a.EDNS {
		t.Fatalf("svc.e2e.test over TCP (EDNS0) from [2001:db8::53]: %+v", a)
	}
	if got := privtest.Dial(t, cg, "tcp", s.svc2, "tcp", s.svc1); !slices.Equal(got, []string{"ok", "ok"}) {
		t.Fatalf("both answered addresses of svc.e2e.test within their TTL: %v", got)
	}

	// An ungranted name: refused, and the query (data in its name) never reaches the server.
	asked := s.dns.Queries()
	a = privtest.AskDNS(t, cg, "udp", "192.0.2.53:53", "c2VjcmV0.evil.e2e.test", "A", false)
	if a.Rcode != "REFUSED" || len(a.Answers) != 0 {
		t.Errorf("an ungranted name: %+v, want REFUSED", a)
	}
	a = privtest.AskDNS(t, cg, "tcp", "192.0.2.53:53", "evil.e2e.test", "AAAA", false)
	if a.Rcode != "REFUSED" {
		t.Errorf("an ungranted name over TCP: %+v, want REFUSED", a)
	}
	if n := s.dns.Queries() - asked; n != 0 {
		t.Errorf("the server got %d queries for ungranted names", n)
	}
	// evil.e2e.test's address, learnt elsewhere, on the wildcard's port: denied until a name
	// the wildcard covers answers it.
	if got := privtest.Dial(t, cg, "tcp", s.wild2); !slices.Equal(got, []string{"eperm"}) {
		t.Errorf("the second host's wildcard port before the wildcard answered it: %v", got)
	}
	a = privtest.AskDNS(t, cg, "udp", "192.0.2.53:53", "a.wild.e2e.test", "A", false)
	if a.Rcode != "NOERROR" || !slices.Equal(a.Answers, []string{s.h2.V4.String()}) {
		t.Fatalf("a.wild.e2e.test: %+v", a)
	}
	if got := privtest.Dial(t, cg, "tcp", s.wild2); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("the wildcard's answer: %v", got)
	}
	// DNS over TLS is denied outright.
	if got := privtest.Dial(t, cg, "tcp", netip.AddrPortFrom(s.h1.V4, 853).String()); !slices.Equal(got, []string{"eperm"}) {
		t.Errorf("port 853: %v, want eperm", got)
	}

	checkDNSRecords(t, d)

	// Not asked again, the answers end with their TTL (5 s) and grace (2 s).
	asked1 := time.Now()
	waitForLong(t, 20*time.Second, "the learnt addresses to end", func() bool {
		return slices.Equal(privtest.Dial(t, cg, "tcp", s.svc1, "tcp", s.wild2), []string{"eperm", "eperm"})
	})
	t.Logf("learnt addresses ended %s after the last answer (TTL 5 s + grace 2 s)", time.Since(asked1).Round(time.Millisecond))
}

// checkDNSRecords checks the records and counts of TestPrivilegedDNSProxy's queries.
func checkDNSRecords(t *testing.T, d *tetherd) {
	allowed := d.decision("a dns record of the answered name", func(r events.Decision) bool {
		return r.Kind == events.KindDNS && r.DNS != nil && r.DNS.Name == "svc.e2e.test" && r.Verdict == events.VerdictAllow
	})
	t.Logf("answer to rule installed (the first answer of svc.e2e.test): %s", time.Duration(allowed.DNS.InstallNs))
	if allowed.DNS.InstallNs <= 0 {
		t.Errorf("the first answer of a name installed nothing: %+v", allowed.DNS)
	}
	if allowed.DNS.Grant != "svc.e2e.test" || allowed.DNS.Resolver == "" || len(allowed.DNS.Answers) != 1 || allowed.DNS.TTL != 5 || allowed.SpiffeID != agentID {
		t.Errorf("the record of an answered query: %+v %+v", allowed, allowed.DNS)
	}
	refused := d.decision("a dns record of the refused name", func(r events.Decision) bool {
		return r.Kind == events.KindDNS && r.DNS != nil && r.DNS.Name == "c2VjcmV0.evil.e2e.test"
	})
	if refused.Verdict != events.VerdictDeny || refused.Reason != "no-rule" || refused.DNS.Rcode != "REFUSED" {
		t.Errorf("the record of a refused query: %+v %+v", refused, refused.DNS)
	}
	st := d.status().DNSProxy
	if st == nil || st.Refused != 2 || st.Answered < 3 {
		t.Errorf("proxy status: %+v", st)
	}
}

// TestPrivilegedDNSProxyRestart: tetherd killed (SIGKILL) and started again. Agents' DNS works
// again as soon as it is ready (the same port, where the kernel still sends it); an address an
// agent was answered before is still granted, and ends with its TTL and grace as if tetherd had
// not gone.
func TestPrivilegedDNSProxyRestart(t *testing.T) {
	s := newDNSScene(t, "    min_ttl: 8s\n    grace: 2s\n")
	d, cg := s.d, s.cg
	a := privtest.AskDNS(t, cg, "udp", "192.0.2.53:53", "svc.e2e.test", "A", false)
	answered := time.Now()
	if a.Rcode != "NOERROR" || !slices.Equal(privtest.Dial(t, cg, "tcp", s.svc1), []string{"ok"}) {
		t.Fatalf("svc.e2e.test before the restart: %+v", a)
	}
	port := d.status().DNSProxy.Listen
	d.kill9()
	d.start()
	ready := time.Now()
	for {
		a = privtest.AskDNS(t, cg, "udp", "192.0.2.53:53", "a.wild.e2e.test", "A", false)
		if a.Rcode == "NOERROR" {
			break
		}
		if time.Since(ready) > 5*time.Second {
			t.Fatalf("no DNS 5 s after tetherd was ready again: %+v", a)
		}
	}
	if took := time.Since(ready); took > time.Second {
		t.Errorf("DNS answered again %s after tetherd was ready, want within a second", took)
	}
	if since := time.Since(answered); since > 7*time.Second {
		t.Fatalf("the restart took %s: past the answer's TTL (8 s) before it could be checked (in an emulated guest, run this test on the host)", since)
	}
	if got := d.status().DNSProxy.Listen; got != port {
		t.Errorf("the proxy listens on %s after the restart, before on %s", got, port)
	}
	if got := privtest.Dial(t, cg, "tcp", s.svc1); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("the address answered before the restart, within its TTL: %v", got)
	}
	waitForLong(t, 30*time.Second, "the address answered before the restart to end", func() bool {
		return slices.Equal(privtest.Dial(t, cg, "tcp", s.svc1), []string{"eperm"})
	})
	// TTL 8 s and grace 2 s; a second of slack for the test's own dials.
	if held := time.Since(answered); held > 11*time.Second {
		t.Errorf("the address answered before the restart held %s, past its TTL and grace (10 s)", held)
	} else {
		t.Logf("the address answered before the restart held %s (TTL 8 s + grace 2 s)", held.Round(time.Millisecond))
	}
}

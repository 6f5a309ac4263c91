package privtest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// DNSAnswer is what an agent's query got, as the agent saw it.
type DNSAnswer struct {
	Rcode   string   // NOERROR, REFUSED, NXDOMAIN, ... ("" when the query failed)
	From    string   // the address the answer came from (UDP) or the peer name (TCP)
	Answers []string // A and AAAA addresses
	EDNS    bool     // the answer has an EDNS0 record
	Err     string   // why the query failed
}

// AskDNS has a process born in cgroupPath ask resolver (host:port) for name's records of qtype
// (A or AAAA) over network (udp or tcp); edns adds an EDNS0 record with a 4096-byte buffer.
func AskDNS(t testing.TB, cgroupPath, network, resolver, name, qtype string, edns bool) DNSAnswer {
	t.Helper()
	return askDNS(t, Command(t, cgroupPath, "dns", network, resolver, name, qtype, fmt.Sprint(edns)))
}

// AskDNSIn is AskDNS from inside the network namespace of host h (as a pod's process).
func AskDNSIn(t testing.TB, h *Host, cgroupPath, network, resolver, name, qtype string, edns bool) DNSAnswer {
	t.Helper()
	return askDNS(t, InHost(t, h, Command(t, cgroupPath, "dns", network, resolver, name, qtype, fmt.Sprint(edns))))
}

func askDNS(t testing.TB, cmd *exec.Cmd) DNSAnswer {
	t.Helper()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper dns: %v", err)
	}
	var a DNSAnswer
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, _ := strings.Cut(l, "=")
		switch k {
		case "rcode":
			a.Rcode = v
		case "from":
			a.From = v
		case "answers":
			if v != "" {
				a.Answers = strings.Split(v, ",")
			}
		case "edns":
			a.EDNS = v == "true"
		case "error":
			a.Err = v
		}
	}
	return a
}

// helperDNS: network resolver name qtype edns. Over UDP it sends from an unconnected socket and
// reads the answer's source address; over TCP it reads the connection's peer name.
func helperDNS(args []string) int {
	if len(args) != 5 {
		fmt.Fprintln(os.Stderr, "dns: network resolver name qtype edns")
		return 2
	}
	network, resolver, name, qtype := args[0], args[1], args[2], args[3]
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.StringToType[qtype])
	if args[4] == "true" {
		m.SetEdns0(4096, false)
	}
	r, from, err := exchangeDNS(network, resolver, m)
	if err != nil {
		fmt.Printf("error=%v\n", err)
		return 0
	}
	var addrs []string
	for _, rr := range r.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			addrs = append(addrs, rr.A.String())
		case *dns.AAAA:
			addrs = append(addrs, rr.AAAA.String())
		}
	}
	fmt.Printf("rcode=%s\nfrom=%s\nanswers=%s\nedns=%t\n", dns.RcodeToString[r.Rcode], from, strings.Join(addrs, ","), r.IsEdns0() != nil)
	return 0
}

// dnsResult asks 192.0.2.53:53 (TEST-NET-1: nobody there; the kernel sends an agent's DNS to
// tether's proxy) for name's A records over UDP: "ok" when it is answered (NXDOMAIN included),
// "eperm" when it is refused.
func dnsResult(name string) string {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	r, _, err := exchangeDNS("udp", "192.0.2.53:53", m)
	switch {
	case err != nil:
		return Result(err)
	case r.Rcode == dns.RcodeRefused:
		return "eperm"
	}
	return "ok"
}

func exchangeDNS(network, resolver string, m *dns.Msg) (*dns.Msg, string, error) {
	if network == "tcp" {
		c, err := net.DialTimeout("tcp", resolver, 3*time.Second)
		if err != nil {
			return nil, "", err
		}
		defer c.Close()
		conn := &dns.Conn{Conn: c}
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		if err := conn.WriteMsg(m); err != nil {
			return nil, "", err
		}
		r, err := conn.ReadMsg()
		return r, c.RemoteAddr().String(), err
	}
	raddr, err := net.ResolveUDPAddr("udp", resolver)
	if err != nil {
		return nil, "", err
	}
	family := "udp4"
	if raddr.IP.To4() == nil {
		family = "udp6"
	}
	pc, err := net.ListenUDP(family, nil)
	if err != nil {
		return nil, "", err
	}
	defer pc.Close()
	b, err := m.Pack()
	if err != nil {
		return nil, "", err
	}
	if _, err := pc.WriteToUDP(b, raddr); err != nil {
		return nil, "", err
	}
	pc.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 65535)
	n, from, err := pc.ReadFromUDP(buf)
	if err != nil {
		return nil, "", err
	}
	r := new(dns.Msg)
	if err := r.Unpack(buf[:n]); err != nil {
		return nil, from.String(), err
	}
	return r, from.String(), nil
}

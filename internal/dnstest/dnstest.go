// Package dnstest is a DNS server on loopback (or an address the test gives) for tests (UDP and TCP, one port): it answers A and
// AAAA questions from a table the test changes, with the TTL the test sets, and counts the
// questions.
package dnstest

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/miekg/dns"
)

// Server answers from Records.
type Server struct {
	Addr    string // host:port (UDP)
	mu      sync.Mutex
	records map[string][]netip.Addr
	ttl     uint32
	queries atomic.Int64
	srv     *dns.Server
	tcp     *dns.Server
}

// Start serves on 127.0.0.1 until the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartAt(t, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 0))
}

// StartAt serves on addr (port 0: one the kernel picks) until the test ends.
func StartAt(t testing.TB, addr netip.AddrPort) *Server {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Addr: pc.LocalAddr().String(), records: map[string][]netip.Addr{}, ttl: 60}
	l, err := net.Listen("tcp", s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	s.srv = &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(s.answer)}
	s.tcp = &dns.Server{Listener: l, Handler: dns.HandlerFunc(s.answer)}
	for _, srv := range []*dns.Server{s.srv, s.tcp} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		<-started
		t.Cleanup(func() { srv.Shutdown() })
	}
	return s
}

// Set makes name resolve to addrs (none: NXDOMAIN) with the given TTL in seconds.
func (s *Server) Set(name string, ttl uint32, addrs ...netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(addrs) == 0 {
		delete(s.records, dns.Fqdn(name))
	} else {
		s.records[dns.Fqdn(name)] = addrs
	}
	s.ttl = ttl
}

// Queries is how many questions the server answered.
func (s *Server) Queries() int64 { return s.queries.Load() }

func (s *Server) answer(w dns.ResponseWriter, r *dns.Msg) {
	s.queries.Add(1)
	m := new(dns.Msg)
	m.SetReply(r)
	if o := r.IsEdns0(); o != nil {
		m.SetEdns0(o.UDPSize(), false)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	q := r.Question[0]
	addrs, ok := s.records[q.Name]
	if !ok {
		m.Rcode = dns.RcodeNameError
		w.WriteMsg(m)
		return
	}
	for _, a := range addrs {
		hdr := dns.RR_Header{Name: q.Name, Class: dns.ClassINET, Ttl: s.ttl}
		switch {
		case a.Is4() && q.Qtype == dns.TypeA:
			hdr.Rrtype = dns.TypeA
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: a.AsSlice()})
		case a.Is6() && q.Qtype == dns.TypeAAAA:
			hdr.Rrtype = dns.TypeAAAA
			m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: a.AsSlice()})
		}
	}
	w.WriteMsg(m)
}

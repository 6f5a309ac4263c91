package compile

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/tether-sh/tether/internal/dnstest"
)

// TestDNS asks a real DNS server on loopback.
func TestDNS(t *testing.T) {
	srv := dnstest.Start(t)
	srv.Set("api.example.test", 2, netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8::7"))
	r := NewDNS(srv.Addr)
	ctx := context.Background()
	addrs, ttl, err := r.Lookup(ctx, "API.example.test")
	if err != nil || len(addrs) != 2 || ttl != 2*time.Second {
		t.Fatalf("%v %v %v", addrs, ttl, err)
	}
	// Answered from the cache while the TTL lasts.
	before := srv.Queries()
	if _, _, err := r.Lookup(ctx, "api.example.test"); err != nil || srv.Queries() != before {
		t.Errorf("second lookup asked the server: %v", err)
	}
	// After it, asked again: the record changed.
	srv.Set("api.example.test", 60, netip.MustParseAddr("192.0.2.8"))
	time.Sleep(2100 * time.Millisecond)
	addrs, _, err = r.Lookup(ctx, "api.example.test")
	if err != nil || len(addrs) != 1 || addrs[0] != netip.MustParseAddr("192.0.2.8") {
		t.Errorf("after the TTL: %v %v", addrs, err)
	}
	if _, _, err := r.Lookup(ctx, "nope.example.test"); err == nil || !strings.Contains(err.Error(), "no such name") {
		t.Errorf("missing name: %v", err)
	}
	if _, _, err := r.Lookup(ctx, "bad name!"); err == nil {
		t.Error("a malformed name resolved")
	}
}

// FuzzDNSAnswer: whatever a DNS server sends back, tether reads addresses and a TTL no longer
// than it asked for, or an error, and never panics.
func FuzzDNSAnswer(f *testing.F) {
	m := new(dns.Msg)
	m.SetQuestion("a.example.", dns.TypeA)
	m.Answer = []dns.RR{
		&dns.A{Hdr: dns.RR_Header{Name: "a.example.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 30}, A: net.IPv4(10, 0, 0, 1)},
		&dns.AAAA{Hdr: dns.RR_Header{Name: "a.example.", Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: 5}, AAAA: net.ParseIP("fd00::1")},
		&dns.CNAME{Hdr: dns.RR_Header{Name: "a.example.", Rrtype: dns.TypeCNAME, Class: dns.ClassINET, Ttl: 1}, Target: "b.example."},
	}
	b, err := m.Pack()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	m.Rcode = dns.RcodeNameError
	b, _ = m.Pack()
	f.Add(b)
	f.Add([]byte{0, 0, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var r dns.Msg
		if r.Unpack(b) != nil {
			return
		}
		addrs, ttl, err := readAnswer("fuzz:53", &r, nil, 3600)
		if err != nil {
			return
		}
		if ttl > 3600 {
			t.Fatalf("a TTL of %d s from an answer, more than the %d asked for", ttl, 3600)
		}
		for _, a := range addrs {
			if !a.IsValid() {
				t.Fatalf("an invalid address from an answer: %v", addrs)
			}
		}
	})
}

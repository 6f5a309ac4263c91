package compile

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// DNS resolves fqdn rules by asking one DNS server for A and AAAA records, and keeps each answer
// for its TTL.
type DNS struct {
	server string
	client *dns.Client

	mu    sync.Mutex
	cache map[string]dnsAnswer
}

type dnsAnswer struct {
	addrs   []netip.Addr
	expires time.Time
}

// NewDNS returns a resolver that asks server (host:port).
func NewDNS(server string) *DNS {
	return &DNS{server: server, client: &dns.Client{Timeout: 3 * time.Second}, cache: map[string]dnsAnswer{}}
}

// SystemDNS returns the first nameserver of /etc/resolv.conf, as host:53.
func SystemDNS() (string, error) {
	cfg, err := dns.ClientConfigFromFile("/etc/resolv.conf")
	if err != nil {
		return "", fmt.Errorf("reading /etc/resolv.conf: %w", err)
	}
	if len(cfg.Servers) == 0 {
		return "", errors.New("/etc/resolv.conf names no nameserver")
	}
	return net.JoinHostPort(cfg.Servers[0], cfg.Port), nil
}

// Lookup implements Resolver.
func (d *DNS) Lookup(ctx context.Context, name string) ([]netip.Addr, time.Duration, error) {
	fqdn := dns.Fqdn(strings.ToLower(name))
	if _, ok := dns.IsDomainName(fqdn); !ok {
		return nil, 0, fmt.Errorf("%q is not a domain name", name)
	}
	now := time.Now()
	d.mu.Lock()
	if a, ok := d.cache[fqdn]; ok && now.Before(a.expires) {
		d.mu.Unlock()
		return a.addrs, a.expires.Sub(now), nil
	}
	d.mu.Unlock()

	var addrs []netip.Addr
	ttl := uint32(dnsCeiling / time.Second)
	for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA} {
		m := new(dns.Msg)
		m.SetQuestion(fqdn, qtype)
		m.RecursionDesired = true
		r, _, err := d.client.ExchangeContext(ctx, m, d.server)
		if err != nil {
			return nil, 0, fmt.Errorf("asking %s: %w", d.server, err)
		}
		if addrs, ttl, err = readAnswer(d.server, r, addrs, ttl); err != nil {
			return nil, 0, err
		}
	}
	life := time.Duration(ttl) * time.Second
	d.mu.Lock()
	d.cache[fqdn] = dnsAnswer{addrs: addrs, expires: now.Add(life)}
	d.mu.Unlock()
	return addrs, life, nil
}

// readAnswer adds the addresses of the DNS server's answer r to addrs and lowers ttl to the
// shortest of its records' TTLs. r is what the server sent, decoded: untrusted.
func readAnswer(server string, r *dns.Msg, addrs []netip.Addr, ttl uint32) ([]netip.Addr, uint32, error) {
	switch r.Rcode {
	case dns.RcodeSuccess:
	case dns.RcodeNameError:
		return nil, 0, fmt.Errorf("no such name (asked %s)", server)
	default:
		return nil, 0, fmt.Errorf("%s answered %s", server, dns.RcodeToString[r.Rcode])
	}
	for _, rr := range r.Answer {
		if rr != nil && rr.Header() != nil {
			ttl = min(ttl, rr.Header().Ttl)
		}
	}
	return append(addrs, AnswerAddrs(r)...), ttl, nil
}

// AnswerAddrs are the A and AAAA addresses of the answer section of m (those at the end of a
// CNAME chain included: they are what the asked name resolves to), IPv6 ones unmapped.
func AnswerAddrs(m *dns.Msg) []netip.Addr {
	var out []netip.Addr
	for _, rr := range m.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			if a, ok := netip.AddrFromSlice(rr.A.To4()); ok {
				out = append(out, a)
			}
		case *dns.AAAA:
			if a, ok := netip.AddrFromSlice(rr.AAAA.To16()); ok {
				out = append(out, a.Unmap())
			}
		}
	}
	return out
}

var _ Resolver = (*DNS)(nil)

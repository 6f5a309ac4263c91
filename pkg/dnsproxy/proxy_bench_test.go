package dnsproxy

import (
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// oneAgent stands in for the kernel's map of DNS peers and the registry in this one-stage
// benchmark (test/e2e's TestPrivilegedDNSProxy runs the real ones): every query is slot 1's,
// which is granted *.example.com; Relearn installs nothing.
type oneAgent struct{}

func (oneAgent) DNSPeer(netip.AddrPort, uint8) (dataplane.Slot, netip.AddrPort, error) {
	return 1, netip.MustParseAddrPort("192.0.2.53:53"), nil
}

func (oneAgent) DNS(dataplane.Slot) (agents.DNSView, bool) {
	return agents.DNSView{Agent: events.Agent{Slot: 1, CgroupID: 7}, Names: []string{"*.example.com"}}, true
}

func (oneAgent) Relearn(dataplane.Slot) error { return nil }

// upstreamServer answers every A question with 192.0.2.10, with ttl.
func upstreamServer(b *testing.B, ttl uint32) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: r.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl}, A: net.IPv4(192, 0, 2, 10)})
		w.WriteMsg(m)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	b.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

func benchProxy(b *testing.B, upstream string) *Proxy {
	p, err := New(oneAgent{}, Options{Upstream: upstream, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	p.Serve(oneAgent{})
	b.Cleanup(p.Close)
	return p
}

// latencies asks server n times, one query after the other, and returns each query's time.
func latencies(b *testing.B, server string, n int) []time.Duration {
	c := &dns.Client{Net: "udp", Timeout: 2 * time.Second}
	conn, err := c.Dial(server)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	m := new(dns.Msg)
	m.SetQuestion("api.example.com.", dns.TypeA)
	out := make([]time.Duration, n)
	for i := range out {
		start := time.Now()
		r, _, err := c.ExchangeWithConn(m, conn)
		if err != nil || r.Rcode != dns.RcodeSuccess {
			b.Fatalf("query %d: %v %v", i, r, err)
		}
		out[i] = time.Since(start)
	}
	slices.Sort(out)
	return out
}

func pct(d []time.Duration, p float64) float64 {
	return float64(d[int(float64(len(d)-1)*p)].Microseconds())
}

// BenchmarkLatency: one query at a time, straight to the server (the baseline, measured in the
// same run) and through the proxy, with the answer cached (TTL 300) and not (TTL 0: every query
// goes upstream). Reports p50 and p99 of each in µs, and what the proxy adds.
func BenchmarkLatency(b *testing.B) {
	for _, c := range []struct {
		name string
		ttl  uint32
	}{{"cached", 300}, {"upstream", 0}} {
		b.Run(c.name, func(b *testing.B) {
			up := upstreamServer(b, c.ttl)
			p := benchProxy(b, up)
			via := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), p.Port()).String()
			n := max(b.N, 2000)
			b.ResetTimer()
			direct := latencies(b, up, n)
			proxied := latencies(b, via, n)
			b.ReportMetric(pct(direct, 0.5), "direct-p50-µs")
			b.ReportMetric(pct(direct, 0.99), "direct-p99-µs")
			b.ReportMetric(pct(proxied, 0.5), "proxy-p50-µs")
			b.ReportMetric(pct(proxied, 0.99), "proxy-p99-µs")
			b.ReportMetric(pct(proxied, 0.5)-pct(direct, 0.5), "added-p50-µs")
			b.ReportMetric(pct(proxied, 0.99)-pct(direct, 0.99), "added-p99-µs")
		})
	}
}

// BenchmarkThroughputOneCore: queries per second the proxy answers (cached answers) with Go
// limited to one core, 16 clients asking at once; the same clients against the server itself
// are the baseline.
func BenchmarkThroughputOneCore(b *testing.B) {
	up := upstreamServer(b, 300)
	p := benchProxy(b, up)
	via := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), p.Port()).String()
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	for _, target := range []struct{ name, addr string }{{"direct", up}, {"proxy", via}} {
		n := max(b.N, 20000)
		start := time.Now()
		var wg sync.WaitGroup
		for w := 0; w < 16; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				latencies(b, target.addr, n/16)
			}()
		}
		wg.Wait()
		b.ReportMetric(float64(n)/time.Since(start).Seconds(), target.name+"-qps")
	}
}

package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/miekg/dns"

	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/events"
)

// The DNS part: an agent's DNS through the kernel's redirect and tetherd's DNS proxy, against the
// same queries sent straight to the server by a process outside the agent parent (the baseline,
// in the same run). The agent is in the bench's client network namespace, so its DNS takes the
// proxy's remote address (the path of a pod's).
const (
	dnsID      = "spiffe://bench.tether/agent/dns"
	dnsQueries = 2_000 // per latency sample
	dnsLearn   = 300   // new names, each a new address to install
	dnsCached  = "cached.bench.test."
	dnsFresh   = "fresh.bench.test." // TTL 0: every query goes upstream
	dnsLearnAt = ".learn.bench.test."
)

type dnsLatency struct{ p50, p99, qps []float64 } // one per round: µs, µs, queries per second

type dnsResults struct {
	direct, cached, fresh dnsLatency
	install               []time.Duration // answer to rule installed, one per new name
	learnt                int
}

// dnsServer answers A questions: dnsCached with TTL 300, dnsFresh with TTL 0, and N.learn... with
// an address of its own (10.200.N/256.N%256), TTL 300.
func dnsServer(at netip.AddrPort) (*dns.Server, error) {
	pc, err := net.ListenPacket("udp", at.String())
	if err != nil {
		return nil, err
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		ttl, ip := uint32(300), net.IPv4(192, 0, 2, 10)
		if q.Name == dnsFresh {
			ttl = 0
		}
		if n, ok := strings.CutSuffix(q.Name, dnsLearnAt); ok {
			i, _ := strconv.Atoi(n)
			ip = net.IPv4(10, 200, byte(i>>8), byte(i))
		}
		if q.Qtype == dns.TypeA {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl}, A: ip})
		}
		w.WriteMsg(m)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	return srv, nil
}

func measureDNS(e *env, o options) (*dnsResults, error) {
	bin := filepath.Join(filepath.Dir(e.self), "tetherd")
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("the DNS part runs tetherd, built next to the bench binary (make bench builds both): %w", err)
	}
	server := netip.AddrPortFrom(e.host.Ours4, 53) // a test address of ours: port 53 is free there
	srv, err := dnsServer(server)
	if err != nil {
		return nil, fmt.Errorf("the DNS server: %w", err)
	}
	defer srv.Shutdown()
	parent := filepath.Join(e.base, "tetherd-dns")
	agent := filepath.Join(parent, "agent")
	if _, err := cgroups.Create(agent); err != nil {
		return nil, err
	}
	profile := map[string]any{"exec": []string{e.self}, "unix": []any{}, "high_risk": []string{},
		"egress": []any{map[string]any{"fqdn": "*.bench.test", "ports": []int{443}, "protocol": "tcp"}}}
	t, err := startTetherd(e, bin, parent, tetherdSetup{
		profiles:   map[string]any{"dnsbench": profile},
		identities: map[string]any{dnsID: map[string]any{"task_type": "dnsbench"}},
		config: fmt.Sprintf("dns:\n  server: %s\n  proxy:\n    enabled: true\n    remote_addresses: [%q]\n    state_file: %s\n",
			server, e.host.Ours4, filepath.Join(os.TempDir(), filepath.Base(parent)+"-dns-state.json")),
	})
	if err != nil {
		return nil, err
	}
	defer t.stop()
	if _, err := t.client.Register(api.RegisterRequest{SpiffeID: dnsID, Cgroup: agent}); err != nil {
		return nil, fmt.Errorf("registering the DNS bench agent: %w", err)
	}
	res := &dnsResults{}
	queries := max(int(dnsQueries*o.scale), 200)
	for range o.rounds {
		for _, s := range []struct {
			cgroup, name string
			into         *dnsLatency
		}{{e.outside, dnsCached, &res.direct}, {agent, dnsCached, &res.cached}, {agent, dnsFresh, &res.fresh}} {
			out, err := e.runWorkerOut(s.cgroup, "dnslat", server.String()+"/"+s.name, queries)
			if err != nil {
				return nil, err
			}
			var p50, p99, qps float64
			if _, err := fmt.Sscan(out, &p50, &p99, &qps); err != nil {
				return nil, fmt.Errorf("dnslat: %q: %w", out, err)
			}
			s.into.p50, s.into.p99, s.into.qps = append(s.into.p50, p50), append(s.into.p99, p99), append(s.into.qps, qps)
		}
	}
	learn := max(int(dnsLearn*o.scale), 50)
	if _, err := e.runWorkerOut(agent, "dnslearn", server.String(), learn); err != nil {
		return nil, err
	}
	res.install, err = installTimes(t.log)
	res.learnt = learn
	return res, err
}

// installTimes reads how long each answer of the decision log took to install (dns records that
// installed a new address).
func installTimes(log string) ([]time.Duration, error) {
	f, err := os.Open(log)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []time.Duration
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var rec events.Decision
		if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Kind == events.KindDNS && rec.SpiffeID == dnsID && rec.DNS != nil &&
			strings.HasSuffix(rec.DNS.Name+".", dnsLearnAt) && rec.DNS.InstallNs > 0 {
			out = append(out, time.Duration(rec.DNS.InstallNs))
		}
	}
	return out, sc.Err()
}

// dnsWorker is the worker's DNS loop: dnslat RESOLVER/NAME asks NAME ops times over one UDP
// socket and prints the p50 and p99 in µs and the queries per second; dnslearn RESOLVER asks ops
// new names once each.
func dnsWorker(mode, target string, ops int) error {
	resolver, name, _ := strings.Cut(target, "/")
	c := &dns.Client{Net: "udp", Timeout: 2 * time.Second}
	conn, err := c.Dial(resolver)
	if err != nil {
		return err
	}
	defer conn.Close()
	m := new(dns.Msg)
	ask := func(n string) (time.Duration, error) {
		m.SetQuestion(n, dns.TypeA)
		start := time.Now()
		r, _, err := c.ExchangeWithConn(m, conn)
		if err != nil {
			return 0, err
		}
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) == 0 {
			return 0, fmt.Errorf("%s: %s", n, dns.RcodeToString[r.Rcode])
		}
		return time.Since(start), nil
	}
	if mode == "dnslearn" {
		for i := range ops {
			if _, err := ask(strconv.Itoa(i) + dnsLearnAt); err != nil {
				return err
			}
		}
		fmt.Println("ok")
		return nil
	}
	took := make([]time.Duration, ops)
	start := time.Now()
	for i := range took {
		if took[i], err = ask(name); err != nil {
			return err
		}
	}
	qps := float64(ops) / time.Since(start).Seconds()
	slices.Sort(took)
	at := func(q float64) float64 { return float64(took[int(float64(len(took)-1)*q)]) / 1e3 }
	fmt.Println(at(0.5), at(0.99), qps)
	return nil
}

func reportDNS(w io.Writer, r *dnsResults) {
	if r == nil {
		return
	}
	fmt.Fprintln(w, "\nDNS through tetherd's proxy: an agent's queries to its resolver, sent by the kernel to the proxy's")
	fmt.Fprintln(w, "remote address (the agent is in another network namespace, as a pod), against the same queries sent")
	fmt.Fprintln(w, "straight to the server from outside the agent parent (one query at a time, one UDP socket):")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "QUERIES\tP50\tP99\tPER SECOND (ONE STREAM)\tADDED P50\tADDED P99")
	med := func(v []float64) float64 { return quantile(slices.Sorted(slices.Values(v)), 0.5) }
	row := func(name string, l dnsLatency) {
		fmt.Fprintf(tw, "%s\t%.0f µs\t%.0f µs\t%.0f\t%+.0f µs\t%+.0f µs\n", name, med(l.p50), med(l.p99), med(l.qps),
			med(l.p50)-med(r.direct.p50), med(l.p99)-med(r.direct.p99))
	}
	fmt.Fprintf(tw, "straight to the server\t%.0f µs\t%.0f µs\t%.0f\t\t\n", med(r.direct.p50), med(r.direct.p99), med(r.direct.qps))
	row("agent, answer cached by the proxy", r.cached)
	row("agent, asked upstream (TTL 0)", r.fresh)
	tw.Flush()
	if len(r.install) > 0 {
		fmt.Fprintf(w, "Answer to rule installed (a new name's address compiled into the agent's rules and written to the\nkernel before the answer is sent), %d new names: p50 %s, p99 %s, the last %s\n",
			len(r.install), durationQuantile(r.install, 0.5).Round(time.Microsecond), durationQuantile(r.install, 0.99).Round(time.Microsecond),
			r.install[len(r.install)-1].Round(time.Microsecond))
	}
}

func dnsGoals(goal goalFunc, r *dnsResults) {
	goal(len(r.install) == r.learnt, "every new name's address was installed before its answer (%d of %d in the decision log)", len(r.install), r.learnt)
}

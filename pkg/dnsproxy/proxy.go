// Package dnsproxy is tetherd's DNS proxy: the kernel sends agents' DNS (port 53, UDP and TCP, to
// whatever resolver they ask) to it (see bpf/lib/dns.h), and it decides each query by name. A
// query for a name an fqdn rule of the agent's grants covers is asked upstream, and the answer's
// addresses are installed as the agent's host rules, with the rule's ports and protocol, before
// the agent gets the answer: its connect never races its rule. A name no rule covers is refused
// and never leaves the node. Every query is a decision record of kind dns.
//
// Layer 3 (beside pkg/containers): it reads the registry and the kernel's map of DNS peers, and
// tells the registry to compile an agent again when what it learnt changed.
package dnsproxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// Kernel says whose socket sent a query (kernel.Kernel).
type Kernel interface {
	DNSPeer(peer netip.AddrPort, proto uint8) (dataplane.Slot, netip.AddrPort, error)
}

// Registry is what the proxy needs of the agents (agents.Registry).
type Registry interface {
	DNS(slot dataplane.Slot) (agents.DNSView, bool)
	Relearn(slot dataplane.Slot) error
}

// Options configure a Proxy.
type Options struct {
	// Listen are the listeners' addresses (127.0.0.1 and ::1 when unset), Port their port (0:
	// one the kernel picks).
	Listen []netip.Addr
	Port   uint16
	// Upstream is the DNS server asked (host:port).
	Upstream string
	// NXDomain answers a name no rule covers with NXDOMAIN instead of REFUSED.
	NXDomain bool
	// MinTTL and MaxTTL bound how long an answer's addresses are held (5 s and 1 h when unset);
	// the answer the agent gets says at most MaxTTL. Grace is how long they are held past that,
	// for connections in progress (10 s when unset; the kernel adds compile.NameMargin).
	MinTTL, MaxTTL, Grace time.Duration
	// Timeout of one exchange upstream (3 s when unset).
	Timeout time.Duration
	// StateFile keeps what agents learnt across restarts of tetherd (none: it is not kept, and a
	// restarted tetherd's rules hold none of it until the agents ask again).
	StateFile string
	// Emit writes a record.
	Emit func(events.Decision)
	Log  *slog.Logger
	// Now is the clock of the rules' deadlines (bootclock.Now when unset).
	Now func() time.Time
}

// Proxy answers agents' DNS.
type Proxy struct {
	opts    Options
	k       Kernel
	reg     Registry
	up      *upstream
	learnt  *learnt
	servers []*dns.Server
	port    uint16
	stats   counters
	saveMu  sync.Mutex
}

type counters struct {
	queries, answered, refused, audited, failed, unattributed, installs, installFailures atomic.Uint64
}

// Stats are the proxy's counts, for the status.
type Stats struct {
	Listen       string `json:"listen"`
	Queries      uint64 `json:"queries"`
	Answered     uint64 `json:"answered"`      // a name a rule covers, answered
	Refused      uint64 `json:"refused"`       // a name no rule covers
	Audited      uint64 `json:"audited"`       // a name no rule covers, answered (audit mode)
	Failed       uint64 `json:"failed"`        // the server did not answer (SERVFAIL to the agent)
	Unattributed uint64 `json:"unattributed"`  // from no agent's socket (REFUSED)
	Upstream     uint64 `json:"upstream"`      // exchanges with the server
	Cached       int    `json:"cached"`        // answers held for their TTL
	Learnt       int    `json:"learnt"`        // (agent, name, address) held as host rules
	Installs     uint64 `json:"installs"`      // agents compiled again for a new address
	InstallFails uint64 `json:"install_fails"` // and failed: the agent got SERVFAIL
}

// New opens the proxy's listeners; Serve answers on them.
func New(k Kernel, opts Options) (*Proxy, error) {
	if opts.Upstream == "" {
		return nil, errors.New("DNS proxy: no upstream server")
	}
	if len(opts.Listen) == 0 {
		opts.Listen = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	}
	opts.MinTTL = orDefault(opts.MinTTL, 5*time.Second)
	opts.MaxTTL = orDefault(opts.MaxTTL, time.Hour)
	opts.Grace = orDefault(opts.Grace, 10*time.Second)
	opts.Timeout = orDefault(opts.Timeout, 3*time.Second)
	if opts.Now == nil {
		opts.Now = bootclock.Now
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Emit == nil {
		opts.Emit = func(events.Decision) {}
	}
	p := &Proxy{opts: opts, k: k, up: newUpstream(opts.Upstream, opts.Timeout, opts.Now), learnt: newLearnt(opts.Grace)}
	if err := p.load(); err != nil {
		return nil, err
	}
	if err := p.listen(); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// load takes back what the state file says agents learnt.
func (p *Proxy) load() error {
	if p.opts.StateFile == "" {
		return nil
	}
	b, err := os.ReadFile(p.opts.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("DNS proxy state: %w", err)
	}
	var saved []savedName
	if err := json.Unmarshal(b, &saved); err != nil {
		// A file this tetherd cannot read holds nothing it can use: the agents ask again.
		p.opts.Log.Error("DNS proxy state file unreadable: what agents learnt before is dropped", "file", p.opts.StateFile, "error", err)
		return nil
	}
	n := p.learnt.restore(saved, p.opts.Now())
	p.opts.Log.Info("DNS proxy: names agents learnt before the restart", "held", n, "file", p.opts.StateFile)
	return nil
}

// save writes what agents learnt to the state file (a new file renamed over the old: a reader
// sees the old or the new one whole).
func (p *Proxy) save() error {
	if p.opts.StateFile == "" {
		return nil
	}
	p.saveMu.Lock()
	defer p.saveMu.Unlock()
	b, err := json.Marshal(p.learnt.snapshot(p.opts.Now()))
	if err != nil {
		return err
	}
	tmp := p.opts.StateFile + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("DNS proxy state: %w", err)
	}
	if err := os.Rename(tmp, p.opts.StateFile); err != nil {
		return fmt.Errorf("DNS proxy state: %w", err)
	}
	return nil
}

// Adopted drops what agents that went while tetherd was away learnt, and has the registry
// compile those that are still here with what they learnt (call after the registry adopted the
// pinned agents). cgroupOf says which agent a slot holds now.
func (p *Proxy) Adopted(cgroupOf func(dataplane.Slot) (uint64, bool)) {
	for _, slot := range p.learnt.keepOnly(cgroupOf) {
		if p.reg != nil {
			if err := p.reg.Relearn(slot); err != nil {
				p.opts.Log.Warn("DNS proxy: compiling an adopted agent with what it learnt", "slot", slot, "error", err)
			}
		}
	}
	if err := p.save(); err != nil {
		p.opts.Log.Warn("DNS proxy: writing the state file", "error", err)
	}
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// listen opens UDP and TCP on every address, all at one port.
func (p *Proxy) listen() error {
	port := p.opts.Port
	for _, a := range p.opts.Listen {
		ap := netip.AddrPortFrom(a, port)
		pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
		if err != nil {
			return fmt.Errorf("DNS proxy: listening on udp %v: %w", ap, err)
		}
		port = uint16(pc.LocalAddr().(*net.UDPAddr).Port)
		ap = netip.AddrPortFrom(a, port)
		l, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
		if err != nil {
			pc.Close()
			return fmt.Errorf("DNS proxy: listening on tcp %v: %w", ap, err)
		}
		p.servers = append(p.servers,
			&dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(p.serveDNS), UDPSize: dns.DefaultMsgSize},
			&dns.Server{Listener: l, Handler: dns.HandlerFunc(p.serveDNS), ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second})
	}
	p.port = port
	return nil
}

// Serve answers on every listener, for the agents of reg, until Close.
func (p *Proxy) Serve(reg Registry) {
	p.reg = reg
	for _, s := range p.servers {
		started := make(chan struct{})
		s.NotifyStartedFunc = func() { close(started) }
		go func() {
			if err := s.ActivateAndServe(); err != nil {
				p.opts.Log.Error("DNS proxy listener ended", "error", err)
			}
		}()
		<-started
	}
}

// Port is the listeners' port.
func (p *Proxy) Port() uint16 { return p.port }

// Close stops answering.
func (p *Proxy) Close() {
	for _, s := range p.servers {
		if s.PacketConn != nil || s.Listener != nil {
			_ = s.Shutdown()
		}
	}
}

// Names is what the agent in slot learnt (registry's Options.Names).
func (p *Proxy) Names(slot dataplane.Slot) compile.Names { return p.learnt.of(slot) }

// Forget drops what the agent in slot learnt (it is unregistered).
func (p *Proxy) Forget(slot dataplane.Slot) {
	p.learnt.forget(slot)
	if err := p.save(); err != nil {
		p.opts.Log.Warn("DNS proxy: writing the state file", "error", err)
	}
}

// Stats returns the proxy's counts.
func (p *Proxy) Stats() Stats {
	asked, cachedN := p.up.stats()
	s := &p.stats
	return Stats{Listen: fmt.Sprintf("%v port %d", p.opts.Listen, p.port),
		Queries: s.queries.Load(), Answered: s.answered.Load(), Refused: s.refused.Load(), Audited: s.audited.Load(),
		Failed: s.failed.Load(), Unattributed: s.unattributed.Load(), Upstream: asked, Cached: cachedN, Learnt: p.learnt.size(),
		Installs: s.installs.Load(), InstallFails: s.installFailures.Load()}
}

// query is one query being decided.
type query struct {
	req      *dns.Msg
	proto    string
	resolver netip.AddrPort
	view     agents.DNSView
	slot     dataplane.Slot
	name     string // the question's name: lower case, no trailing dot
	grant    string
}

func (p *Proxy) serveDNS(w dns.ResponseWriter, req *dns.Msg) {
	p.stats.queries.Add(1)
	q := query{req: req, proto: "udp"}
	var peer netip.AddrPort
	proto := uint8(unix.IPPROTO_UDP)
	switch a := w.RemoteAddr().(type) {
	case *net.UDPAddr:
		peer = a.AddrPort()
	case *net.TCPAddr:
		peer, proto, q.proto = a.AddrPort(), unix.IPPROTO_TCP, "tcp"
	}
	slot, resolver, err := p.k.DNSPeer(peer, proto)
	if err != nil {
		p.stats.unattributed.Add(1)
		p.opts.Log.Debug("DNS query from no agent's socket: refused", "peer", peer, "protocol", q.proto, "error", err)
		p.reply(w, req, failure(req, dns.RcodeRefused))
		return
	}
	view, ok := p.reg.DNS(slot)
	if !ok {
		p.stats.unattributed.Add(1)
		p.reply(w, req, failure(req, dns.RcodeRefused))
		return
	}
	q.slot, q.resolver, q.view = slot, resolver, view
	if len(req.Question) != 1 || req.Opcode != dns.OpcodeQuery {
		p.record(q, events.VerdictDeny, "malformed", events.DNSQuery{Rcode: dns.RcodeToString[dns.RcodeFormatError]})
		p.reply(w, req, failure(req, dns.RcodeFormatError))
		return
	}
	p.decide(w, q)
}

// decide answers a well-formed query of an agent.
func (p *Proxy) decide(w dns.ResponseWriter, q query) {
	q.name = strings.ToLower(strings.TrimSuffix(q.req.Question[0].Name, "."))
	for _, pattern := range q.view.Names {
		if compile.NameCovers(pattern, q.name) {
			q.grant = pattern
			break
		}
	}
	if q.grant == "" && !q.view.Audit {
		p.stats.refused.Add(1)
		rcode := dns.RcodeRefused
		if p.opts.NXDomain {
			rcode = dns.RcodeNameError
		}
		p.record(q, events.VerdictDeny, events.KernelReason(dataplane.ReasonNoRule), events.DNSQuery{Rcode: dns.RcodeToString[rcode]})
		p.reply(w, q.req, failure(q.req, rcode))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*p.opts.Timeout)
	defer cancel()
	resp, err := p.up.exchange(ctx, q.req)
	if err != nil {
		p.stats.failed.Add(1)
		p.record(q, events.VerdictError, "upstream", events.DNSQuery{Rcode: dns.RcodeToString[dns.RcodeServerFailure], Error: err.Error()})
		p.reply(w, q.req, failure(q.req, dns.RcodeServerFailure))
		return
	}
	d := events.DNSQuery{Rcode: dns.RcodeToString[resp.Rcode]}
	if q.grant == "" {
		p.stats.audited.Add(1)
		d.Answers = addrStrings(compile.AnswerAddrs(resp))
		p.record(q, events.VerdictAuditDeny, events.KernelReason(dataplane.ReasonNoRule), d)
		p.reply(w, q.req, resp)
		return
	}
	if err := p.install(q, resp, &d); err != nil {
		p.stats.installFailures.Add(1)
		d.Error = err.Error()
		p.record(q, events.VerdictError, "install", d)
		p.reply(w, q.req, failure(q.req, dns.RcodeServerFailure))
		return
	}
	p.stats.answered.Add(1)
	p.record(q, events.VerdictAllow, events.KernelReason(dataplane.ReasonRule), d)
	p.reply(w, q.req, resp)
}

// install makes the answer's addresses the agent's host rules (its fqdn rules compiled again)
// before the agent gets the answer, whose TTLs say at most MaxTTL.
func (p *Proxy) install(q query, resp *dns.Msg, d *events.DNSQuery) error {
	addrs := compile.AnswerAddrs(resp)
	d.Answers = addrStrings(addrs)
	if len(addrs) == 0 {
		return nil
	}
	ttl, _ := minTTL(resp)
	hold := min(max(time.Duration(ttl)*time.Second, p.opts.MinTTL), p.opts.MaxTTL)
	d.TTL = uint32(hold / time.Second)
	capTTL(resp, uint32(p.opts.MaxTTL/time.Second))
	now := p.opts.Now()
	if !p.learnt.add(q.slot, q.view.Agent.CgroupID, q.name, addrs, now.Add(hold), now) {
		return nil // held already: the rules have them
	}
	start := time.Now()
	err := p.reg.Relearn(q.slot)
	d.InstallNs = time.Since(start).Nanoseconds()
	p.stats.installs.Add(1)
	if serr := p.save(); serr != nil {
		p.opts.Log.Warn("DNS proxy: writing the state file (a restarted tetherd would not hold this answer)", "error", serr)
	}
	return err
}

func (p *Proxy) record(q query, v events.Verdict, reason events.Reason, d events.DNSQuery) {
	qq := q.req.Question
	if len(qq) > 0 {
		d.Name = strings.TrimSuffix(qq[0].Name, ".")
		d.Type = dns.TypeToString[qq[0].Qtype]
	}
	d.Protocol, d.Grant = q.proto, q.grant
	if q.resolver.IsValid() {
		d.Resolver = q.resolver.String()
	}
	rec := events.DNSRecord(q.view.Agent, v, reason, d)
	rec.Timestamp = bootclock.Now().UTC()
	p.opts.Emit(rec)
}

// reply writes resp as the answer to req: req's ID, and cut to what a UDP asker can take.
func (p *Proxy) reply(w dns.ResponseWriter, req, resp *dns.Msg) {
	resp.Id = req.Id
	resp.Response = true
	if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
		size := dns.MinMsgSize
		if o := req.IsEdns0(); o != nil {
			size = int(o.UDPSize())
		}
		resp.Truncate(max(size, dns.MinMsgSize))
	}
	if err := w.WriteMsg(resp); err != nil {
		p.opts.Log.Debug("writing a DNS answer", "error", err)
	}
}

// failure is an answer with rcode and nothing else.
func failure(req *dns.Msg, rcode int) *dns.Msg {
	m := new(dns.Msg)
	m.SetRcode(req, rcode)
	if o := req.IsEdns0(); o != nil {
		m.SetEdns0(o.UDPSize(), o.Do())
	}
	return m
}

func addrStrings(addrs []netip.Addr) []string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return out
}

// capTTL lowers the TTLs of m's answer records to at most ttl: the agent asks again before its
// rules for them end.
func capTTL(m *dns.Msg, ttl uint32) {
	for _, rr := range m.Answer {
		if h := rr.Header(); h != nil && h.Ttl > ttl {
			h.Ttl = ttl
		}
	}
}

package dnsproxy

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sync/singleflight"
)

// upstream asks the configured DNS server, and keeps each answer for its shortest TTL, so that a
// name many agents ask is asked upstream once per TTL. Concurrent askers of one question share
// one exchange.
type upstream struct {
	server string
	udp    *dns.Client
	tcp    *dns.Client
	now    func() time.Time
	flight singleflight.Group

	mu    sync.Mutex
	cache map[string]cached
	asked uint64 // exchanges with the server
}

type cached struct {
	msg     *dns.Msg
	at      time.Time
	expires time.Time
}

// maxCached bounds the cache; past it, expired answers are dropped, then everything.
const maxCached = 10000

func newUpstream(server string, timeout time.Duration, now func() time.Time) *upstream {
	return &upstream{
		server: server,
		udp:    &dns.Client{Net: "udp", Timeout: timeout, UDPSize: dns.DefaultMsgSize},
		tcp:    &dns.Client{Net: "tcp", Timeout: timeout},
		now:    now,
		cache:  map[string]cached{},
	}
}

// cacheKey is the question and what changes the answer: the DO and CD bits.
func cacheKey(req *dns.Msg) string {
	q := req.Question[0]
	do := false
	if o := req.IsEdns0(); o != nil {
		do = o.Do()
	}
	return fmt.Sprintf("%s|%d|%d|%t|%t", strings.ToLower(q.Name), q.Qtype, q.Qclass, do, req.CheckingDisabled)
}

// exchange returns the server's answer to req (its ID not set: the caller's), from the cache
// while it holds, with the TTLs lowered by the time it was held.
func (u *upstream) exchange(ctx context.Context, req *dns.Msg) (*dns.Msg, error) {
	key := cacheKey(req)
	now := u.now()
	u.mu.Lock()
	c, ok := u.cache[key]
	u.mu.Unlock()
	if ok && now.Before(c.expires) {
		return aged(c.msg, now.Sub(c.at)), nil
	}
	v, err, _ := u.flight.Do(key, func() (any, error) {
		return u.ask(ctx, req, key)
	})
	if err != nil {
		return nil, err
	}
	return v.(*dns.Msg).Copy(), nil
}

func (u *upstream) ask(ctx context.Context, req *dns.Msg, key string) (*dns.Msg, error) {
	out := req.Copy()
	out.Id = dns.Id()
	u.mu.Lock()
	u.asked++
	u.mu.Unlock()
	resp, _, err := u.udp.ExchangeContext(ctx, out, u.server)
	if err == nil && resp.Truncated {
		resp, _, err = u.tcp.ExchangeContext(ctx, out, u.server)
	}
	if err != nil {
		return nil, fmt.Errorf("asking %s: %w", u.server, err)
	}
	if resp.Rcode == dns.RcodeSuccess || resp.Rcode == dns.RcodeNameError {
		ttl, ok := minTTL(resp)
		if ok && ttl > 0 {
			now := u.now()
			u.mu.Lock()
			if len(u.cache) >= maxCached {
				u.pruneLocked(now)
			}
			u.cache[key] = cached{msg: resp, at: now, expires: now.Add(time.Duration(ttl) * time.Second)}
			u.mu.Unlock()
		}
	}
	return resp, nil
}

func (u *upstream) pruneLocked(now time.Time) {
	for k, c := range u.cache {
		if !now.Before(c.expires) {
			delete(u.cache, k)
		}
	}
	if len(u.cache) >= maxCached {
		clear(u.cache)
	}
}

// stats is how many exchanges the server had and how many answers are cached.
func (u *upstream) stats() (asked uint64, cachedAnswers int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.asked, len(u.cache)
}

// minTTL is the shortest TTL of the records of the answer and authority sections (the SOA's, for
// a negative answer); false when there is none.
func minTTL(m *dns.Msg) (uint32, bool) {
	var ttl uint32
	found := false
	for _, rr := range append(append([]dns.RR{}, m.Answer...), m.Ns...) {
		if rr == nil || rr.Header() == nil {
			continue
		}
		if !found || rr.Header().Ttl < ttl {
			ttl, found = rr.Header().Ttl, true
		}
	}
	return ttl, found
}

// aged is a copy of m with its records' TTLs lowered by held.
func aged(m *dns.Msg, held time.Duration) *dns.Msg {
	out := m.Copy()
	sec := uint32(held / time.Second)
	for _, sect := range [][]dns.RR{out.Answer, out.Ns, out.Extra} {
		for _, rr := range sect {
			if rr == nil || rr.Header() == nil || rr.Header().Rrtype == dns.TypeOPT {
				continue
			}
			h := rr.Header()
			h.Ttl = max(h.Ttl, sec) - sec
		}
	}
	return out
}

package compile

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/grants"
)

func TestNameCovers(t *testing.T) {
	cases := []struct {
		pattern, name string
		want          bool
	}{
		{"api.example.com", "api.example.com", true},
		{"api.example.com", "API.Example.COM.", true},
		{"api.example.com", "x.api.example.com", false},
		{"*.example.com", "api.example.com", true},
		{"*.example.com", "a.b.example.com", true},
		{"*.example.com", "example.com", false},
		{"*.example.com", "badexample.com", false},
	}
	for _, c := range cases {
		if got := NameCovers(c.pattern, c.name); got != c.want {
			t.Errorf("NameCovers(%q, %q) = %v", c.pattern, c.name, got)
		}
	}
	for _, bad := range []string{"", "*", "*.", "a.*.example.com", "**.example.com", "exa mple.com"} {
		if CheckName(bad) == nil {
			t.Errorf("CheckName(%q) accepted", bad)
		}
	}
}

// fixedNames answers every covered pattern with one address until a fixed end.
type fixedNames struct {
	name string
	addr netip.Addr
	end  time.Time
}

func (f fixedNames) Addrs(pattern string, now time.Time) ([]netip.Addr, time.Time) {
	if !NameCovers(pattern, f.name) || !f.end.After(now) {
		return nil, time.Time{}
	}
	return []netip.Addr{f.addr}, f.end
}

// TestLearntNames: with what an agent learnt in the context, an fqdn rule (and a wildcard) grants
// those addresses and nothing is refused before the agent asked; the rule set is compiled again
// when they end and expires NameMargin later. Without it, a wildcard is refused.
func TestLearntNames(t *testing.T) {
	now := time.Unix(5000, 0)
	g := grants.Grants{Egress: []grants.Egress{
		{FQDN: "*.example.com", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}, Protocol: "tcp"},
		{FQDN: "other.example.org", Protocol: "tcp"},
	}}
	learnt := fixedNames{"api.example.com", netip.MustParseAddr("192.0.2.7"), now.Add(30 * time.Second)}
	r := Compile(WithNames(context.Background(), learnt), g, Options{Files: OS{}, Now: now})
	if len(r.Refused) != 0 {
		t.Fatalf("refused: %v", r.Refused)
	}
	if len(r.RuleSet.Egress) != 1 || r.RuleSet.Egress[0].Prefix != netip.MustParsePrefix("::ffff:192.0.2.7/128") {
		t.Errorf("egress %+v", r.RuleSet.Egress)
	}
	if !r.RefreshAt.Equal(now.Add(30*time.Second)) || !r.RuleSet.Expires.Equal(now.Add(30*time.Second+NameMargin)) {
		t.Errorf("refresh at %v, expires %v", r.RefreshAt, r.RuleSet.Expires)
	}
	r = Compile(context.Background(), g, Options{Files: OS{}, Now: now})
	if len(r.Refused) != 2 {
		t.Errorf("without the proxy: refused %v, want the wildcard (and the name no resolver resolves)", r.Refused)
	}
}

// Package compile turns an agent's grants into the rule set the kernel enforces: CIDRs and the
// addresses of DNS names become prefixes in the kernel's 16-byte form with every covering
// prefix's ports merged in (an LPM lookup returns only the longest match), executable paths become
// (device, inode) pairs, unix socket paths become exact or prefix keys.
//
// A rule the kernel cannot enforce (a malformed CIDR, an unknown protocol, a port out of range, a
// path that does not exist, a name that does not resolve) is refused: it is not installed, and
// the refusal names the rule and says why. It is never dropped silently, and it never widens what
// the rest allows: the rule set installed is what the grants allow minus the refused rules. The
// result goes to dataplane.Dataplane.Install.
package compile

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
)

// Resolver resolves the DNS names of fqdn rules.
type Resolver interface {
	// Lookup returns the IPv4 and IPv6 addresses of name and how long they may be used.
	Lookup(ctx context.Context, name string) ([]netip.Addr, time.Duration, error)
}

// Options are what compiling needs of the host.
type Options struct {
	Files Files
	// Resolver resolves fqdn rules; without one they are refused.
	Resolver Resolver
	// Now is when the rule set is compiled (for DNS expiry), a time of pkg/bootclock; zero means
	// bootclock.Now().
	Now time.Time
	// UnixAlways are socket paths every agent may connect to (tetherd's agent socket).
	UnixAlways []string
	// UnixNever are socket paths no grant may reach, exactly or through a /dir/* rule:
	// tetherd's admin socket, the SPIRE sockets, container runtimes. The kernel's default deny
	// then keeps agents off them, whatever the policy says.
	UnixNever []string
	// ExecRoots, when not nil, are where exec rules name files instead of Files: the roots of a
	// pod's containers. A path names the file at that path in each root that has it; a rule is
	// refused only when every root refuses it. Empty (a pod none of whose containers is
	// resolved yet): no exec rule.
	ExecRoots []Files
	// Integrity records the content of granted executables, so that one modified in place is
	// granted again only with the content it was granted with (see Integrity). Nil: every
	// compile grants files as they are then (the kernel still denies a file changed after it).
	Integrity *Integrity
}

// execRootsKey is the context key of WithExecRoots.
type execRootsKey struct{}

// WithExecRoots returns ctx carrying roots for Options.ExecRoots (nil: none resolved yet, which
// grants no exec rule): the compile of one pod agent, under a Compiler shared by every agent.
func WithExecRoots(ctx context.Context, roots []Files) context.Context {
	if roots == nil {
		roots = []Files{}
	}
	return context.WithValue(ctx, execRootsKey{}, roots)
}

// Names are the addresses an agent's own DNS answers gave it, through tetherd's DNS proxy. With
// them in the context (WithNames), an fqdn rule takes its addresses from there, not from the
// Resolver: the addresses the agent was answered, whichever its resolver's answer was.
type Names interface {
	// Addrs returns the addresses learnt for the names pattern covers (NameCovers) that still
	// hold at now, and the first moment after now when what it returns changes (zero: never).
	Addrs(pattern string, now time.Time) ([]netip.Addr, time.Time)
}

type namesKey struct{}

// WithNames returns ctx carrying an agent's learnt names for the compile of its grants.
func WithNames(ctx context.Context, n Names) context.Context {
	return context.WithValue(ctx, namesKey{}, n)
}

// NamesOf returns the Names WithNames put in ctx.
func NamesOf(ctx context.Context) (Names, bool) {
	n, ok := ctx.Value(namesKey{}).(Names)
	return n, ok && n != nil
}

// NameMargin is how long after the last learnt address of a rule set stops holding the kernel
// stops allowing the whole rule set, if tetherd has not installed one without it by then.
const NameMargin = 5 * time.Second

// ExecRootsOf returns the roots WithExecRoots put in ctx, and whether it did.
func ExecRootsOf(ctx context.Context) ([]Files, bool) {
	roots, ok := ctx.Value(execRootsKey{}).([]Files)
	return roots, ok
}

// Refusal is a rule the kernel cannot enforce, and why.
type Refusal struct {
	Rule   string // egress[2], exec[0], ...
	Reason string
}

func (r Refusal) Error() string { return r.Rule + ": " + r.Reason }

// Result is a compiled rule set and what compiling noticed.
type Result struct {
	RuleSet dataplane.RuleSet
	// Refused rules are not in RuleSet.
	Refused  []Refusal
	Warnings []string
	// RefreshAt is when resolved DNS names expire and the grants should be compiled again
	// (zero: never). RuleSet.Expires is dnsGrace after the earliest of them: the kernel drops
	// the resolved addresses then if nobody resolved them again (tetherd stopped).
	RefreshAt time.Time
	// ExecFiles name the files the exec rules allow, as the grants name them (a glob expanded),
	// sorted: `tetherctl run` mounts each read-only over itself in the agent's view.
	ExecFiles []string
}

// Err joins the refusals, or is nil when every rule compiled.
func (r *Result) Err() error {
	errs := make([]error, len(r.Refused))
	for i, f := range r.Refused {
		errs[i] = f
	}
	return errors.Join(errs...)
}

// Compile compiles g. It always returns a rule set the kernel can hold; see the package comment.
func Compile(ctx context.Context, g grants.Grants, opts Options) *Result {
	opts.Files = memoized(ctx, opts.Files)
	c := compiler{opts: opts}
	if c.opts.Now.IsZero() {
		c.opts.Now = bootclock.Now()
	}
	switch g.Mode {
	case "", "enforce":
		c.res.RuleSet.Mode = dataplane.ModeEnforce
	case "audit":
		c.res.RuleSet.Mode = dataplane.ModeAudit
	default:
		c.refuse("mode", "%q is not a mode (enforce or audit); enforcing", g.Mode)
	}
	// Not kernel rules, but read from the same grants: what is wrong is said with the rest.
	if _, err := g.SandboxOf(); err != nil {
		c.refuse("sandbox", "%v", err)
	}
	if _, err := g.Lifetime(); err != nil {
		c.refuse("max_lifetime", "%v", err)
	}
	egress := make([]prefixRule, 0, len(g.Egress))
	for i, e := range g.Egress {
		egress = c.egress(ctx, "egress["+strconv.Itoa(i)+"]", e, egress)
	}
	c.res.RuleSet.Egress = c.merge(egress)
	if opts.ExecRoots != nil {
		c.execInRoots(g, opts.ExecRoots)
	} else {
		c.execRules(g)
	}
	slices.SortFunc(c.res.RuleSet.Exec, func(a, b dataplane.ExecRule) int {
		return cmp.Or(cmp.Compare(a.File.Dev, b.File.Dev), cmp.Compare(a.File.Ino, b.File.Ino), compareBool(a.Audit, b.Audit))
	})
	// One entry per file; a grant that allows silently beats one that audits.
	c.res.RuleSet.Exec = slices.CompactFunc(c.res.RuleSet.Exec, func(a, b dataplane.ExecRule) bool { return a.File == b.File })
	slices.Sort(c.res.ExecFiles)
	c.res.ExecFiles = slices.Compact(c.res.ExecFiles)
	for i, u := range g.Unix {
		c.unix("unix["+strconv.Itoa(i)+"]", u)
	}
	for i, l := range g.Listen {
		c.listen("listen["+strconv.Itoa(i)+"]", l)
	}
	for _, p := range opts.UnixAlways {
		c.res.RuleSet.Unix = append(c.res.RuleSet.Unix, dataplane.Unix{Path: p})
	}
	slices.SortFunc(c.res.RuleSet.Unix, func(a, b dataplane.Unix) int {
		return cmp.Or(strings.Compare(a.Path, b.Path), compareBool(a.Prefix, b.Prefix), compareBool(a.Audit, b.Audit))
	})
	c.res.RuleSet.Unix = slices.CompactFunc(c.res.RuleSet.Unix, func(a, b dataplane.Unix) bool {
		return a.Path == b.Path && a.Prefix == b.Prefix
	})
	c.unixDirs()
	if n := c.res.RuleSet.Entries(); n > dataplane.MaxRules {
		// Nothing of it can be installed: deny everything rather than install a part.
		c.refuse("grants", "need %d kernel entries, an agent's rule set holds %d: nothing is granted", n, dataplane.MaxRules)
		c.res.RuleSet = dataplane.RuleSet{Mode: c.res.RuleSet.Mode}
	}
	return &c.res
}

// execRules compiles the exec and exec_deny rules of g.
func (c *compiler) execRules(g grants.Grants) {
	for i, d := range g.ExecDeny {
		c.deny("exec_deny["+strconv.Itoa(i)+"]", d)
	}
	for i, e := range g.Exec {
		c.exec("exec["+strconv.Itoa(i)+"]", e)
	}
}

// execInRoots compiles the exec and exec_deny rules of g in each of roots (see
// Options.ExecRoots) and keeps the union. A refusal or warning stands when every root gave it.
func (c *compiler) execInRoots(g grants.Grants, roots []Files) {
	refused := map[string][]Refusal{}
	warned := map[string]int{}
	for _, root := range roots {
		in := compiler{opts: c.opts}
		in.opts.Files = root
		in.execRules(g)
		c.res.RuleSet.Exec = append(c.res.RuleSet.Exec, in.res.RuleSet.Exec...)
		c.res.ExecFiles = append(c.res.ExecFiles, in.res.ExecFiles...)
		for _, r := range in.res.Refused {
			refused[r.Rule] = append(refused[r.Rule], r)
		}
		for _, w := range in.res.Warnings {
			warned[w]++
		}
	}
	for _, rs := range refused {
		if len(rs) == len(roots) {
			c.res.Refused = append(c.res.Refused, Refusal{Rule: rs[0].Rule, Reason: rs[0].Reason + " (in every container of the pod)"})
		}
	}
	slices.SortFunc(c.res.Refused, func(a, b Refusal) int { return strings.Compare(a.Rule, b.Rule) })
	for w, n := range warned {
		if n == len(roots) {
			c.warnf("%s", w)
		}
	}
	slices.Sort(c.res.Warnings)
}

func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case !a:
		return -1
	}
	return 1
}

type compiler struct {
	opts Options
	res  Result
	// denied are the files exec_deny names, by identity, with the name it gave.
	denied map[dataplane.FileID]string
}

func (c *compiler) refuse(rule, format string, args ...any) {
	c.res.Refused = append(c.res.Refused, Refusal{Rule: rule, Reason: fmt.Sprintf(format, args...)})
}

func (c *compiler) warnf(format string, args ...any) {
	c.res.Warnings = append(c.res.Warnings, fmt.Sprintf(format, args...))
}

// prefixRule is one port rule granted on one prefix (16-byte form).
var allPorts = []grants.PortRange{{Lo: 0, Hi: 65535}}

type prefixRule struct {
	prefix netip.Prefix
	rule   dataplane.PortRule
}

// egress appends the prefix rules of e to out.
func (c *compiler) egress(ctx context.Context, where string, e grants.Egress, out []prefixRule) []prefixRule {
	prefixes := c.destinations(ctx, where, e)
	if prefixes == nil {
		return out
	}
	rule, ports, ok := c.portRule(where, e)
	if !ok {
		return out
	}
	for _, p := range prefixes {
		for _, r := range ports {
			rule.Lo, rule.Hi = r.Lo, r.Hi
			out = append(out, prefixRule{p, rule})
		}
	}
	return out
}

// destinations are the prefixes an egress grant names (cidr, cidrs, or the addresses its fqdn
// resolves to), or nil with the grant refused.
func (c *compiler) destinations(ctx context.Context, where string, e grants.Egress) []netip.Prefix {
	var prefixes []netip.Prefix
	named := 0
	for _, set := range []bool{e.CIDR != "", e.CIDRs != nil, e.FQDN != ""} {
		if set {
			named++
		}
	}
	switch {
	case named > 1:
		c.refuse(where, "names more than one of cidr, cidrs and fqdn")
		return nil
	case e.FQDN != "":
		prefixes = c.resolve(ctx, where, e.FQDN)
	case e.CIDR != "":
		p, err := parsePrefix(e.CIDR)
		if err != nil {
			c.refuse(where, "%v", err)
			return nil
		}
		prefixes = []netip.Prefix{p}
	case e.CIDRs != nil:
		if len(e.CIDRs) == 0 {
			c.refuse(where, "cidrs is empty")
			return nil
		}
		// A malformed prefix is refused on its own; the others stand.
		for i, s := range e.CIDRs {
			p, err := parsePrefix(s)
			if err != nil {
				c.refuse(fmt.Sprintf("%s.cidrs[%d]", where, i), "%v", err)
				continue
			}
			prefixes = append(prefixes, p)
		}
	default:
		c.refuse(where, "needs a cidr, cidrs or an fqdn")
		return nil
	}
	return prefixes
}

// portRule is the rule an egress grant gives each of its destinations (all but the port range)
// and its port ranges, or false with the grant refused.
func (c *compiler) portRule(where string, e grants.Egress) (dataplane.PortRule, []grants.PortRange, bool) {
	proto, ok := c.protocol(where, e.Protocol)
	if !ok {
		return dataplane.PortRule{}, nil, false
	}
	var bin dataplane.FileID
	if e.Binary != "" {
		c.warnWritable(where+": binary", e.Binary)
		var ok bool
		st, ok := c.file(where+": binary", e.Binary)
		if !ok {
			return dataplane.PortRule{}, nil, false
		}
		bin = st.ID
	}
	ports := e.Ports
	if ports != nil && len(ports) == 0 {
		c.refuse(where, "ports is empty: omit ports to allow every port")
		return dataplane.PortRule{}, nil, false
	}
	if len(ports) == 0 {
		ports = allPorts
	}
	for _, r := range ports {
		if r.Lo > r.Hi {
			c.refuse(where, "port range %d-%d: start is above end", r.Lo, r.Hi)
			return dataplane.PortRule{}, nil, false
		}
	}
	if e.Approval != "" && (e.Grant == 0 || e.Audit) {
		c.refuse(where, "holds by approval %q, which is not in force as a counted grant (or the rule is an audit rule, which allows nothing to count)", e.Approval)
		return dataplane.PortRule{}, nil, false
	}
	var maxDur time.Duration
	if e.MaxDuration != "" {
		d, err := time.ParseDuration(e.MaxDuration)
		if err != nil || d < time.Millisecond || d > dataplane.MaxRuleDuration || d%time.Millisecond != 0 {
			c.refuse(where, "max_duration %q: want a duration of whole milliseconds from 1ms to %s, such as \"30m\"", e.MaxDuration, dataplane.MaxRuleDuration)
			return dataplane.PortRule{}, nil, false
		}
		maxDur = d
	}
	return dataplane.PortRule{Proto: proto, Binary: bin, Audit: e.Audit, Grant: e.Grant, MaxDuration: maxDur}, ports, true
}

// dnsFloor and dnsCeiling bound how soon and how late a resolved name is resolved again. An
// address resolved holds until dnsGrace after that: long enough for tetherd to resolve it again
// (two queries of up to 3 s each) and install the result, so that a name that still resolves to
// it is never cut; past it, the kernel denies with reason expired whether tetherd runs or not.
const (
	dnsFloor   = 5 * time.Second
	dnsCeiling = time.Hour
	dnsGrace   = 15 * time.Second
)

// resolve returns the /32 and /128 prefixes of name's addresses and moves RefreshAt to their
// expiry. The addresses are those tether resolves; an agent resolving the name itself may get
// others (round-robin, geo DNS): grant those names' address ranges as cidr where that matters.
func (c *compiler) resolve(ctx context.Context, where, name string) []netip.Prefix {
	if err := CheckName(name); err != nil {
		c.refuse(where, "fqdn %q: %v", name, err)
		return nil
	}
	if names, ok := NamesOf(ctx); ok {
		return c.learnt(names, name)
	}
	if strings.HasPrefix(name, "*.") {
		c.refuse(where, "fqdn %q: a wildcard name is resolved only by what agents are answered, through the DNS proxy (dns_proxy.enabled)", name)
		return nil
	}
	if c.opts.Resolver == nil {
		c.refuse(where, "fqdn %q: no DNS resolver is configured", name)
		return nil
	}
	addrs, ttl, err := c.opts.Resolver.Lookup(ctx, name)
	if err != nil {
		c.refuse(where, "fqdn %q: %v", name, err)
		// Try again later: the name may resolve then.
		c.refreshIn(dnsFloor)
		return nil
	}
	life := min(max(ttl, dnsFloor), dnsCeiling)
	c.refreshIn(life)
	if len(addrs) == 0 {
		c.refuse(where, "fqdn %q has no A or AAAA records", name)
		return nil
	}
	if at := c.opts.Now.Add(life + dnsGrace); c.res.RuleSet.Expires.IsZero() || at.Before(c.res.RuleSet.Expires) {
		c.res.RuleSet.Expires = at
	}
	return hostPrefixes(addrs)
}

// learnt returns the /128 prefixes of the addresses the agent was answered for the names pattern
// covers, none (not a refusal) before it asked; the rule set is compiled again when one of them
// stops holding, and ends NameMargin after that if tetherd does not.
func (c *compiler) learnt(names Names, pattern string) []netip.Prefix {
	addrs, next := names.Addrs(pattern, c.opts.Now)
	if !next.IsZero() {
		c.refreshIn(next.Sub(c.opts.Now))
		if at := next.Add(NameMargin); c.res.RuleSet.Expires.IsZero() || at.Before(c.res.RuleSet.Expires) {
			c.res.RuleSet.Expires = at
		}
	}
	return append([]netip.Prefix{}, hostPrefixes(addrs)...)
}

// hostPrefixes are the /128 prefixes (16-byte form) of addrs.
func hostPrefixes(addrs []netip.Addr) []netip.Prefix {
	var out []netip.Prefix
	for _, a := range addrs {
		a = a.Unmap()
		if a.Is4() {
			out = append(out, netip.PrefixFrom(netip.AddrFrom16(a.As16()), 128))
		} else {
			out = append(out, netip.PrefixFrom(a.WithZone(""), 128))
		}
	}
	return out
}

// CheckName says whether an fqdn rule's name is one: a domain name, or *. and a domain name (a
// wildcard: every name below the domain, not the domain itself).
func CheckName(name string) error {
	base := strings.TrimPrefix(name, "*.")
	if base == "" || strings.Contains(base, "*") {
		return errors.New("want a domain name, or *. and a domain name")
	}
	if _, ok := dns.IsDomainName(base); !ok || len(base) > 253 {
		return errors.New("not a domain name")
	}
	for _, label := range strings.Split(strings.TrimSuffix(base, "."), ".") {
		if label == "" || len(label) > 63 || strings.Trim(label, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_") != "" {
			return fmt.Errorf("label %q: want letters, digits, hyphens and underscores", label)
		}
	}
	return nil
}

// NameCovers says whether the fqdn rule pattern (exact, or *.domain) covers the queried name;
// both are compared without case and trailing dot.
func NameCovers(pattern, name string) bool {
	pattern = strings.ToLower(strings.TrimSuffix(pattern, "."))
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	if base, ok := strings.CutPrefix(pattern, "*."); ok {
		return strings.HasSuffix(name, "."+base)
	}
	return name == pattern
}

func (c *compiler) refreshIn(d time.Duration) {
	at := c.opts.Now.Add(d)
	if c.res.RefreshAt.IsZero() || at.Before(c.res.RefreshAt) {
		c.res.RefreshAt = at
	}
}

// v4Mapped is where IPv4 lives in the kernel's 16-byte form.
var v4Mapped = netip.MustParsePrefix("::ffff:0:0/96")

// parsePrefix parses a CIDR or an address into the 16-byte form: IPv4 (and IPv6 written as
// ::ffff:a.b.c.d) becomes ::ffff:a.b.c.d/96+n.
func parsePrefix(s string) (netip.Prefix, error) {
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return p, fmt.Errorf("cidr %q: %v", s, err)
		}
		if p.Masked() != p {
			return p, fmt.Errorf("cidr %q has host bits set; did you mean %s?", s, p.Masked())
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return p, fmt.Errorf("cidr %q: not a prefix or an address", s)
		}
		if a.Zone() != "" {
			return p, fmt.Errorf("cidr %q: zones cannot be matched", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Addr().Is4() {
		return netip.PrefixFrom(netip.AddrFrom16(p.Addr().As16()), p.Bits()+96), nil
	}
	return p, nil
}

// inV4 reports whether the 16-byte prefix lies in the IPv4 space.
func inV4(p netip.Prefix) bool { return p.Bits() >= 96 && v4Mapped.Contains(p.Addr()) }

// merge gives every prefix the rules of every prefix that covers it, since the kernel's lookup
// returns only the longest matching prefix.
func (c *compiler) merge(rules []prefixRule) []dataplane.Egress {
	// Sorted by prefix, the rules of one prefix are one run, and a prefix comes after every
	// prefix that covers it.
	order := func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	}
	slices.SortFunc(rules, func(a, b prefixRule) int { return order(a.prefix, b.prefix) })
	ports := make([]dataplane.PortRule, len(rules))
	for i, r := range rules {
		ports[i] = r.rule
	}
	type run struct {
		prefix netip.Prefix
		ports  []dataplane.PortRule
	}
	runs := make([]run, 0, len(rules)+1)
	for i := 0; i < len(rules); {
		j := i + 1
		for j < len(rules) && rules[j].prefix == rules[i].prefix {
			j++
		}
		runs = append(runs, run{rules[i].prefix, ports[i:j:j]})
		i = j
	}
	// An IPv6 prefix that spans the IPv4 space would be the longest match for IPv4 addresses
	// no IPv4 rule covers: an explicit (maybe empty) ::ffff:0:0/96 entry stops it there.
	if i, found := slices.BinarySearchFunc(runs, v4Mapped, func(r run, p netip.Prefix) int { return order(r.prefix, p) }); !found {
		for _, r := range runs {
			if r.prefix.Bits() < 96 && r.prefix.Contains(v4Mapped.Addr()) {
				runs = slices.Insert(runs, i, run{prefix: v4Mapped})
				break
			}
		}
	}
	out := make([]dataplane.Egress, 0, len(runs))
	// covering holds the prefixes that cover the one at hand, shortest first: in this order,
	// those that do not cover it are the last ones pushed.
	var covering []run
	for _, r := range runs {
		p := r.prefix
		for len(covering) > 0 && !covering[len(covering)-1].prefix.Contains(p.Addr()) {
			covering = covering[:len(covering)-1]
		}
		// An IPv4 prefix's ancestors stop at ::ffff:0:0/96.
		top := 0
		if inV4(p) {
			top = 96
		}
		var all []dataplane.PortRule
		sources := 0
		for _, a := range append(covering, r) {
			if a.prefix.Bits() < top {
				continue
			}
			if sources++; sources == 1 {
				all = a.ports // its own run: no copy unless an ancestor adds to it
			} else {
				all = append(slices.Clip(all), a.ports...)
			}
		}
		covering = append(covering, r)
		all = simplify(all)
		if len(all) > dataplane.MaxPortRules {
			c.refuse("egress to "+show(p), "%d distinct port rules apply (its own and those of covering prefixes); the kernel holds %d per prefix: merge port ranges or grant fewer", len(all), dataplane.MaxPortRules)
			continue
		}
		out = append(out, dataplane.Egress{Prefix: p, Ports: all})
	}
	return out
}

// simplify sorts rules, drops those another rule contains, and joins overlapping or adjacent
// ranges of the same protocol, binary, audit flag and max_duration. A rule that allows silently
// contains an audit rule with the same ports; an audit rule contains nothing but audit rules; a
// rule without max_duration (or with a longer one) contains one with. The kernel takes the first
// rule that allows, so rules that count no use and limit no time come first.
// compareLimit orders max_durations loosest first: none, then the longest.
func compareLimit(a, b time.Duration) int {
	switch {
	case a == b:
		return 0
	case a == 0:
		return -1
	case b == 0:
		return 1
	}
	return cmp.Compare(b, a)
}

func simplify(rules []dataplane.PortRule) []dataplane.PortRule {
	if len(rules) <= 1 {
		return rules
	}
	slices.SortFunc(rules, func(a, b dataplane.PortRule) int {
		return cmp.Or(compareBool(a.Audit, b.Audit), cmp.Compare(a.Grant, b.Grant), compareLimit(a.MaxDuration, b.MaxDuration),
			cmp.Compare(a.Binary.Dev, b.Binary.Dev), cmp.Compare(a.Binary.Ino, b.Binary.Ino),
			cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.Lo, b.Lo), cmp.Compare(a.Hi, b.Hi))
	})
	joined := make([]dataplane.PortRule, 0, len(rules))
	for _, r := range rules {
		if n := len(joined); n > 0 {
			last := &joined[n-1]
			if last.Proto == r.Proto && last.Binary == r.Binary && last.Audit == r.Audit && last.Grant == r.Grant &&
				last.MaxDuration == r.MaxDuration && uint32(r.Lo) <= uint32(last.Hi)+1 {
				last.Hi = max(last.Hi, r.Hi)
				continue
			}
		}
		joined = append(joined, r)
	}
	// A counted rule contains only rules of its own grant; any rule that allows without
	// counting contains a counted one.
	contains := func(a, b dataplane.PortRule) bool {
		return (a.Proto == dataplane.ProtoAny || a.Proto == b.Proto) &&
			(a.Binary.IsZero() || a.Binary == b.Binary) && a.Lo <= b.Lo && b.Hi <= a.Hi &&
			(!a.Audit || b.Audit) && (a.Grant == 0 || a.Grant == b.Grant) &&
			(a.MaxDuration == 0 || b.MaxDuration != 0 && a.MaxDuration >= b.MaxDuration)
	}
	out := make([]dataplane.PortRule, 0, len(joined))
	for i, r := range joined {
		dominated := false
		for j, o := range joined {
			if i != j && contains(o, r) && (!contains(r, o) || j < i) {
				dominated = true
				break
			}
		}
		if !dominated {
			out = append(out, r)
		}
	}
	return out
}

// show prints a 16-byte prefix the way it was most likely written.
func show(p netip.Prefix) string {
	if inV4(p) {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96).String()
	}
	return p.String()
}

// unixDirs resolves where each granted unix path leads (its directory, by identity), for the BPF
// LSM check of the peer socket. A path whose directory does not exist yet leads nowhere until it
// does (the next compile).
func (c *compiler) unixDirs() {
	for _, u := range c.res.RuleSet.Unix {
		if strings.HasPrefix(u.Path, "@") {
			continue // abstract: no file
		}
		dir, name := filepath.Split(u.Path)
		if u.Prefix {
			dir, name = u.Path, ""
		}
		st, err := c.opts.Files.Stat(dir)
		if err != nil || st.Regular {
			continue
		}
		c.res.RuleSet.UnixDirs = append(c.res.RuleSet.UnixDirs, dataplane.UnixDir{Dir: st.ID, Name: name, Audit: u.Audit})
	}
	slices.SortFunc(c.res.RuleSet.UnixDirs, func(a, b dataplane.UnixDir) int {
		return cmp.Or(cmp.Compare(a.Dir.Dev, b.Dir.Dev), cmp.Compare(a.Dir.Ino, b.Dir.Ino), strings.Compare(a.Name, b.Name), compareBool(a.Audit, b.Audit))
	})
	// Two paths may lead to one place (/var/run and /run): one entry, silent beats audit.
	c.res.RuleSet.UnixDirs = slices.CompactFunc(c.res.RuleSet.UnixDirs, func(a, b dataplane.UnixDir) bool {
		return a.Dir == b.Dir && a.Name == b.Name
	})
}

// protocol parses a rule's protocol: tcp, udp, or any (also empty).
func (c *compiler) protocol(where, name string) (dataplane.Proto, bool) {
	switch name {
	case "", "any":
		return dataplane.ProtoAny, true
	case "tcp":
		return dataplane.ProtoTCP, true
	case "udp":
		return dataplane.ProtoUDP, true
	}
	c.refuse(where, "protocol %q: the kernel matches tcp, udp or any", name)
	return 0, false
}

// listen compiles a listen rule into port rules of the rule set's listen entry.
func (c *compiler) listen(where string, l grants.Listen) {
	if len(l.Ports) == 0 {
		c.refuse(where, "names no port: a listen rule needs ports")
		return
	}
	proto, ok := c.protocol(where, l.Protocol)
	if !ok {
		return
	}
	for _, p := range l.Ports {
		if len(c.res.RuleSet.Listen) == dataplane.MaxPortRules {
			c.refuse(where, "port %s: the kernel holds %d listen port rules per agent", p, dataplane.MaxPortRules)
			return
		}
		c.res.RuleSet.Listen = append(c.res.RuleSet.Listen, dataplane.PortRule{Proto: proto, Lo: p.Lo, Hi: p.Hi, Audit: l.Audit})
	}
}

// file resolves a path a rule names; a path that is not an existing regular file is refused.
func (c *compiler) file(where, path string) (FileStat, bool) {
	if !filepath.IsAbs(path) {
		c.refuse(where, "%q: must be an absolute path", path)
		return FileStat{}, false
	}
	st, err := c.opts.Files.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		c.refuse(where, "%q does not exist on this host", path)
		return st, false
	case err != nil:
		c.refuse(where, "%v", err)
		return st, false
	case !st.Regular:
		c.refuse(where, "%q is not a regular file", path)
		return st, false
	}
	return st, true
}

// wildcards are what exec paths may use: OPA's glob.match (the reference decision) and the
// compiler's filepath.Glob agree on * and ?, not on classes, alternatives or escapes.
const wildcards = "*?"

func checkExecPath(path string) error {
	switch {
	case !filepath.IsAbs(path):
		return fmt.Errorf("path %q: must be an absolute path", path)
	case strings.ContainsAny(path, "[]{}\\"):
		return fmt.Errorf("path %q: only * and ? are supported as wildcards", path)
	}
	return nil
}

// expand resolves an exec path or glob to the regular files it names, with their names.
func (c *compiler) expand(where, path string) (files []FileStat, names []string, ok bool) {
	if err := checkExecPath(path); err != nil {
		c.refuse(where, "%v", err)
		return nil, nil, false
	}
	if !strings.ContainsAny(path, wildcards) {
		st, ok := c.file(where+": path", path)
		if !ok {
			return nil, nil, false
		}
		return []FileStat{st}, []string{path}, true
	}
	matches, err := c.opts.Files.Glob(path)
	if err != nil {
		c.refuse(where, "path %q: %v", path, err)
		return nil, nil, false
	}
	for _, m := range matches {
		if st, err := c.opts.Files.Stat(m); err == nil && st.Regular {
			files, names = append(files, st), append(names, m)
		}
	}
	return files, names, true
}

// deny records the files an exec_deny entry names; one that names nothing denies nothing.
func (c *compiler) deny(where, path string) {
	if err := checkExecPath(path); err != nil {
		c.refuse(where, "%v", err)
		return
	}
	var names []string
	if strings.ContainsAny(path, wildcards) {
		var err error
		if names, err = c.opts.Files.Glob(path); err != nil {
			c.refuse(where, "path %q: %v", path, err)
			return
		}
	} else {
		names = []string{path}
	}
	for _, n := range names {
		if st, err := c.opts.Files.Stat(n); err == nil && st.Regular {
			if c.denied == nil {
				c.denied = map[dataplane.FileID]string{}
			}
			c.denied[st.ID] = n
		}
	}
}

func (c *compiler) exec(where string, e grants.Exec) {
	var want *[sha256.Size]byte
	if e.SHA256 != "" {
		sum, err := hex.DecodeString(e.SHA256)
		if err != nil || len(sum) != sha256.Size {
			c.refuse(where, "sha256 %q: want 64 hexadecimal digits", e.SHA256)
			return
		}
		want = (*[sha256.Size]byte)(sum)
	}
	if e.Path == "" {
		c.execByContent(where, e, want)
		return
	}
	c.warnWritable(where, e.Path)
	files, names, ok := c.expand(where, e.Path)
	if !ok {
		return
	}
	for i, st := range files {
		if d, denied := c.denied[st.ID]; denied {
			c.refuse(where, "%q is the same file as %q, which exec_deny names", names[i], d)
			continue
		}
		changed := st.Changed
		var err error
		switch {
		case c.opts.Integrity != nil:
			changed, err = c.opts.Integrity.Check(c.opts.Files, names[i], st, want)
		case want != nil: // no record to keep: the file is read now, every compile
			changed, err = digestIs(c.opts.Files, names[i], st.ID, *want)
		}
		if err != nil {
			c.refuse(where, "%v", err)
			continue
		}
		c.res.RuleSet.Exec = append(c.res.RuleSet.Exec, dataplane.ExecRule{File: st.ID, Changed: changed, Audit: e.Audit})
		c.res.ExecFiles = append(c.res.ExecFiles, names[i])
	}
	if len(files) == 0 {
		c.warnf("%s: path %q matches no file on this host", where, e.Path)
	}
}

// digestIs returns the change time of the file at path, which must be id with content want.
func digestIs(files Files, path string, id dataplane.FileID, want [sha256.Size]byte) (int64, error) {
	st, sum, err := files.Digest(path)
	switch {
	case err != nil:
		return 0, err
	case st.ID != id:
		return 0, fmt.Errorf("%s was replaced while it was checked", path)
	case sum != want:
		return 0, fmt.Errorf("%s has SHA-256 %x, the rule names %x", path, sum, want)
	}
	return st.Changed, nil
}

// execByContent grants every file known to have the content a rule by sha256 alone names: tetherd
// learns a file when an agent tries to execute it (its first exec is denied, see Integrity.Learn).
func (c *compiler) execByContent(where string, e grants.Exec, want *[sha256.Size]byte) {
	switch {
	case want == nil:
		c.refuse(where, "needs a path, a sha256 or both")
		return
	case c.opts.Integrity == nil:
		c.refuse(where, "a rule by sha256 alone needs tetherd's record of file contents")
		return
	}
	c.opts.Integrity.Want(*want)
	for _, r := range c.opts.Integrity.Matching(*want) {
		if d, denied := c.denied[r.File]; denied {
			c.refuse(where, "a file with this content is %q, which exec_deny names", d)
			continue
		}
		r.Audit = e.Audit
		c.res.RuleSet.Exec = append(c.res.RuleSet.Exec, r)
	}
}

// warnWritable warns when an executable a rule names, or its directory, can be changed by every
// user: an agent could replace what the rule allows (a file rewritten in place keeps its inode;
// a new file in a globbed directory is granted when the grants are compiled again).
func (c *compiler) warnWritable(where, path string) {
	dir := filepath.Dir(path)
	for _, p := range []string{path, dir} {
		if !strings.ContainsAny(p, "*?[") && c.opts.Files.WorldWritable(p) {
			c.warnf("%s %q: %s is writable by every user, so an agent could change what this rule allows", where, path, p)
			return
		}
	}
}

func (c *compiler) unix(where string, u grants.Unix) {
	path := u.Path
	if name, ok := strings.CutPrefix(path, "@"); ok {
		switch {
		case name == "":
			c.refuse(where, "abstract socket %q: empty name", path)
		case strings.ContainsAny(name, "*"):
			c.refuse(where, "abstract socket %q: abstract names match exactly, without wildcards", path)
		case len(name) > dataplane.MaxUnixPath-1:
			c.refuse(where, "abstract socket %q: longer than %d bytes", path, dataplane.MaxUnixPath-1)
		default:
			c.res.RuleSet.Unix = append(c.res.RuleSet.Unix, dataplane.Unix{Path: path, Audit: u.Audit})
		}
		return
	}
	prefix := false
	p := path
	if dir, ok := strings.CutSuffix(path, "/*"); ok {
		prefix, p = true, dir+"/"
	}
	switch {
	case !filepath.IsAbs(path):
		c.refuse(where, "unix socket %q: must be an absolute path or @name", path)
		return
	case strings.ContainsAny(strings.TrimSuffix(path, "/*"), "*?["):
		c.refuse(where, "unix socket %q: only a trailing /* is supported as a wildcard", path)
		return
	case filepath.Clean(strings.TrimSuffix(p, "/")) != strings.TrimSuffix(p, "/"):
		c.refuse(where, "unix socket %q: not a clean path (no //, . or .. components); agents are matched on the exact string they pass", path)
		return
	case len(p) > dataplane.MaxUnixPath:
		c.refuse(where, "unix socket %q: longer than %d bytes", path, dataplane.MaxUnixPath)
		return
	}
	// Compared as what they reach: a grant of /var/run/docker.sock reaches /run/docker.sock.
	reach := c.opts.Files.Resolve(strings.TrimSuffix(p, "/"))
	if prefix {
		reach += "/"
	}
	for _, never := range c.opts.UnixNever {
		never = c.opts.Files.Resolve(never)
		if never == p || never == reach || prefix && (strings.HasPrefix(never, p) || strings.HasPrefix(never, reach)) {
			c.refuse(where, "unix socket %q reaches %s, which no agent may reach (tetherd's admin socket, SPIRE, container runtimes: api.sensitive_sockets)", path, never)
			return
		}
	}
	dir := filepath.Dir(strings.TrimSuffix(p, "/"))
	if prefix {
		dir = strings.TrimSuffix(p, "/")
	}
	if c.opts.Files.WorldWritable(dir) {
		c.warnf("%s: unix socket %q is in the world-writable directory %s: an agent could put a symlink to another socket there", where, path, dir)
	}
	c.res.RuleSet.Unix = append(c.res.RuleSet.Unix, dataplane.Unix{Path: p, Prefix: prefix, Audit: u.Audit})
}

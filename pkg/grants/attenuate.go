package grants

import (
	"net/netip"
	"path"
	"strings"
)

// Attenuate returns what g grants that ceiling grants too: the rights of an agent that was handed
// a task are at most the rights its sender had. Every rule of the result is the intersection of
// a rule of g with a rule of ceiling (addresses, ports, protocol and binary each intersected), so
// nothing outside ceiling remains; where an intersection cannot be worked out without resolving
// anything (an FQDN against a CIDR, two different globs), the rule is left out. Denies add up,
// the earlier end wins, the stricter sandbox and the shorter max_lifetime win, and the result
// enforces unless both audit.
func Attenuate(g, ceiling Grants) Grants {
	out := Grants{Mode: "enforce"}
	if g.Mode == "audit" && ceiling.Mode == "audit" {
		out.Mode = "audit"
	}
	for _, r := range g.Egress {
		for _, s := range ceiling.Egress {
			out.Egress = append(out.Egress, intersectEgress(r, s)...)
		}
	}
	for _, r := range g.Exec {
		for _, s := range ceiling.Exec {
			p, ok := r.Path+s.Path, true // a rule by content alone names no path
			if r.Path != "" && s.Path != "" {
				p, ok = intersectPaths(r.Path, s.Path, globCovers)
			}
			digest, same := intersectExact(r.SHA256, s.SHA256) // a content pinned by either holds
			if ok && same {
				out.Exec = appendExec(out.Exec, Exec{Path: p, SHA256: digest, Audit: r.Audit || s.Audit})
			}
		}
	}
	for _, r := range g.Listen {
		for _, s := range ceiling.Listen {
			ports, ok1 := intersectPorts(r.Ports, s.Ports)
			proto, ok2 := intersectProto(r.Protocol, s.Protocol)
			if ok1 && ok2 && len(ports) > 0 {
				out.Listen = append(out.Listen, Listen{Ports: ports, Protocol: proto, Audit: r.Audit || s.Audit})
			}
		}
	}
	for _, r := range g.Unix {
		for _, s := range ceiling.Unix {
			if p, ok := intersectPaths(r.Path, s.Path, unixCovers); ok {
				out.Unix = appendUnix(out.Unix, Unix{Path: p, Audit: r.Audit || s.Audit})
			}
		}
	}
	out.ExecDeny = append(append(out.ExecDeny, g.ExecDeny...), ceiling.ExecDeny...)
	// The stricter sandbox and the shorter lifetime; an unknown sandbox (strict) or lifetime (one
	// minute) counts as what it stands for.
	if g.Sandbox != "" || ceiling.Sandbox != "" {
		gs, _ := g.SandboxOf()
		cs, _ := ceiling.SandboxOf()
		out.Sandbox = StricterSandbox(gs, cs)
	}
	if g.MaxLifetime != "" || ceiling.MaxLifetime != "" {
		gl, _ := g.Lifetime()
		cl, _ := ceiling.Lifetime()
		out.MaxLifetime = min(gl, cl).String()
	}
	out.ValidUntil = g.ValidUntil
	if ceiling.ValidUntil != nil && (out.ValidUntil == nil || ceiling.ValidUntil.Before(*out.ValidUntil)) {
		out.ValidUntil = ceiling.ValidUntil
	}
	return out
}

func appendExec(list []Exec, e Exec) []Exec {
	for i, x := range list {
		if x.Path == e.Path && x.SHA256 == e.SHA256 {
			list[i].Audit = x.Audit && e.Audit
			return list
		}
	}
	return append(list, e)
}

func appendUnix(list []Unix, u Unix) []Unix {
	for i, x := range list {
		if x.Path == u.Path {
			list[i].Audit = x.Audit && u.Audit
			return list
		}
	}
	return append(list, u)
}

// intersectEgress is what both r and s allow, as rules.
func intersectEgress(r, s Egress) []Egress {
	proto, ok := intersectProto(r.Protocol, s.Protocol)
	if !ok {
		return nil
	}
	binary, ok := intersectExact(r.Binary, s.Binary)
	if !ok {
		return nil
	}
	ports, ok := intersectPorts(r.Ports, s.Ports)
	if !ok {
		return nil
	}
	base := Egress{Ports: ports, Protocol: proto, Binary: binary, Audit: r.Audit || s.Audit}
	if r.FQDN != "" || s.FQDN != "" {
		if !strings.EqualFold(strings.TrimSuffix(r.FQDN, "."), strings.TrimSuffix(s.FQDN, ".")) {
			return nil // a name and a prefix (or two names) cannot be intersected before resolving
		}
		base.FQDN = r.FQDN
		return []Egress{base}
	}
	var out []Egress
	for _, a := range prefixes(r) {
		for _, b := range prefixes(s) {
			if p, ok := intersectPrefix(a, b); ok {
				e := base
				e.CIDR = p.String()
				out = append(out, e)
			}
		}
	}
	return out
}

func prefixes(e Egress) []netip.Prefix {
	var out []netip.Prefix
	for _, c := range append([]string{e.CIDR}, e.CIDRs...) {
		if c == "" {
			continue
		}
		if p, err := netip.ParsePrefix(c); err == nil {
			out = append(out, p.Masked())
		} else if a, err := netip.ParseAddr(c); err == nil {
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		}
		// A malformed one grants nothing: the compiler refuses it in the sender's set too.
	}
	return out
}

// intersectPrefix is the smaller of two prefixes when one holds the other.
func intersectPrefix(a, b netip.Prefix) (netip.Prefix, bool) {
	if a.Addr().Is4() != b.Addr().Is4() {
		return netip.Prefix{}, false
	}
	switch {
	case a.Bits() <= b.Bits() && a.Contains(b.Addr()):
		return b, true
	case b.Bits() <= a.Bits() && b.Contains(a.Addr()):
		return a, true
	}
	return netip.Prefix{}, false
}

func intersectProto(a, b string) (string, bool) {
	a, b = strings.ToLower(a), strings.ToLower(b)
	switch {
	case a == "" || a == "any":
		return b, true
	case b == "" || b == "any", a == b:
		return a, true
	}
	return "", false
}

// intersectExact intersects two values that match exactly or, empty, anything (a binary, a
// digest).
func intersectExact(a, b string) (string, bool) {
	switch {
	case a == "":
		return b, true
	case b == "", a == b:
		return a, true
	}
	return "", false
}

// intersectPorts intersects two port lists (none: every port).
func intersectPorts(a, b []PortRange) ([]PortRange, bool) {
	if len(a) == 0 {
		return b, true
	}
	if len(b) == 0 {
		return a, true
	}
	var out []PortRange
	for _, x := range a {
		for _, y := range b {
			lo, hi := max(x.Lo, y.Lo), min(x.Hi, y.Hi)
			if lo <= hi {
				out = append(out, PortRange{Lo: lo, Hi: hi})
			}
		}
	}
	return out, len(out) > 0
}

// intersectPaths is the path both patterns allow, when one covers the other.
func intersectPaths(r, s string, covers func(outer, inner string) bool) (string, bool) {
	switch {
	case r == s:
		return r, true
	case covers(s, r):
		return r, true
	case covers(r, s):
		return s, true
	}
	return "", false
}

// globCovers reports whether every path inner names is one outer names: inner is a plain path
// that outer (a glob with * and ?) matches. Two different globs are not compared.
func globCovers(outer, inner string) bool {
	if strings.ContainsAny(inner, "*?[") {
		return false
	}
	ok, err := path.Match(outer, inner)
	return err == nil && ok
}

// unixCovers reports whether outer ("/dir/*": everything below dir, or an exact path) covers
// inner.
func unixCovers(outer, inner string) bool {
	dir, ok := strings.CutSuffix(outer, "/*")
	if !ok || strings.HasPrefix(inner, "@") {
		return false
	}
	in := strings.TrimSuffix(inner, "/*")
	return strings.HasPrefix(in, dir+"/") && !strings.Contains(in, "/../") && !strings.HasSuffix(in, "/..")
}

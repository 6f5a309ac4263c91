// Package compile turns an agent's grants into the rule set the kernel enforces: CIDRs become
// prefixes in the kernel's 16-byte form with every covering prefix's ports merged in (an LPM
// lookup returns only the longest match), executable paths become (device, inode) pairs, unix
// socket paths become exact or prefix keys. A grant the kernel cannot enforce is an error naming
// the grant; it is never dropped silently. The result goes to dataplane.Dataplane.Install.
package compile

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
)

// Files resolves paths to the files the kernel will see.
type Files interface {
	// Stat follows symlinks and returns the file's identity and whether it is a regular file.
	Stat(path string) (dataplane.FileID, bool, error)
	// Glob expands a pattern (filepath.Match syntax).
	Glob(pattern string) ([]string, error)
	// WorldWritable reports whether the file or directory is writable by every user.
	WorldWritable(path string) bool
}

// OS resolves paths on this host.
type OS struct{}

// Stat identifies a file the way the exec hook sees it: its inode and the device of its
// superblock (super_block.s_dev), which mountinfo lists for the file's mount. stat's st_dev is
// not always that: on btrfs it is the subvolume's own anonymous device.
func (OS) Stat(path string) (dataplane.FileID, bool, error) {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, 0, unix.STATX_TYPE|unix.STATX_INO|unix.STATX_MNT_ID, &stx); err != nil {
		return dataplane.FileID{}, false, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	id := dataplane.FileID{Dev: unix.Mkdev(stx.Dev_major, stx.Dev_minor), Ino: stx.Ino}
	if stx.Mask&unix.STATX_MNT_ID != 0 {
		if dev, ok := mounts.device(stx.Mnt_id); ok {
			id.Dev = dev
		}
	}
	return id, stx.Mode&unix.S_IFMT == unix.S_IFREG, nil
}

func (OS) Glob(pattern string) ([]string, error) { return filepath.Glob(pattern) }

func (OS) WorldWritable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().Perm()&0o002 != 0
}

// mountDevices maps mount ids to their superblock's device, from /proc/self/mountinfo; it is
// read again when an id is not known.
type mountDevices struct {
	mu   sync.Mutex
	devs map[uint64]uint64
}

var mounts mountDevices

func (m *mountDevices) device(mntID uint64) (uint64, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if dev, ok := m.devs[mntID]; ok {
		return dev, true
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return 0, false
	}
	m.devs = parseMountDevices(string(b))
	dev, ok := m.devs[mntID]
	return dev, ok
}

// parseMountDevices reads "ID PARENT MAJOR:MINOR ..." lines.
func parseMountDevices(mountinfo string) map[uint64]uint64 {
	out := map[uint64]uint64{}
	for _, line := range strings.Split(mountinfo, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		id, err1 := strconv.ParseUint(f[0], 10, 64)
		maj, min, ok := strings.Cut(f[2], ":")
		major, err2 := strconv.ParseUint(maj, 10, 32)
		minor, err3 := strconv.ParseUint(min, 10, 32)
		if err1 == nil && err2 == nil && err3 == nil && ok {
			out[id] = unix.Mkdev(uint32(major), uint32(minor))
		}
	}
	return out
}

// Result is a compiled rule set and what the compiler noticed but did not refuse.
type Result struct {
	RuleSet  dataplane.RuleSet
	Warnings []string
}

// Compile compiles g. Every grant that cannot be enforced is reported, joined in one error.
func Compile(g grants.Grants, files Files) (*Result, error) {
	var c compiler
	c.files = files
	switch g.Mode {
	case "", "enforce":
		c.res.RuleSet.Mode = dataplane.ModeEnforce
	case "audit":
		c.res.RuleSet.Mode = dataplane.ModeAudit
	default:
		c.errorf("mode %q: want enforce or audit", g.Mode)
	}
	var egress []prefixRule
	for i, e := range g.Egress {
		egress = append(egress, c.egress(fmt.Sprintf("egress[%d]", i), e)...)
	}
	c.res.RuleSet.Egress = c.merge(egress)
	for i, e := range g.Exec {
		c.exec(fmt.Sprintf("exec[%d]", i), e.Path)
	}
	slices.SortFunc(c.res.RuleSet.Exec, func(a, b dataplane.FileID) int {
		return cmp.Or(cmp.Compare(a.Dev, b.Dev), cmp.Compare(a.Ino, b.Ino))
	})
	c.res.RuleSet.Exec = slices.Compact(c.res.RuleSet.Exec)
	for i, u := range g.Unix {
		c.unix(fmt.Sprintf("unix[%d]", i), u.Path)
	}
	slices.SortFunc(c.res.RuleSet.Unix, func(a, b dataplane.Unix) int { return strings.Compare(a.Path, b.Path) })
	c.res.RuleSet.Unix = slices.CompactFunc(c.res.RuleSet.Unix, func(a, b dataplane.Unix) bool { return a == b })
	if n := c.res.RuleSet.Entries(); n > dataplane.MaxRules {
		c.errorf("the grants need %d kernel entries, an agent's rule set holds %d", n, dataplane.MaxRules)
	}
	if err := errors.Join(c.errs...); err != nil {
		return nil, err
	}
	return &c.res, nil
}

// RuleSet compiles g against this host's files, in the form pkg/agents takes.
func RuleSet(g grants.Grants) (*dataplane.RuleSet, []string, error) {
	res, err := Compile(g, OS{})
	if err != nil {
		return nil, nil, err
	}
	return &res.RuleSet, res.Warnings, nil
}

type compiler struct {
	files Files
	res   Result
	errs  []error
}

func (c *compiler) errorf(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf(format, args...))
}

func (c *compiler) warnf(format string, args ...any) {
	c.res.Warnings = append(c.res.Warnings, fmt.Sprintf(format, args...))
}

// prefixRule is one port rule granted on one prefix (16-byte form).
type prefixRule struct {
	prefix netip.Prefix
	rule   dataplane.PortRule
}

func (c *compiler) egress(where string, e grants.Egress) []prefixRule {
	if e.FQDN != "" {
		c.errorf("%s: fqdn %q: DNS-name rules are not enforceable yet (tether has no DNS-aware egress); grant the addresses as cidr", where, e.FQDN)
		return nil
	}
	if e.CIDR == "" {
		c.errorf("%s: needs a cidr", where)
		return nil
	}
	p, err := parsePrefix(e.CIDR)
	if err != nil {
		c.errorf("%s: %v", where, err)
		return nil
	}
	var proto dataplane.Proto
	switch strings.ToLower(e.Protocol) {
	case "", "any":
		proto = dataplane.ProtoAny
	case "tcp":
		proto = dataplane.ProtoTCP
	case "udp":
		proto = dataplane.ProtoUDP
	default:
		c.errorf("%s: protocol %q: want tcp, udp or any", where, e.Protocol)
		return nil
	}
	var bin dataplane.FileID
	if e.Binary != "" {
		c.warnWritable(where+": binary", e.Binary)
		var ok bool
		if bin, ok = c.file(where+": binary", e.Binary); !ok {
			return nil // warned or errored: a rule for a binary that is not here allows nothing
		}
	}
	ports := e.Ports
	if len(ports) == 0 {
		ports = []grants.PortRange{{Lo: 0, Hi: 65535}}
	}
	var out []prefixRule
	for _, r := range ports {
		if r.Lo > r.Hi {
			c.errorf("%s: port range %d-%d: start is above end", where, r.Lo, r.Hi)
			continue
		}
		out = append(out, prefixRule{p, dataplane.PortRule{Proto: proto, Lo: r.Lo, Hi: r.Hi, Binary: bin}})
	}
	return out
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
	own := map[netip.Prefix][]dataplane.PortRule{}
	for _, r := range rules {
		own[r.prefix] = append(own[r.prefix], r.rule)
	}
	// An IPv6 prefix that spans the IPv4 space would be the longest match for IPv4 addresses
	// no IPv4 rule covers: an explicit (maybe empty) ::ffff:0:0/96 entry stops it there.
	if _, ok := own[v4Mapped]; !ok {
		for p := range own {
			if p.Bits() < 96 && p.Contains(v4Mapped.Addr()) {
				own[v4Mapped] = nil
				break
			}
		}
	}
	prefixes := make([]netip.Prefix, 0, len(own))
	for p := range own {
		prefixes = append(prefixes, p)
	}
	slices.SortFunc(prefixes, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	out := make([]dataplane.Egress, 0, len(prefixes))
	for _, p := range prefixes {
		// Every prefix that covers p is one of its ancestors: walk them up to the root of its
		// address family (an IPv4 prefix stops at ::ffff:0:0/96).
		var all []dataplane.PortRule
		top := 0
		if inV4(p) {
			top = 96
		}
		for bits := p.Bits(); bits >= top; bits-- {
			all = append(all, own[netip.PrefixFrom(p.Addr(), bits).Masked()]...)
		}
		all = simplify(all)
		if len(all) > dataplane.MaxPortRules {
			c.errorf("egress to %s: %d distinct port rules apply (its own and those of covering prefixes); the kernel holds %d per prefix: merge port ranges or grant fewer", show(p), len(all), dataplane.MaxPortRules)
			continue
		}
		out = append(out, dataplane.Egress{Prefix: p, Ports: all})
	}
	return out
}

// simplify sorts rules, drops those another rule contains, and joins overlapping or adjacent
// ranges of the same protocol and binary.
func simplify(rules []dataplane.PortRule) []dataplane.PortRule {
	slices.SortFunc(rules, func(a, b dataplane.PortRule) int {
		return cmp.Or(cmp.Compare(a.Binary.Dev, b.Binary.Dev), cmp.Compare(a.Binary.Ino, b.Binary.Ino),
			cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.Lo, b.Lo), cmp.Compare(a.Hi, b.Hi))
	})
	var joined []dataplane.PortRule
	for _, r := range rules {
		if n := len(joined); n > 0 {
			last := &joined[n-1]
			if last.Proto == r.Proto && last.Binary == r.Binary && uint32(r.Lo) <= uint32(last.Hi)+1 {
				last.Hi = max(last.Hi, r.Hi)
				continue
			}
		}
		joined = append(joined, r)
	}
	// A rule for any protocol, or for any binary, contains a narrower one with the same ports.
	contains := func(a, b dataplane.PortRule) bool {
		return (a.Proto == dataplane.ProtoAny || a.Proto == b.Proto) &&
			(a.Binary.IsZero() || a.Binary == b.Binary) && a.Lo <= b.Lo && b.Hi <= a.Hi
	}
	out := joined[:0:0]
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

// file resolves a path a rule names. A path that does not exist here is a warning (nothing can
// run it, so the rule allows nothing); one that is not a regular file is an error.
func (c *compiler) file(where, path string) (dataplane.FileID, bool) {
	if !filepath.IsAbs(path) {
		c.errorf("%s %q: must be an absolute path", where, path)
		return dataplane.FileID{}, false
	}
	id, regular, err := c.files.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		c.warnf("%s %q does not exist on this host; the rule allows nothing until it does and the grants are compiled again", where, path)
		return id, false
	case err != nil:
		c.errorf("%s: %v", where, err)
		return id, false
	case !regular:
		c.errorf("%s %q is not a regular file", where, path)
		return id, false
	}
	return id, true
}

func (c *compiler) exec(where, path string) {
	c.warnWritable(where, path)
	if !strings.ContainsAny(path, "*?[") {
		if id, ok := c.file(where+": path", path); ok {
			c.res.RuleSet.Exec = append(c.res.RuleSet.Exec, id)
		}
		return
	}
	if !filepath.IsAbs(path) {
		c.errorf("%s: path %q: must be an absolute path", where, path)
		return
	}
	matches, err := c.files.Glob(path)
	if err != nil {
		c.errorf("%s: path %q: %v", where, path, err)
		return
	}
	n := 0
	for _, m := range matches {
		if id, regular, err := c.files.Stat(m); err == nil && regular {
			c.res.RuleSet.Exec = append(c.res.RuleSet.Exec, id)
			n++
		}
	}
	if n == 0 {
		c.warnf("%s: path %q matches no file on this host", where, path)
	}
}

// warnWritable warns when an executable a rule names, or its directory, can be changed by every
// user: an agent could replace what the rule allows (a file rewritten in place keeps its inode;
// a new file in a globbed directory is granted when the grants are compiled again).
func (c *compiler) warnWritable(where, path string) {
	dir := filepath.Dir(path)
	for _, p := range []string{path, dir} {
		if !strings.ContainsAny(p, "*?[") && c.files.WorldWritable(p) {
			c.warnf("%s %q: %s is writable by every user, so an agent could change what this rule allows", where, path, p)
			return
		}
	}
}

func (c *compiler) unix(where, path string) {
	if name, ok := strings.CutPrefix(path, "@"); ok {
		switch {
		case name == "":
			c.errorf("%s: abstract socket %q: empty name", where, path)
		case strings.ContainsAny(name, "*"):
			c.errorf("%s: abstract socket %q: abstract names match exactly, without wildcards", where, path)
		case len(name) > dataplane.MaxUnixPath-1:
			c.errorf("%s: abstract socket %q: longer than %d bytes", where, path, dataplane.MaxUnixPath-1)
		default:
			c.res.RuleSet.Unix = append(c.res.RuleSet.Unix, dataplane.Unix{Path: path})
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
		c.errorf("%s: unix socket %q: must be an absolute path or @name", where, path)
		return
	case strings.ContainsAny(strings.TrimSuffix(path, "/*"), "*?["):
		c.errorf("%s: unix socket %q: only a trailing /* is supported as a wildcard", where, path)
		return
	case filepath.Clean(strings.TrimSuffix(p, "/")) != strings.TrimSuffix(p, "/"):
		c.errorf("%s: unix socket %q: not a clean path (no //, . or .. components); agents are matched on the exact string they pass", where, path)
		return
	case len(p) > dataplane.MaxUnixPath:
		c.errorf("%s: unix socket %q: longer than %d bytes", where, path, dataplane.MaxUnixPath)
		return
	}
	dir := filepath.Dir(strings.TrimSuffix(p, "/"))
	if prefix {
		dir = strings.TrimSuffix(p, "/")
	}
	if c.files.WorldWritable(dir) {
		c.warnf("%s: unix socket %q is in the world-writable directory %s: an agent could put a symlink to another socket there", where, path, dir)
	}
	c.res.RuleSet.Unix = append(c.res.RuleSet.Unix, dataplane.Unix{Path: p, Prefix: prefix})
}

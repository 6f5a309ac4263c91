// Package grants is what an agent may do, as configuration (and, later, policy) states it: the
// input of the compile stage, which turns it into kernel rule sets. The JSON form here is the
// contract with policy: data.tether.grants evaluates to this shape.
package grants

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Grants is an agent's complete set of rights; anything not granted is denied.
type Grants struct {
	// Mode is "enforce" (the default) or "audit" (denials are reported, not enforced).
	Mode   string   `json:"mode,omitempty"`
	Egress []Egress `json:"egress,omitempty"`
	Exec   []Exec   `json:"exec,omitempty"`
	Unix   []Unix   `json:"unix,omitempty"`
	// Listen names the ports an agent may listen on beyond loopback.
	Listen []Listen `json:"listen,omitempty"`
	// ExecDeny names files no exec rule may grant (absolute paths, or globs with * and ?). They
	// are matched by file identity: an exec rule that resolves to one of them, under any name (a
	// symlink, a hard link, a glob), is refused. The shipped policy lists here the high-risk
	// tools the task type does not grant.
	ExecDeny []string `json:"exec_deny,omitempty"`
	// ValidUntil, when set, is when these grants end; tether re-evaluates then.
	ValidUntil *time.Time `json:"valid_until,omitempty"`
	// Sandbox is how `tetherctl run` confines the agent it launches: strict, default (empty) or
	// off, which a launch rule must allow (launch[].unconfined). It is read when the agent is
	// launched: a process cannot be confined more, or less, once it runs.
	Sandbox string `json:"sandbox,omitempty"`
	// MaxLifetime, a Go duration, bounds the agent's task: no renewal (a heartbeat, or the agent's
	// own on the agent socket) takes it past this long after it started. Empty: DefaultMaxLifetime.
	MaxLifetime string `json:"max_lifetime,omitempty"`
}

// The sandbox profiles, loosest first.
const (
	SandboxOff     = "off"
	SandboxDefault = "default"
	SandboxStrict  = "strict"
)

var sandboxRank = map[string]int{SandboxOff: 0, SandboxDefault: 1, "": 1, SandboxStrict: 2}

// SandboxOf is the grants' sandbox profile: default when none is named, and strict, with an
// error saying why, when what is named is not a profile (a typo must not loosen anything).
func (g Grants) SandboxOf() (string, error) {
	switch g.Sandbox {
	case "":
		return SandboxDefault, nil
	case SandboxOff, SandboxDefault, SandboxStrict:
		return g.Sandbox, nil
	}
	return SandboxStrict, fmt.Errorf("sandbox %q: want strict, default or off; strict applies", g.Sandbox)
}

// StricterSandbox is the stricter of two sandbox profiles.
func StricterSandbox(a, b string) string {
	if r, ok := sandboxRank[b]; !ok || r > sandboxRank[a] {
		a = b
	}
	return a
}

// DefaultMaxLifetime bounds a task whose grants name no max_lifetime.
const DefaultMaxLifetime = 24 * time.Hour

// Lifetime is the grants' max_lifetime: DefaultMaxLifetime when none is named, and, with an error
// saying why, one minute when what is named is not a positive duration.
func (g Grants) Lifetime() (time.Duration, error) {
	if g.MaxLifetime == "" {
		return DefaultMaxLifetime, nil
	}
	d, err := time.ParseDuration(g.MaxLifetime)
	if err != nil || d <= 0 {
		return time.Minute, fmt.Errorf("max_lifetime %q: want a positive Go duration (\"8h\", \"90m\"); a task then lives one minute", g.MaxLifetime)
	}
	return d, nil
}

// Egress allows outbound connections and datagrams.
type Egress struct {
	// Exactly one of CIDR, CIDRs and FQDN says where to.
	// CIDR is an IPv4 or IPv6 prefix, or a single address.
	CIDR string `json:"cidr,omitempty"`
	// CIDRs are several, with the same ports, protocol and binary (a named network).
	CIDRs []string `json:"cidrs,omitempty"`
	// FQDN is a DNS name, resolved when compiled and again when its records expire.
	FQDN string `json:"fqdn,omitempty"`
	// Ports are single ports or ranges; none means every port.
	Ports []PortRange `json:"ports,omitempty"`
	// Protocol is tcp, udp, or any (the default).
	Protocol string `json:"protocol,omitempty"`
	// Binary restricts the rule to processes running this executable.
	Binary string `json:"binary,omitempty"`
	// Audit allows the traffic but reports it as would-deny: a rule being phased out.
	Audit bool `json:"audit,omitempty"`
	// Approval names the step-up approval (input.task.approvals[_].id) the rule holds by: the
	// kernel then allows it only for the approval's uses and until it expires (a counted grant).
	// Uses count connects; a connection a use opened lives until the approval ends.
	Approval string `json:"approval,omitempty"`
	// MaxDuration, a Go duration ("30m", "90s"), ends every connection the rule allows that
	// long after its connect: its packets are dropped from then on and the socket terminated.
	MaxDuration string `json:"max_duration,omitempty"`
	// Grant is the kernel's counted grant of Approval: tether sets it before compiling (the
	// policy cannot). A rule whose approval has none is refused.
	Grant uint32 `json:"-"`
}

// Exec allows executing a file, named by an absolute path or a glob of them, while its content
// is the content it was granted with.
type Exec struct {
	Path string `json:"path"`
	// SHA256, 64 hexadecimal digits, is the content the file must have: it is granted only with
	// this digest, and granted again after an in-place change only when it still has it.
	// Without it, the content the file had when it was first granted is the one it must keep.
	SHA256 string `json:"sha256,omitempty"`
	Audit  bool   `json:"audit,omitempty"`
}

// Listen allows an agent to bind to addresses other than loopback on ports, and to accept
// connections there. Without listen rules an agent listens on loopback only.
type Listen struct {
	// Ports are single ports or ranges; at least one.
	Ports []PortRange `json:"ports"`
	// Protocol is tcp, udp, or any (the default).
	Protocol string `json:"protocol,omitempty"`
	Audit    bool   `json:"audit,omitempty"`
}

// Unix allows connecting or sending to a unix socket: an absolute path, a directory prefix
// written "/dir/*", or an abstract name written "@name".
type Unix struct {
	Path  string `json:"path"`
	Audit bool   `json:"audit,omitempty"`
}

// PortRange is an inclusive range of ports. Its JSON form is a number (443) or a string
// ("443" or "8000-8100").
type PortRange struct {
	Lo, Hi uint16
}

func (p PortRange) String() string {
	if p.Lo == p.Hi {
		return strconv.Itoa(int(p.Lo))
	}
	return fmt.Sprintf("%d-%d", p.Lo, p.Hi)
}

// ParsePortRange parses "443" or "8000-8100".
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(strings.TrimSpace(s), "-")
	l, err := parsePort(lo)
	if err != nil {
		return PortRange{}, fmt.Errorf("port range %q: %w", s, err)
	}
	h := l
	if isRange {
		if h, err = parsePort(hi); err != nil {
			return PortRange{}, fmt.Errorf("port range %q: %w", s, err)
		}
	}
	if l > h {
		return PortRange{}, fmt.Errorf("port range %q: start is above end", s)
	}
	return PortRange{Lo: l, Hi: h}, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil {
		return 0, fmt.Errorf("%q is not a port number (0-65535)", s)
	}
	return uint16(n), nil
}

func (p PortRange) MarshalJSON() ([]byte, error) {
	if p.Lo == p.Hi {
		return []byte(strconv.Itoa(int(p.Lo))), nil
	}
	return json.Marshal(p.String())
}

func (p *PortRange) UnmarshalJSON(b []byte) error {
	var s string
	if len(b) > 0 && b[0] == '"' {
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
	} else {
		s = string(b)
	}
	r, err := ParsePortRange(s)
	if err != nil {
		return err
	}
	*p = r
	return nil
}

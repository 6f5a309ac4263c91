// Package dataplane holds the types that cross the boundary to the kernel: the compiled rule set
// of one agent (what compile produces and kernel installs), the per-agent state the kernel checks
// first, and the decision events the kernel reports. It has no dependency on cilium/ebpf, so every
// stage above the kernel layer can be tested against a fake Dataplane.
package dataplane

import (
	"fmt"
	"net/netip"
	"time"
)

// Limits of the kernel maps. pkg/kernel checks them against the generated C enum tether_limits.
const (
	MaxAgents     = 16384
	MaxCgroups    = 65536
	MaxAncestors  = 16
	MaxRules      = 65536
	MaxPortRules  = 16
	MaxUnixPath   = 107 // sun_path holds 108 bytes including the terminating NUL
	MaxIDLen      = 255
	MaxCgroupPath = 255
	MaxParents    = 64 // agent parent cgroups
)

// Slot is the kernel's index of an agent.
type Slot uint32

// Mode says whether an agent's denials are enforced or only reported.
type Mode uint8

const (
	ModeEnforce Mode = 0
	ModeAudit   Mode = 1
)

func (m Mode) String() string {
	switch m {
	case ModeEnforce:
		return "enforce"
	case ModeAudit:
		return "audit"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// ParseMode accepts "enforce" and "audit".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "enforce":
		return ModeEnforce, nil
	case "audit":
		return ModeAudit, nil
	}
	return 0, fmt.Errorf("unknown mode %q (want enforce or audit)", s)
}

// Proto is an IP protocol number; ProtoAny matches TCP and UDP.
type Proto uint8

const (
	ProtoAny Proto = 0
	ProtoTCP Proto = 6
	ProtoUDP Proto = 17
)

func (p Proto) String() string {
	switch p {
	case ProtoAny:
		return "any"
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

// FileID names a file the way the kernel sees it: the device of its superblock (in stat(2)'s
// encoding) and its inode number.
type FileID struct {
	Dev uint64
	Ino uint64
}

func (f FileID) IsZero() bool { return f == FileID{} }

// PortRule allows one protocol and port range, optionally only for one calling binary. An audit
// rule allows and reports the traffic as would-deny (a rule on its way out).
type PortRule struct {
	Proto  Proto
	Lo, Hi uint16
	Binary FileID // zero: any binary
	Audit  bool
	// Grant, when not zero, makes the rule a counted grant: it allows only while the kernel's
	// grant Grant (SetGrant) has uses left and has not expired, and each allowed connect or
	// datagram takes a use. A connection it allowed lives until the grant expires (or, without
	// an expiry, while it has uses left), or until the rule is gone.
	Grant uint32
	// MaxDuration, when not zero, ends every connection the rule allowed that long after its
	// connect: its packets are dropped from then on and the socket is terminated.
	MaxDuration time.Duration
}

// MaxRuleDuration is the longest MaxDuration the kernel holds (milliseconds in 32 bits).
const MaxRuleDuration = time.Duration(1<<32-1) * time.Millisecond

// MaxGrants bounds the counted grants in force at once (TETHER_MAX_GRANTS); grant 0 is none.
const MaxGrants = 4096

// ExecRule allows executing one file while it is unchanged; an audit rule allows and reports it
// as would-deny.
type ExecRule struct {
	File FileID
	// Changed is the file's change time (ctime, nanoseconds since the epoch) when it was granted:
	// the kernel denies the file (ReasonModifiedFile) once its change time differs, that is once
	// it was written, truncated, chmodded or renamed over in place. Zero never matches.
	Changed int64
	Audit   bool
}

// Egress is one entry of the kernel's egress trie: a prefix in 16-byte form (IPv4 as
// ::ffff:a.b.c.d/96+n) and every port rule that applies to addresses whose longest matching
// prefix it is, inherited rules included.
type Egress struct {
	Prefix netip.Prefix
	Ports  []PortRule
}

// Unix allows connecting or sending to a unix socket address. Path starting with "@" is an
// abstract name (matched exactly); otherwise an absolute pathname, matched exactly or, with
// Prefix, as a string prefix.
type Unix struct {
	Path   string
	Prefix bool
	Audit  bool
}

// UnixDir is where a granted unix socket path leads: its directory (by identity) and the socket's
// name in it, or no name for a directory prefix (anything below it). Under BPF LSM the kernel
// allows a connect or send to a socket bound to a path only when the socket file is one of these,
// whatever string led there.
type UnixDir struct {
	Dir   FileID
	Name  string
	Audit bool
}

// RuleSet is one agent's complete, compiled rule set. The kernel installs it as one unit.
type RuleSet struct {
	Mode       Mode
	Generation uint64
	Egress     []Egress
	Exec       []ExecRule
	Unix       []Unix
	// UnixDirs are where the Unix paths lead (compiled from them; see UnixDir).
	UnixDirs []UnixDir
	// Listen are the ports an agent may bind to on addresses other than loopback, and accept
	// connections on (Binary, Grant and MaxDuration unused). None: loopback only.
	Listen []PortRule
	// Expires is when the rule set stops holding (zero: never): from then on the kernel denies
	// everything of the agent with ReasonExpired (a would-deny in audit mode), whether tetherd
	// runs or not, until another rule set is installed or SetExpiry moves it. A time of
	// pkg/bootclock.
	Expires time.Time
}

// Entries is the number of kernel map entries the rule set needs (the header included).
func (rs *RuleSet) Entries() int {
	n := 1 + len(rs.Egress) + len(rs.Exec) + len(rs.Unix) + len(rs.UnixDirs)
	if len(rs.Listen) > 0 {
		n++
	}
	return n
}

// AgentFlags is the state the kernel checks before any rule.
type AgentFlags uint32

const (
	AgentActive AgentFlags = 1 << 0
	AgentKilled AgentFlags = 1 << 1
	AgentFrozen AgentFlags = 1 << 2
	// AgentContainers: the agent is a pod. Its exec rules name files inside its containers'
	// roots; the kernel stops a container's first exec that no rule allows (ReasonUnresolvedRoot)
	// until tetherd has resolved them in that container's root (see pkg/containers).
	AgentContainers AgentFlags = 1 << 3
)

// ContainerRoot is a container cgroup of a pod agent (AgentContainers) whose root tetherd has
// resolved the agent's exec rules in: from then on the kernel decides its execs by the rules, and
// stops none of them to wait for tetherd (ReasonUnresolvedRoot).
type ContainerRoot struct {
	Slot Slot
	// Dir identifies the container's root directory (stat's device, inode): a restarted tetherd
	// resolves the rules again only through a process whose root is still this one.
	Dir FileID
}

// Info is what the daemon records, in a pinned map, about the agent in a slot, so that a restarted
// daemon knows whom the kernel state belongs to.
type Info struct {
	SpiffeID     string
	CgroupPath   string
	CgroupID     uint64
	Generation   uint64
	Registered   time.Time
	Launched     bool  // tetherd created the cgroup and removes it when the agent exits
	ModeOverride *Mode // set through the API; overrides the grants' mode
}

// Kind is what a hook was asked to do.
type Kind uint8

const (
	KindConnect4 Kind = iota
	KindConnect6
	KindSendmsg4
	KindSendmsg6
	KindConnectUnix
	KindSendmsgUnix
	KindExec
	KindSocket
	// KindSockopt is a setsockopt of IP options or IPv6 routing and option headers (refused).
	KindSockopt
	// KindPacket is a packet an agent socket sent: dropped because the agent is killed, its
	// socket's destination is no longer allowed, or it carries a detour header.
	KindPacket
	// KindTerminate is a live socket checked after its agent's rule set changed: terminated
	// when its destination is no longer allowed.
	KindTerminate
	// KindMigrate is an agent process moved out of its agent's cgroup subtree: killed.
	KindMigrate
	// KindBind is a bind to an address other than loopback, or a connection offered to an
	// agent's listener: allowed on the ports of its listen rules only.
	KindBind
	// KindGuard is an LSM guard: a user namespace, bpf(), a ptrace of another process.
	KindGuard
	numKinds
)

// NumKinds is the number of kinds the kernel counts.
const NumKinds = int(numKinds)

var kindNames = [...]string{"connect4", "connect6", "sendmsg4", "sendmsg6", "connect_unix", "sendmsg_unix", "exec", "socket", "sockopt", "packet", "terminate", "migrate", "bind", "guard"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Verdict is what the kernel did.
type Verdict uint8

const (
	VerdictAllow Verdict = iota
	VerdictDeny
	VerdictAudit // audit mode: would have denied, allowed
	numVerdicts
)

// NumVerdicts is the number of verdicts the kernel counts.
const NumVerdicts = int(numVerdicts)

var verdictNames = [...]string{"allow", "deny", "audit-deny"}

func (v Verdict) String() string {
	if int(v) < len(verdictNames) {
		return verdictNames[v]
	}
	return fmt.Sprintf("verdict(%d)", uint8(v))
}

// Reason is why the kernel reached a verdict.
type Reason uint8

const (
	ReasonRule Reason = iota
	ReasonNoRule
	ReasonKilled
	ReasonUnknownCgroup
	ReasonNoRuleSet
	ReasonSocketType
	ReasonBinaryUnknown
	ReasonAuditRule
	ReasonGrantSpent
	// ReasonRevoked: the rule set in force no longer allows a live socket's destination.
	ReasonRevoked
	// ReasonDetour: IP options or an IPv6 routing header would take the packet elsewhere.
	ReasonDetour
	// ReasonMaxDuration: the max_duration of the rule that allowed the connection passed.
	ReasonMaxDuration
	// ReasonMigration: an agent process left its agent's cgroup subtree.
	ReasonMigration
	// ReasonDepth: below an agent parent, deeper than the walk for its agent reaches.
	ReasonDepth
	// ReasonModifiedFile: a granted executable changed since it was granted.
	ReasonModifiedFile
	// ReasonMountNS: a unix path connect from another mount namespace than the agent's.
	ReasonMountNS
	// ReasonFamily: a socket family agents do not get (AF_VSOCK, AF_PACKET, ...).
	ReasonFamily
	// ReasonUserNS: a new user namespace.
	ReasonUserNS
	// ReasonPtrace: ptrace of another agent's process or of one outside agents.
	ReasonPtrace
	// ReasonBind: a bind or a listener on a port no listen rule names.
	ReasonBind
	// ReasonBPF: the bpf() system call.
	ReasonBPF
	// ReasonExpired: the rule set in force passed its expiry (RuleSet.Expires).
	ReasonExpired
	// ReasonLineageFull: the process's lineage could not be recorded (the lineage map is full):
	// killed at its exec rather than run untracked.
	ReasonLineageFull
	// ReasonUnresolvedRoot: an exec no rule allows in a container of a pod agent whose root
	// tetherd has not resolved the exec rules in yet (see AgentContainers): the process is
	// stopped until tetherd has, and then continued or killed.
	ReasonUnresolvedRoot
	// ReasonDNSProxy: an agent's DNS (port 53) sent to tetherd's DNS proxy, which decides by
	// name (allowed in the kernel).
	ReasonDNSProxy
	// ReasonDNSOverTLS: port 853 while the DNS proxy is on and configured to deny it.
	ReasonDNSOverTLS
)

var reasonNames = [...]string{"rule", "no-rule", "killed", "unknown-cgroup", "no-ruleset", "socket-type", "binary-unknown", "audit-rule", "grant-spent", "revoked", "detour", "max-duration", "migration", "depth", "modified-file", "mount-ns", "family", "userns", "ptrace", "bind", "bpf", "expired", "lineage-full", "unresolved-root", "dns-proxy", "dns-over-tls"}

func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

// NoSlot is the slot of an event from a cgroup bound to no agent.
const NoSlot Slot = 0xffffffff

// Process is one link of a process chain.
type Process struct {
	PID    uint32
	Comm   string
	Binary FileID
}

// Event is one decision the kernel reported.
type Event struct {
	Time       time.Time
	Generation uint64
	CgroupID   uint64
	Slot       Slot
	PID, TID   uint32
	UID        uint32
	Kind       Kind
	Verdict    Verdict
	Reason     Reason
	Proto      Proto
	Family     uint16
	SockType   uint32
	// SockProto is, for KindSocket, the socket's protocol in full (Proto has its low byte
	// only: IPPROTO_MPTCP is 262).
	SockProto  uint32
	Addr       netip.Addr // connect, sendmsg, packet and terminate; IPv4 unmapped
	Port       uint16
	Comm       string
	Binary     FileID // the calling binary; for exec, the executable
	BinaryPath string // as the calling process was exec'd
	Target     string // exec: filename; unix: socket path; sockopt: the option (IP_OPTIONS, IPV6_RTHDR, ...); migrate: the cgroup it went to (from the cgroup2 root; under BPF LSM, refused, its directory's name)
	Chain      []Process
	// Killed says, for a migrate, that the kernel killed the moved process (PID; TID is the
	// process that moved it). Where it could not (a move by another process before Linux 6.13),
	// tetherd does.
	Killed bool
}

// ProgramStat is how often a program ran and for how long in all, as the kernel counts while its
// BPF statistics are enabled (kernel.bpf_stats_enabled, or BPF_ENABLE_STATS).
type ProgramStat struct {
	Runs            uint64
	Time            time.Duration
	RecursionMisses uint64
}

// MapMemory is the kernel memory the maps hold, as the kernel charges it (memlock).
type MapMemory struct {
	Maps  map[string]uint64 // by map; the agents' rule-set tries together as "rule_set_tries"
	Total uint64
	// PerSlot is what each agent slot costs whether used or not: the per-slot arrays over their
	// capacity (MaxAgents).
	PerSlot uint64
	// Agents hold rule sets; PerAgentRules is what their tries cost on average (host rules live
	// in tether_hosts, preallocated, counted in Maps).
	Agents        int
	PerAgentRules uint64
}

// MapFill is how full a kernel map is.
type MapFill struct {
	Entries  int
	Capacity int
}

// Ratio is Entries of Capacity.
func (f MapFill) Ratio() float64 { return float64(f.Entries) / float64(max(f.Capacity, 1)) }

// Counters are the kernel's global counters (summed over CPUs).
type Counters struct {
	RingBufferDrops     uint64
	LineageUpdateErrors uint64
	SignalErrors        uint64
	UnknownCgroup       uint64
	// SockStorageErrors counts sockets whose storage could not be made (no memory): their
	// packets are judged without it, and a revocation reaches them only by their agent's kill.
	SockStorageErrors uint64
	// DestroyErrors counts sockets a sweep could not terminate (their packets are still
	// dropped).
	DestroyErrors uint64
	// MigrationsLate counts agent processes found outside their agent by the exec program
	// rather than when they moved.
	MigrationsLate uint64
}

// SweepStats count the sweeps of live sockets: after an agent's rule set changes (or it is
// killed or removed), its sockets whose destination is no longer allowed are terminated.
type SweepStats struct {
	Sweeps     uint64        `json:"sweeps"`
	Terminated uint64        `json:"terminated"`
	Errors     uint64        `json:"errors"` // sweeps that failed, and sockets that could not be terminated
	Last       time.Duration `json:"last_sweep_ns"`
}

// AgentCounts are one agent's decisions by kind and verdict.
type AgentCounts [NumKinds][NumVerdicts]uint64

// Dataplane is the kernel side as the stages above it see it. pkg/kernel implements it; tests of
// those stages use a fake.
type Dataplane interface {
	// Bind makes processes in the cgroup (and its descendants) part of the agent in slot.
	Bind(cgroupID uint64, slot Slot) error
	Unbind(cgroupID uint64) error
	Bindings() (map[uint64]Slot, error)
	// SetFlags replaces the agent's state flags (the killed flag stays while Kill latched it).
	SetFlags(slot Slot, flags AgentFlags) error
	// Kill sets the agent's killed flag at once: it waits for no rule-set write of the slot in
	// progress, and every later write keeps the flag until Revive. It is the kill path's first
	// step; a caller need hold no lock the policy side holds.
	Kill(slot Slot) error
	// Revive ends Kill's latch: the next SetFlags decides the killed flag again.
	Revive(slot Slot) error
	Flags(slot Slot) (AgentFlags, error)
	// Install replaces the agent's whole rule set at once. Live sockets of the agent whose
	// destination it no longer allows are terminated right after, and their packets dropped
	// from the moment it is in force.
	Install(slot Slot, rs *RuleSet) error
	// SetExpiry moves the expiry of the rule set in force (see RuleSet.Expires) without writing
	// it again: a task renewed.
	SetExpiry(slot Slot, expires time.Time) error
	// Clear removes everything the kernel holds for slot.
	Clear(slot Slot) error
	PutInfo(slot Slot, info Info) error
	Infos() (map[Slot]Info, error)
	Counters() (Counters, error)
	AgentCounts(slot Slot) (AgentCounts, error)
	// SetGrant puts counted grant i (1 to MaxGrants-1) in force: uses connects or datagrams of
	// the rules that name it, until expires (zero: no expiry). ClearGrant ends it; GrantLeft
	// reads its uses left.
	SetGrant(i uint32, uses int64, expires time.Time) error
	GrantLeft(i uint32) (int64, error)
	ClearGrant(i uint32) error
}

// ExecMode is how exec is enforced.
type ExecMode string

const (
	// ExecAuto picks ExecLSM where BPF LSM works, else ExecSignal.
	ExecAuto ExecMode = "auto"
	// ExecLSM refuses a denied exec in lsm/bprm_check_security: the caller gets EPERM.
	ExecLSM ExecMode = "lsm"
	// ExecSignal kills a process with SIGKILL from tp_btf/sched_process_exec, after the point
	// of no return of a denied exec and before the new image runs user code.
	ExecSignal ExecMode = "signal"
	// ExecOff enforces no exec rule (lineage is still tracked).
	ExecOff ExecMode = "off"
)

// ParseExecMode accepts auto, lsm, signal and off.
func ParseExecMode(s string) (ExecMode, error) {
	switch m := ExecMode(s); m {
	case ExecAuto, ExecLSM, ExecSignal, ExecOff:
		return m, nil
	}
	return "", fmt.Errorf("unknown exec mode %q (want auto, lsm, signal or off)", s)
}

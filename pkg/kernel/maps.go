package kernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/dataplane"
)

var _ dataplane.Dataplane = (*Kernel)(nil)

// Bind makes processes in the cgroup (and below it) part of the agent in slot.
func (k *Kernel) Bind(cgroupID uint64, slot dataplane.Slot) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	if err := k.cgroups.Update(cgroupID, bpfTetherBinding{Slot: uint32(slot)}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("binding cgroup %d to slot %d: %w", cgroupID, slot, err)
	}
	if err := k.bindingsChanged(); err != nil {
		return err
	}
	// The processes already in it become the agent's (see seedLineage), when the agent's info
	// (written before the binding) names this cgroup.
	var info bpfTetherAgentInfo
	if err := k.agentInfo.Lookup(uint32(slot), &info); err == nil && info.Flags&infoInUse != 0 && info.CgroupId == cgroupID {
		if path := cString(info.CgroupPath[:]); filepath.IsAbs(path) {
			return k.seedLineage(slot, path)
		}
	}
	return nil
}

// bindingsChanged bumps the generation that invalidates the programs' per-CPU cache of
// cgroup -> slot answers. It runs after every change of tether_cgroups. The programs read the
// generation from the cache's entry on their CPU, not from tether_config (one map fewer on the hot
// path), so the new generation is written into every CPU's entry, with no answer, before this
// returns (see struct tether_slot_cache_entry). An error leaves the change to be made again: the
// registry retries its writes.
func (k *Kernel) bindingsChanged() error {
	var gen uint64
	if err := k.updateConfig("bumping binding generation", func(c *bpfTetherConfigEntry) {
		c.BindingsGen++
		gen = c.BindingsGen
	}); err != nil {
		return err
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("writing binding generation %d into the per-CPU cache: %w", gen, err)
	}
	entries := make([]bpfTetherSlotCacheEntry, cpus)
	for i := range entries {
		// sample_left is overwritten too: a new random countdown for each CPU.
		entries[i] = bpfTetherSlotCacheEntry{BindingsGen: uint32(gen), SampleLeft: 1 + rand.Uint32N(2*max(k.opts.AllowSample, 1)-1)}
	}
	if err := k.slotCache.Update(uint32(0), entries, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("writing binding generation %d into the per-CPU cgroup -> slot cache: %w", gen, err)
	}
	return nil
}

// updateConfig changes tether_config with change.
func (k *Kernel) updateConfig(what string, change func(*bpfTetherConfigEntry)) error {
	k.genMu.Lock()
	defer k.genMu.Unlock()
	var c bpfTetherConfigEntry
	if err := k.config.Lookup(uint32(0), &c); err != nil {
		return fmt.Errorf("%s: reading tether_config: %w", what, err)
	}
	change(&c)
	if err := k.config.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// Unbind removes the cgroup's binding; a missing binding is not an error.
func (k *Kernel) Unbind(cgroupID uint64) error {
	if err := k.cgroups.Delete(cgroupID); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unbinding cgroup %d: %w", cgroupID, err)
	}
	return k.bindingsChanged()
}

// Bindings lists every cgroup bound to an agent.
func (k *Kernel) Bindings() (map[uint64]dataplane.Slot, error) {
	out := map[uint64]dataplane.Slot{}
	var id uint64
	var b bpfTetherBinding
	it := k.cgroups.Iterate()
	for it.Next(&id, &b) {
		out[id] = dataplane.Slot(b.Slot)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading cgroup bindings: %w", err)
	}
	return out, nil
}

func headerKey() bpfTetherRuleKey {
	return bpfTetherRuleKey{Prefixlen: 8, Kind: uint8(bpfTetherRuleKindTETHER_RULE_HEADER)}
}

// egressKey encodes a prefix in the kernel's 16-byte form (IPv4 as ::ffff:a.b.c.d).
func egressKey(p netip.Prefix) bpfTetherRuleKey {
	k := bpfTetherRuleKey{Prefixlen: egressPrefixlen(p), Kind: uint8(bpfTetherRuleKindTETHER_RULE_EGRESS)}
	a := p.Masked().Addr().As16()
	copy(k.Data[:], a[:])
	return k
}

// egressPrefixlen is p's prefix length as a rule key counts it: the kind byte, then the 16-byte form.
func egressPrefixlen(p netip.Prefix) uint32 {
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return 8 + uint32(bits)
}

// egressValue is e's rule value; its mode is its prefix length (see struct tether_rule_value).
// unixDirKey encodes where a granted unix path leads the way tether_unix_dir_match reads it.
func unixDirKey(u dataplane.UnixDir) (bpfTetherRuleKey, error) {
	k := bpfTetherRuleKey{Kind: uint8(bpfTetherRuleKindTETHER_RULE_UNIX_DIR), Prefixlen: 8 + 8*12}
	binary.NativeEndian.PutUint32(k.Data[0:4], kernelDev(u.Dir.Dev))
	binary.NativeEndian.PutUint64(k.Data[4:12], u.Dir.Ino)
	if u.Name == "" {
		return k, nil
	}
	if len(u.Name)+1 > len(k.Data)-12 || strings.ContainsAny(u.Name, "/\x00") {
		return k, fmt.Errorf("unix socket name %q: one path component of at most %d bytes", u.Name, len(k.Data)-13)
	}
	copy(k.Data[12:], u.Name)
	k.Prefixlen += 8 * uint32(len(u.Name)+1)
	return k, nil
}

// listenKey is the one entry of a rule set's listen rules.
func listenKey() bpfTetherRuleKey {
	return bpfTetherRuleKey{Prefixlen: 8, Kind: uint8(bpfTetherRuleKindTETHER_RULE_LISTEN)}
}

// listenValue encodes listen rules: protocol and port range, audit or not.
func listenValue(rules []dataplane.PortRule) (bpfTetherRuleValue, error) {
	if len(rules) > dataplane.MaxPortRules {
		return bpfTetherRuleValue{}, fmt.Errorf("%d listen rules, the kernel holds %d", len(rules), dataplane.MaxPortRules)
	}
	v := bpfTetherRuleValue{Count: uint32(len(rules))}
	for i, p := range rules {
		if !p.Binary.IsZero() || p.Grant != 0 || p.MaxDuration != 0 {
			return bpfTetherRuleValue{}, fmt.Errorf("listen rule %d: a binary, counted grant or max_duration does not apply to listening", i)
		}
		r := &v.Ports[i]
		r.PortLo, r.PortHi, r.Proto = p.Lo, p.Hi, uint8(p.Proto)
		if p.Audit {
			r.Flags |= uint8(bpfTetherPortRuleFlagsTETHER_PORT_RULE_AUDIT)
		}
	}
	return v, nil
}

func egressValue(e dataplane.Egress) (bpfTetherRuleValue, error) {
	if len(e.Ports) > dataplane.MaxPortRules {
		return bpfTetherRuleValue{}, fmt.Errorf("prefix %s has %d port rules, the kernel holds %d", e.Prefix, len(e.Ports), dataplane.MaxPortRules)
	}
	v := bpfTetherRuleValue{Mode: egressPrefixlen(e.Prefix), Count: uint32(len(e.Ports))}
	for i, p := range e.Ports {
		r := &v.Ports[i]
		r.PortLo, r.PortHi, r.Proto = p.Lo, p.Hi, uint8(p.Proto)
		if !p.Binary.IsZero() {
			r.Flags |= uint8(bpfTetherPortRuleFlagsTETHER_PORT_RULE_BINARY)
			r.BinDev = kernelDev(p.Binary.Dev)
			r.BinIno = p.Binary.Ino
		}
		if p.Audit {
			r.Flags |= uint8(bpfTetherPortRuleFlagsTETHER_PORT_RULE_AUDIT)
		}
		if p.Grant != 0 {
			if p.Grant >= dataplane.MaxGrants || p.Audit {
				return bpfTetherRuleValue{}, fmt.Errorf("prefix %s: counted grant %d: want 1-%d, on a rule that allows", e.Prefix, p.Grant, dataplane.MaxGrants-1)
			}
			r.Flags |= uint8(bpfTetherPortRuleFlagsTETHER_PORT_RULE_COUNTED)
			r.Grant = uint16(p.Grant)
		}
		if p.MaxDuration != 0 {
			if p.MaxDuration < time.Millisecond || p.MaxDuration > dataplane.MaxRuleDuration {
				return bpfTetherRuleValue{}, fmt.Errorf("prefix %s: max_duration %s: want 1ms to %s", e.Prefix, p.MaxDuration, dataplane.MaxRuleDuration)
			}
			r.MaxMs = uint32(p.MaxDuration / time.Millisecond)
		}
	}
	return v, nil
}

// SetGrant puts counted grant i in force: uses connects or datagrams, until expires (zero: no
// expiry). Write it before the rule set that names it.
func (k *Kernel) SetGrant(i uint32, uses int64, expires time.Time) error {
	if i == 0 || i >= dataplane.MaxGrants || uses < 0 {
		return fmt.Errorf("counted grant %d with %d uses: want 1-%d and uses not negative", i, uses, dataplane.MaxGrants-1)
	}
	v := bpfTetherGrantUses{Left: uses}
	if !expires.IsZero() {
		v.ExpiresNs = bootclock.Deadline(expires)
	}
	if err := k.grants.Put(i, v); err != nil {
		return fmt.Errorf("writing counted grant %d: %w", i, err)
	}
	return nil
}

// GrantLeft reads how many uses counted grant i has left (0 when used up or cleared).
func (k *Kernel) GrantLeft(i uint32) (int64, error) {
	var v bpfTetherGrantUses
	if err := k.grants.Lookup(i, &v); err != nil {
		return 0, fmt.Errorf("reading counted grant %d: %w", i, err)
	}
	return max(v.Left, 0), nil
}

// ClearGrant ends counted grant i: a rule that still names it allows nothing more.
func (k *Kernel) ClearGrant(i uint32) error {
	if err := k.grants.Put(i, bpfTetherGrantUses{}); err != nil {
		return fmt.Errorf("clearing counted grant %d: %w", i, err)
	}
	return nil
}

func execKey(f dataplane.FileID) bpfTetherRuleKey {
	k := bpfTetherRuleKey{Prefixlen: 8 + 8*12, Kind: uint8(bpfTetherRuleKindTETHER_RULE_EXEC)}
	binary.NativeEndian.PutUint32(k.Data[0:4], kernelDev(f.Dev))
	binary.NativeEndian.PutUint64(k.Data[4:12], f.Ino)
	return k
}

// unixKey encodes a unix socket address the way tether_unix_key in the BPF program reads it.
func unixKey(u dataplane.Unix) (bpfTetherRuleKey, error) {
	k := bpfTetherRuleKey{Kind: uint8(bpfTetherRuleKindTETHER_RULE_UNIX)}
	if name, ok := cutAbstract(u.Path); ok {
		if u.Prefix {
			return k, fmt.Errorf("unix %q: abstract socket names match exactly, not as a prefix", u.Path)
		}
		if len(name) > dataplane.MaxUnixPath-1 {
			return k, fmt.Errorf("unix %q: abstract name longer than %d bytes", u.Path, dataplane.MaxUnixPath-1)
		}
		k.Data[0], k.Data[1] = 0, uint8(len(name))
		copy(k.Data[2:], name)
		k.Prefixlen = 8 + 8*uint32(2+len(name))
		return k, nil
	}
	if len(u.Path) == 0 || len(u.Path) > dataplane.MaxUnixPath || bytes.IndexByte([]byte(u.Path), 0) >= 0 {
		return k, fmt.Errorf("unix %q: a pathname of 1 to %d bytes without NUL", u.Path, dataplane.MaxUnixPath)
	}
	copy(k.Data[:], u.Path)
	n := len(u.Path)
	if !u.Prefix {
		n++ // the terminating NUL makes the match exact
	}
	k.Prefixlen = 8 + 8*uint32(n)
	return k, nil
}

func cutAbstract(path string) (string, bool) {
	if len(path) > 0 && path[0] == '@' {
		return path[1:], true
	}
	return "", false
}

func describeKey(k bpfTetherRuleKey) string {
	switch bpfTetherRuleKind(k.Kind) {
	case bpfTetherRuleKindTETHER_RULE_HEADER:
		return "header"
	case bpfTetherRuleKindTETHER_RULE_EGRESS:
		a := netip.AddrFrom16([16]byte(k.Data[:16]))
		return fmt.Sprintf("egress %s/%d", a, k.Prefixlen-8)
	case bpfTetherRuleKindTETHER_RULE_EXEC:
		return fmt.Sprintf("exec dev %#x inode %d", binary.NativeEndian.Uint32(k.Data[0:4]), binary.NativeEndian.Uint64(k.Data[4:12]))
	case bpfTetherRuleKindTETHER_RULE_UNIX:
		return fmt.Sprintf("unix %q", bytes.TrimRight(k.Data[:], "\x00"))
	case bpfTetherRuleKindTETHER_RULE_LISTEN:
		return "listen"
	case bpfTetherRuleKindTETHER_RULE_UNIX_DIR:
		return fmt.Sprintf("unix directory dev %#x inode %d name %q", binary.NativeEndian.Uint32(k.Data[0:4]),
			binary.NativeEndian.Uint64(k.Data[4:12]), bytes.TrimRight(k.Data[12:], "\x00"))
	}
	return fmt.Sprintf("kind %d", k.Kind)
}

// kernelDev converts st_dev as stat(2) returns it into the kernel's internal dev_t encoding
// (MKDEV: major << 20 | minor), which is what the programs read from super_block.s_dev.
func kernelDev(dev uint64) uint32 {
	return unix.Major(dev)<<20 | unix.Minor(dev)
}

// userDev converts a kernel dev_t back into the stat(2) encoding.
func userDev(kdev uint32) uint64 {
	return unix.Mkdev(kdev>>20, kdev&(1<<20-1))
}

const (
	infoInUse    = 1 << 0
	infoLaunched = 1 << 1
)

// PutInfo records who the agent in slot is.
func (k *Kernel) PutInfo(slot dataplane.Slot, info dataplane.Info) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	if len(info.SpiffeID) > dataplane.MaxIDLen || len(info.CgroupPath) > dataplane.MaxCgroupPath {
		return fmt.Errorf("agent info of slot %d: SPIFFE ID or cgroup path longer than %d bytes", slot, dataplane.MaxIDLen)
	}
	v := bpfTetherAgentInfo{
		CgroupId:       info.CgroupID,
		Generation:     info.Generation,
		RegisteredUnix: uint64(info.Registered.Unix()),
		Flags:          infoInUse,
	}
	if info.Launched {
		v.Flags |= infoLaunched
	}
	if info.ModeOverride != nil {
		v.ModeOverride = 1 + uint32(*info.ModeOverride)
	}
	putCString(v.SpiffeId[:], info.SpiffeID)
	putCString(v.CgroupPath[:], info.CgroupPath)
	if err := k.agentInfo.Update(uint32(slot), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("writing agent info of slot %d: %w", slot, err)
	}
	return nil
}

// Infos returns the info of every slot in use.
func (k *Kernel) Infos() (map[dataplane.Slot]dataplane.Info, error) {
	out := map[dataplane.Slot]dataplane.Info{}
	var slot uint32
	var v bpfTetherAgentInfo
	it := k.agentInfo.Iterate()
	for it.Next(&slot, &v) {
		if v.Flags&infoInUse == 0 {
			continue
		}
		info := dataplane.Info{
			SpiffeID:   cString(v.SpiffeId[:]),
			CgroupPath: cString(v.CgroupPath[:]),
			CgroupID:   v.CgroupId,
			Generation: v.Generation,
			Registered: time.Unix(int64(v.RegisteredUnix), 0),
			Launched:   v.Flags&infoLaunched != 0,
		}
		if v.ModeOverride != 0 {
			m := dataplane.Mode(v.ModeOverride - 1)
			info.ModeOverride = &m
		}
		out[dataplane.Slot(slot)] = info
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading agent info: %w", err)
	}
	return out, nil
}

// Counters sums the kernel's global counters over CPUs.
func (k *Kernel) Counters() (dataplane.Counters, error) {
	var c dataplane.Counters
	var errs [7]error
	c.RingBufferDrops, errs[0] = k.counter(bpfTetherCounterTETHER_COUNTER_RINGBUF_DROPS)
	c.LineageUpdateErrors, errs[1] = k.counter(bpfTetherCounterTETHER_COUNTER_LINEAGE_UPDATE_ERRORS)
	c.SignalErrors, errs[2] = k.counter(bpfTetherCounterTETHER_COUNTER_SIGNAL_ERRORS)
	c.UnknownCgroup, errs[3] = k.counter(bpfTetherCounterTETHER_COUNTER_UNKNOWN_CGROUP)
	c.SockStorageErrors, errs[4] = k.counter(bpfTetherCounterTETHER_COUNTER_SOCK_STORAGE_ERRORS)
	c.DestroyErrors, errs[5] = k.counter(bpfTetherCounterTETHER_COUNTER_DESTROY_ERRORS)
	c.MigrationsLate, errs[6] = k.counter(bpfTetherCounterTETHER_COUNTER_MIGRATIONS_LATE)
	return c, errors.Join(errs[:]...)
}

// counter sums global counter c over the CPUs.
func (k *Kernel) counter(c bpfTetherCounter) (uint64, error) {
	var per []uint64
	if err := k.counters.Lookup(uint32(c), &per); err != nil {
		return 0, fmt.Errorf("reading counter %d: %w", c, err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n, nil
}

// AgentCounts reads the decisions of the agent in slot.
func (k *Kernel) AgentCounts(slot dataplane.Slot) (dataplane.AgentCounts, error) {
	var out dataplane.AgentCounts
	if err := checkSlot(slot); err != nil {
		return out, err
	}
	var v bpfTetherAgentCounts
	if err := k.agentCounters.Lookup(uint32(slot), &v); err != nil {
		return out, fmt.Errorf("reading counters of slot %d: %w", slot, err)
	}
	for kind := range dataplane.NumKinds {
		for verdict := range dataplane.NumVerdicts {
			out[kind][verdict] = v.N[kind*dataplane.NumVerdicts+verdict]
		}
	}
	// The allowed connects and datagrams are counted per CPU (tether_agent_allows).
	var perCPU []bpfTetherAgentAllows
	if err := k.agentAllows.Lookup(uint32(slot), &perCPU); err != nil {
		return out, fmt.Errorf("reading the allow counters of slot %d: %w", slot, err)
	}
	for _, c := range perCPU {
		for kind, n := range c.N {
			out[kind][dataplane.VerdictAllow] += n
		}
	}
	return out, nil
}

func checkSlot(slot dataplane.Slot) error {
	if slot >= dataplane.MaxAgents {
		return fmt.Errorf("slot %d out of range (the kernel holds %d agents)", slot, dataplane.MaxAgents)
	}
	return nil
}

func putCString(dst []int8, s string) {
	for i := range dst {
		dst[i] = 0
	}
	for i := 0; i < len(s) && i < len(dst)-1; i++ {
		dst[i] = int8(s[i])
	}
}

func cString(src []int8) string {
	b := make([]byte, 0, len(src))
	for _, c := range src {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

package kernel

import (
	"errors"
	"fmt"
	"io"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// ProgramStats reads the statistics of every loaded program, by hook name.
func (k *Kernel) ProgramStats() (map[string]dataplane.ProgramStat, error) {
	out := map[string]dataplane.ProgramStat{}
	for _, h := range hookSpecs {
		p := k.coll.Programs[h.prog]
		if p == nil {
			continue
		}
		st, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("statistics of %s: %w", h.section, err)
		}
		out[h.name] = dataplane.ProgramStat{Runs: st.RunCount, Time: st.Runtime, RecursionMisses: st.RecursionMisses}
	}
	return out, nil
}

// EnableStats turns the kernel's BPF run-time statistics on until the returned Closer is closed.
// They cost a little on every program run.
func EnableStats() (io.Closer, error) {
	return ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
}

// Pressure reads how full the maps that can fill up are: "cgroups" (cgroup bindings; a cgroup
// that does not fit is not enforced as its agent), "procs" (process lineage, an LRU: when full
// the oldest processes lose their tool chain), "host_rules" (tether_hosts, over all agents: when
// full, further host and bulk-length rules go into the tries, which still enforce them but cost
// more to update), and "rules" (the fullest agent rule set, from what tetherd last installed; a
// rule set that does not fit is refused). It iterates the first two, at most their capacity in
// system calls, and reads tether_hosts in batches.
func (k *Kernel) Pressure() (map[string]dataplane.MapFill, error) {
	out := map[string]dataplane.MapFill{}
	var id uint64
	var b bpfTetherBinding
	n, err := count(k.cgroups.Iterate(), &id, &b)
	if err != nil {
		return nil, fmt.Errorf("counting cgroup bindings: %w", err)
	}
	out["cgroups"] = dataplane.MapFill{Entries: n, Capacity: int(k.cgroups.MaxEntries())}
	var pid uint32
	var p bpfTetherProc
	if n, err = count(k.procs.Iterate(), &pid, &p); err != nil {
		return nil, fmt.Errorf("counting process lineage: %w", err)
	}
	out["procs"] = dataplane.MapFill{Entries: n, Capacity: int(k.procs.MaxEntries())}
	hosts := 0
	if err := k.eachHost(func(hostEntry) { hosts++ }); err != nil {
		return nil, fmt.Errorf("counting host rules: %w", err)
	}
	out["host_rules"] = dataplane.MapFill{Entries: hosts, Capacity: int(k.hosts.MaxEntries())}
	most := 0
	for i := range k.slots {
		k.slotsMu.Lock()
		st := k.slots[i]
		k.slotsMu.Unlock()
		if st == nil {
			continue
		}
		st.mu.Lock()
		if img := st.mirror[st.active]; img != nil {
			most = max(most, img.len())
		}
		st.mu.Unlock()
	}
	out["rules"] = dataplane.MapFill{Entries: most, Capacity: int(k.innerSpec.MaxEntries)}
	return out, nil
}

func count(it *ebpf.MapIterator, key, value any) (int, error) {
	n := 0
	for it.Next(key, value) {
		n++
	}
	return n, it.Err()
}

// perSlotMaps are the maps that hold one entry per agent slot, used or not.
var perSlotMaps = []string{bpfMapTetherAgents, bpfMapTetherAgentCounters, bpfMapTetherAgentAllows, bpfMapTetherAgentInfo, bpfMapTetherRulesets}

// MapMemory reads the kernel memory tether's maps hold, as the kernel charges it (memlock):
// every map of this load by name, the agents' rule-set tries together as "rule_set_tries", the
// total, what each agent slot costs whether used or not (the per-slot arrays over their
// capacity), and what an agent's rule sets (its tries) cost on average.
func (k *Kernel) MapMemory() (dataplane.MapMemory, error) {
	out := dataplane.MapMemory{Maps: map[string]uint64{}}
	for name, m := range k.coll.Maps {
		n, err := memlock(m)
		if err != nil {
			return out, fmt.Errorf("memory of %s: %w", name, err)
		}
		out.Maps[name] = n
		out.Total += n
	}
	for _, name := range perSlotMaps {
		out.PerSlot += out.Maps[name] / dataplane.MaxAgents
	}
	// The tries of the slots this tetherd has handled (it adopts every pinned agent at start): two
	// lookups a slot, not one for each of tether_rulesets' 32,769 entries.
	var tries uint64
	for slot := range dataplane.Slot(dataplane.MaxAgents) {
		k.slotsMu.Lock()
		st := k.slots[slot]
		k.slotsMu.Unlock()
		if st == nil {
			continue
		}
		held := false
		for i := range uint32(2) {
			var id uint32
			if err := k.rulesets.Lookup(bufIndex(slot, i), &id); err != nil {
				continue // none, or replaced since: counted at the next read
			}
			inner, err := ebpf.NewMapFromID(ebpf.MapID(id))
			if err != nil {
				continue
			}
			n, err := memlock(inner)
			inner.Close()
			if err != nil {
				return out, err
			}
			tries += n
			held = true
		}
		if held {
			out.Agents++
		}
	}
	out.Maps["rule_set_tries"] = tries
	out.Total += tries
	if out.Total == 0 {
		return out, errors.New("the kernel reports no map memory (fdinfo memlock)")
	}
	if out.Agents > 0 {
		out.PerAgentRules = tries / uint64(out.Agents)
	}
	return out, nil
}

func memlock(m *ebpf.Map) (uint64, error) {
	info, err := m.Info()
	if err != nil {
		return 0, err
	}
	n, _ := info.Memlock() // 0 for a map that reports none (socket storage)
	return n, nil
}

package kernel

import (
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

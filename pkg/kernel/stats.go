package kernel

import (
	"fmt"
	"io"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// ProgramStat is how often a program ran and for how long in all, as the kernel counts while its
// BPF statistics are enabled (kernel.bpf_stats_enabled, or EnableStats).
type ProgramStat struct {
	Runs            uint64
	Time            time.Duration
	RecursionMisses uint64
}

// ProgramStats reads the statistics of every loaded program, by hook name.
func (k *Kernel) ProgramStats() (map[string]ProgramStat, error) {
	out := map[string]ProgramStat{}
	for _, h := range hookSpecs {
		p := k.coll.Programs[h.prog]
		if p == nil {
			continue
		}
		st, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("statistics of %s: %w", h.section, err)
		}
		out[h.name] = ProgramStat{Runs: st.RunCount, Time: st.Runtime, RecursionMisses: st.RecursionMisses}
	}
	return out, nil
}

// EnableStats turns the kernel's BPF run-time statistics on until the returned Closer is closed.
// They cost a little on every program run.
func EnableStats() (io.Closer, error) {
	return ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
}

// MapFill is how full a kernel map is.
type MapFill struct {
	Entries  int
	Capacity int
}

// Ratio is Entries of Capacity.
func (f MapFill) Ratio() float64 { return float64(f.Entries) / float64(max(f.Capacity, 1)) }

// Pressure reads how full the maps that can fill up are: "cgroups" (cgroup bindings; a cgroup
// that does not fit is not enforced as its agent), "procs" (process lineage, an LRU: when full
// the oldest processes lose their tool chain), and "rules" (the fullest agent rule set, from what
// tetherd last installed; a rule set that does not fit is refused). It iterates the first two:
// at most their capacity in system calls.
func (k *Kernel) Pressure() (map[string]MapFill, error) {
	out := map[string]MapFill{}
	var id uint64
	var b bpfTetherBinding
	n, err := count(k.cgroups.Iterate(), &id, &b)
	if err != nil {
		return nil, fmt.Errorf("counting cgroup bindings: %w", err)
	}
	out["cgroups"] = MapFill{n, int(k.cgroups.MaxEntries())}
	var pid uint32
	var p bpfTetherProc
	if n, err = count(k.procs.Iterate(), &pid, &p); err != nil {
		return nil, fmt.Errorf("counting process lineage: %w", err)
	}
	out["procs"] = MapFill{n, int(k.procs.MaxEntries())}
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
			most = max(most, len(img.keys))
		}
		st.mu.Unlock()
	}
	out["rules"] = MapFill{most, int(k.innerSpec.MaxEntries)}
	return out, nil
}

func count(it *ebpf.MapIterator, key, value any) (int, error) {
	n := 0
	for it.Next(key, value) {
		n++
	}
	return n, it.Err()
}

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

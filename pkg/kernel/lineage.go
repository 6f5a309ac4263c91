package kernel

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// seedLineage gives every process already running in the cgroup at path (and below it) a
// lineage entry of the agent in slot, unless it has one of that agent: the programs learn of an
// agent's processes when they exec or fork, and the migration guard knows an agent process by its
// entry. It runs when a cgroup is bound, after the binding, so that a process forked meanwhile
// gets its entry from its parent's or from here. Processes that end meanwhile are skipped.
func (k *Kernel) seedLineage(slot dataplane.Slot, path string) error {
	var agent bpfTetherAgent
	if err := k.agents.Lookup(uint32(slot), &agent); err != nil {
		return fmt.Errorf("reading agent %d: %w", slot, err)
	}
	if agent.Born == 0 {
		return nil // no rule set yet: nothing binds to it
	}
	var pids []int
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			pids = append(pids, cgroups.Procs(p)...)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("listing the processes of %s: %w", path, err)
	}
	now := bootclock.Nanos()
	var errs []error
	for _, pid := range pids {
		var old bpfTetherProc
		if err := k.procs.Lookup(uint32(pid), &old); err == nil && old.Slot == uint32(slot) && old.Born == agent.Born {
			continue
		}
		// The process itself, not its pid: one that ends while its entry is written leaves no
		// entry behind for the next process of that pid (tether_procs keeps entries until
		// their process exits).
		pidfd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // ended
		}
		p, ok := procLineage(pid)
		if !ok {
			unix.Close(pidfd)
			continue // ended
		}
		p.Slot, p.Born, p.StartNs = uint32(slot), agent.Born, now
		if err := k.procs.Update(uint32(pid), &p, ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("lineage of process %d: %w", pid, err))
		} else if unix.PidfdSendSignal(pidfd, 0, nil, 0) != nil {
			// Ended before its entry was written: the exit program had nothing to remove.
			var cur bpfTetherProc
			if k.procs.Lookup(uint32(pid), &cur) == nil && cur == p {
				k.procs.Delete(uint32(pid))
			}
		}
		unix.Close(pidfd)
	}
	return errors.Join(errs...)
}

// procLineage reads what a lineage entry holds of a running process: its parent, binary, command.
func procLineage(pid int) (bpfTetherProc, bool) {
	var p bpfTetherProc
	proc, err := procfs.NewProc(pid)
	if err != nil {
		return p, false
	}
	stat, err := proc.Stat()
	if err != nil {
		return p, false
	}
	p.Ppid = uint32(stat.PPID)
	putCString(p.Comm[:], stat.Comm)
	if exe, err := proc.Executable(); err == nil {
		putCString(p.Path[:], exe)
	}
	// The agent's mount namespace is the one its processes run in when the cgroup is bound.
	if ns, err := proc.Namespaces(); err == nil {
		p.MntNs = ns["mnt"].Inode
	}
	var stx unix.Statx_t
	if unix.Statx(unix.AT_FDCWD, fmt.Sprintf("/proc/%d/exe", pid), 0, unix.STATX_INO, &stx) == nil {
		p.BinDev = kernelDev(unix.Mkdev(stx.Dev_major, stx.Dev_minor))
		p.BinIno = stx.Ino
	}
	return p, true
}

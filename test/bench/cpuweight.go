package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/tether-sh/tether/pkg/cgroups"
)

// cpuSplit weights the bench's process against the agents it kills the way tetherd's systemd
// unit does (CPUWeight=1000, on a cgroup v1 cpu hierarchy cpu.shares 10240, against the default
// 1024 of the agents' cgroup): on a node, tetherd's service and the agents are separate cgroups
// of the cpu controller, so a fork bomb of 1,000 processes is one claimant of the CPU, not 1,000.
// Without it here (the bench in the cpu hierarchy's root with the agents' processes) the kill's
// first step waited up to 300 ms for a CPU. It needs the cpu controller in a cgroup v1 hierarchy
// (this machine's hybrid layout); where there is none, the bench says so and runs without.
type cpuSplit struct {
	dir, tetherd, agents string
	origin               string // the cpu cgroup the bench came from
}

// newCPUSplit moves the bench's process into a cpu cgroup weighted as tetherd's unit, next to one
// for the agents; nil, nil when there is no cgroup v1 cpu hierarchy.
func newCPUSplit(name string) (*cpuSplit, error) {
	mnt, origin, err := cgroups.V1Hierarchy("cpu")
	if err != nil || mnt == "" {
		return nil, err
	}
	s := &cpuSplit{dir: filepath.Join(mnt, origin, name), origin: filepath.Join(mnt, origin)}
	s.tetherd, s.agents = filepath.Join(s.dir, "tetherd"), filepath.Join(s.dir, "agents")
	for dir, shares := range map[string]int{s.tetherd: 10240, s.agents: 1024} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			s.close()
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, "cpu.shares"), []byte(strconv.Itoa(shares)), 0); err != nil {
			s.close()
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(s.tetherd, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		s.close()
		return nil, fmt.Errorf("moving the bench into %s: %w", s.tetherd, err)
	}
	return s, nil
}

// agentShell prefixes an agent's shell command with its move into the agents' cpu cgroup.
func (s *cpuSplit) agentShell(shell string) string {
	if s == nil {
		return shell
	}
	return fmt.Sprintf("echo $$ > %s/cgroup.procs && %s", s.agents, shell)
}

// describe says how the bench and the agents share the CPU.
func (s *cpuSplit) describe() string {
	if s == nil {
		return "the bench's process and the agents share the CPU's cgroup (no cgroup v1 cpu hierarchy to weight them)"
	}
	return "the bench's process in a cpu cgroup weighted as tetherd's unit (cpu.shares 10240, CPUWeight=1000), the agents' in another (1024)"
}

// close moves the bench back where it was and removes the cgroups (their processes are gone).
func (s *cpuSplit) close() {
	os.WriteFile(filepath.Join(s.origin, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
	os.Remove(s.tetherd)
	os.Remove(s.agents)
	os.Remove(s.dir)
}

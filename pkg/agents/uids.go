package agents

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/prometheus/procfs"
)

// UIDRange is an inclusive range of uids; the zero value is empty.
type UIDRange struct {
	First, Last uint32
}

// Size is how many uids the range holds.
func (u UIDRange) Size() uint64 {
	if u.Last < u.First || u.First == 0 {
		return 0
	}
	return uint64(u.Last-u.First) + 1
}

// ErrUIDTaken is returned for a launch as a uid another live agent runs as.
var ErrUIDTaken = errors.New("uid taken")

// withUID returns a live launched agent running as uid. Call with r.mu held.
func (r *Registry) withUID(uid uint32) *agent {
	for _, a := range r.agents {
		if a.uidKnown && a.uid == uid && !a.removing {
			return a
		}
	}
	return nil
}

// pickUID returns the next uid of Options.UIDs after the last one handed out that no live agent,
// host user or running process has: an agent's uid is its own while it runs, and is given again
// as late as possible (files an agent left behind stay its uid's). Call with r.mu held.
func (r *Registry) pickUID() (uint32, error) {
	rng := r.opts.UIDs
	n := rng.Size()
	if n == 0 {
		return 0, fmt.Errorf("%w: no uid range for agents of their own (confinement.uids)", ErrInvalid)
	}
	taken, err := r.opts.UIDsInUse()
	if err != nil {
		return 0, fmt.Errorf("finding a free uid for the agent: %w", err)
	}
	for _, a := range r.agents {
		if a.uidKnown {
			taken[a.uid] = true
		}
	}
	start := uint64(0)
	if r.nextUID >= rng.First && r.nextUID <= rng.Last {
		start = uint64(r.nextUID - rng.First)
	}
	for i := range n {
		uid := rng.First + uint32((start+i)%n)
		if !taken[uid] {
			r.nextUID = uid + 1
			return uid, nil
		}
	}
	return 0, fmt.Errorf("no free uid in %d-%d for the agent: every one is an agent's, a user's or a running process's", rng.First, rng.Last)
}

// hostUIDs reads the uids of /etc/passwd and of every process (real, effective, saved and file
// system uid) in /proc.
func hostUIDs() (map[uint32]bool, error) {
	taken := map[uint32]bool{}
	if f, err := os.Open("/etc/passwd"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if fields := strings.Split(sc.Text(), ":"); len(fields) > 2 {
				if n, err := strconv.ParseUint(fields[2], 10, 32); err == nil {
					taken[uint32(n)] = true
				}
			}
		}
		f.Close()
	}
	procs, err := procfs.AllProcs()
	if err != nil {
		return nil, err
	}
	for _, p := range procs {
		st, err := p.NewStatus()
		if err != nil {
			continue // gone meanwhile
		}
		for _, uid := range st.UIDs {
			taken[uint32(uid)] = true
		}
	}
	return taken, nil
}

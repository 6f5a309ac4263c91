package dnsproxy

import (
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// learnt is what agents were answered: per slot, each (name, address) and until when it holds
// (the answer's TTL from when it was answered; the grace is added when compiling).
type learnt struct {
	grace time.Duration
	mu    sync.Mutex
	slots map[dataplane.Slot]map[nameAddr]time.Time
	// cgroups are the cgroup IDs of the agents the slots held when they learnt: a restarted
	// tetherd keeps a slot's names only for the same agent.
	cgroups map[dataplane.Slot]uint64
}

type nameAddr struct {
	name string // lower case, no trailing dot
	addr netip.Addr
}

func newLearnt(grace time.Duration) *learnt {
	return &learnt{grace: grace, slots: map[dataplane.Slot]map[nameAddr]time.Time{}, cgroups: map[dataplane.Slot]uint64{}}
}

// add records that slot was answered addrs for name, holding until until. It says whether the
// agent's rules change: an address that was not held (new, or lapsed with its grace) is.
func (l *learnt) add(slot dataplane.Slot, cgroupID uint64, name string, addrs []netip.Addr, until, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.slots[slot]
	if l.cgroups[slot] != cgroupID {
		m = nil // another agent's, from before a restart
	}
	l.cgroups[slot] = cgroupID
	if m == nil {
		m = map[nameAddr]time.Time{}
		l.slots[slot] = m
	}
	changed := false
	for _, a := range addrs {
		k := nameAddr{name, a.Unmap()}
		old, ok := m[k]
		if !ok || !old.Add(l.grace).After(now) {
			changed = true
		}
		if !ok || until.After(old) {
			m[k] = until
		}
	}
	return changed
}

// forget drops what slot learnt (its agent is gone).
func (l *learnt) forget(slot dataplane.Slot) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.slots, slot)
	delete(l.cgroups, slot)
}

// keepOnly drops the slots whose agent is not the one that learnt (after a restart: agents that
// went meanwhile); it returns the slots kept.
func (l *learnt) keepOnly(cgroupOf func(dataplane.Slot) (uint64, bool)) []dataplane.Slot {
	l.mu.Lock()
	defer l.mu.Unlock()
	var kept []dataplane.Slot
	for slot := range l.slots {
		if id, ok := cgroupOf(slot); ok && id == l.cgroups[slot] {
			kept = append(kept, slot)
			continue
		}
		delete(l.slots, slot)
		delete(l.cgroups, slot)
	}
	return kept
}

// of is slot's learnt names as the compiler reads them.
func (l *learnt) of(slot dataplane.Slot) compile.Names { return slotNames{l, slot} }

type slotNames struct {
	l    *learnt
	slot dataplane.Slot
}

// Addrs implements compile.Names: the addresses of the names pattern covers whose TTL, and grace,
// have not run out at now; and when the first of them runs out. Lapsed entries are dropped.
func (s slotNames) Addrs(pattern string, now time.Time) ([]netip.Addr, time.Time) {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
	var out []netip.Addr
	var next time.Time
	for k, until := range s.l.slots[s.slot] {
		end := until.Add(s.l.grace)
		if !end.After(now) {
			delete(s.l.slots[s.slot], k)
			continue
		}
		if !compile.NameCovers(pattern, k.name) {
			continue
		}
		if !slices.Contains(out, k.addr) {
			out = append(out, k.addr)
		}
		if next.IsZero() || end.Before(next) {
			next = end
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, next
}

// size is how many (name, address) pairs are held, over all agents.
func (l *learnt) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, m := range l.slots {
		n += len(m)
	}
	return n
}

// savedName is one learnt (name, address) in the state file; Until is on pkg/bootclock's clock
// (CLOCK_BOOTTIME, which a restart of tetherd does not reset).
type savedName struct {
	Slot     dataplane.Slot `json:"slot"`
	CgroupID uint64         `json:"cgroup_id"`
	Name     string         `json:"name"`
	Addr     netip.Addr     `json:"addr"`
	UntilNs  int64          `json:"until_ns"`
}

// snapshot is what is learnt and still held at now, for the state file.
func (l *learnt) snapshot(now time.Time) []savedName {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []savedName
	for slot, m := range l.slots {
		for k, until := range m {
			if until.Add(l.grace).After(now) {
				out = append(out, savedName{Slot: slot, CgroupID: l.cgroups[slot], Name: k.name, Addr: k.addr, UntilNs: until.UnixNano()})
			}
		}
	}
	slices.SortFunc(out, func(a, b savedName) int {
		if a.Slot != b.Slot {
			return int(a.Slot) - int(b.Slot)
		}
		if a.Name != b.Name {
			return strings.Compare(a.Name, b.Name)
		}
		return a.Addr.Compare(b.Addr)
	})
	return out
}

// restore takes back what a state file held that still holds at now.
func (l *learnt) restore(saved []savedName, now time.Time) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range saved {
		until := time.Unix(0, s.UntilNs)
		if !until.Add(l.grace).After(now) || !s.Addr.IsValid() {
			continue
		}
		m := l.slots[s.Slot]
		if m == nil {
			m = map[nameAddr]time.Time{}
			l.slots[s.Slot] = m
		}
		m[nameAddr{s.Name, s.Addr.Unmap()}] = until
		l.cgroups[s.Slot] = s.CgroupID
		n++
	}
	return n
}

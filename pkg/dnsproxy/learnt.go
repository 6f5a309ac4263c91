package dnsproxy

import (
	"net/netip"
	"slices"
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
}

type nameAddr struct {
	name string // lower case, no trailing dot
	addr netip.Addr
}

func newLearnt(grace time.Duration) *learnt {
	return &learnt{grace: grace, slots: map[dataplane.Slot]map[nameAddr]time.Time{}}
}

// add records that slot was answered addrs for name, holding until until. It says whether the
// agent's rules change: an address that was not held (new, or lapsed with its grace) is.
func (l *learnt) add(slot dataplane.Slot, name string, addrs []netip.Addr, until, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.slots[slot]
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

// Package dataplanetest is an in-memory dataplane.Dataplane for testing the stages above the
// kernel. The real one, pkg/kernel, has privileged tests of its own.
package dataplanetest

import (
	"errors"
	"fmt"
	"maps"
	"sync"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// ErrInjected is what an injected failure returns.
var ErrInjected = errors.New("injected failure")

// Fake holds what a kernel would.
type Fake struct {
	mu       sync.Mutex
	bindings map[uint64]dataplane.Slot
	flags    map[dataplane.Slot]dataplane.AgentFlags
	latched  map[dataplane.Slot]bool // Kill's latch
	rules    map[dataplane.Slot]dataplane.RuleSet
	infos    map[dataplane.Slot]dataplane.Info
	counts   map[dataplane.Slot]dataplane.AgentCounts
	grants   map[uint32]Grant
	failures map[string]int // method -> how many next calls fail
	Calls    []string
	// BeforeClear, if set, runs at the start of every Clear, without the fake's lock.
	BeforeClear func()
}

func New() *Fake {
	return &Fake{
		bindings: map[uint64]dataplane.Slot{},
		flags:    map[dataplane.Slot]dataplane.AgentFlags{},
		latched:  map[dataplane.Slot]bool{},
		rules:    map[dataplane.Slot]dataplane.RuleSet{},
		infos:    map[dataplane.Slot]dataplane.Info{},
		counts:   map[dataplane.Slot]dataplane.AgentCounts{},
		grants:   map[uint32]Grant{},
		failures: map[string]int{},
	}
}

// Fail makes the next n calls of method (Bind, Install, ...) fail.
func (f *Fake) Fail(method string, n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failures[method] = n
}

func (f *Fake) call(method string) error {
	f.Calls = append(f.Calls, method)
	if f.failures[method] > 0 {
		f.failures[method]--
		return ErrInjected
	}
	return nil
}

func (f *Fake) Bind(cgroupID uint64, slot dataplane.Slot) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("Bind"); err != nil {
		return err
	}
	f.bindings[cgroupID] = slot
	return nil
}

func (f *Fake) Unbind(cgroupID uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("Unbind"); err != nil {
		return err
	}
	delete(f.bindings, cgroupID)
	return nil
}

func (f *Fake) Bindings() (map[uint64]dataplane.Slot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.bindings), f.call("Bindings")
}

func (f *Fake) SetFlags(slot dataplane.Slot, flags dataplane.AgentFlags) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("SetFlags"); err != nil {
		return err
	}
	if f.latched[slot] {
		flags |= dataplane.AgentKilled
	}
	f.flags[slot] = flags
	return nil
}

func (f *Fake) Kill(slot dataplane.Slot) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("Kill"); err != nil {
		return err
	}
	f.latched[slot] = true
	f.flags[slot] |= dataplane.AgentKilled
	return nil
}

func (f *Fake) Revive(slot dataplane.Slot) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("Revive"); err != nil {
		return err
	}
	delete(f.latched, slot)
	return nil
}

func (f *Fake) Flags(slot dataplane.Slot) (dataplane.AgentFlags, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.flags[slot], f.call("Flags")
}

func (f *Fake) Install(slot dataplane.Slot, rs *dataplane.RuleSet) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("Install"); err != nil {
		return err
	}
	f.rules[slot] = *rs
	return nil
}

func (f *Fake) SetExpiry(slot dataplane.Slot, expires time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("SetExpiry"); err != nil {
		return err
	}
	rs, ok := f.rules[slot]
	if !ok {
		return fmt.Errorf("slot %d has no rule set", slot)
	}
	rs.Expires = expires
	f.rules[slot] = rs
	return nil
}

// RuleSet returns what is installed for slot.
func (f *Fake) RuleSet(slot dataplane.Slot) (dataplane.RuleSet, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	rs, ok := f.rules[slot]
	return rs, ok
}

func (f *Fake) Clear(slot dataplane.Slot) error {
	if f.BeforeClear != nil {
		f.BeforeClear()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("Clear"); err != nil {
		return err
	}
	for id, s := range f.bindings {
		if s == slot {
			delete(f.bindings, id)
		}
	}
	delete(f.flags, slot)
	delete(f.rules, slot)
	delete(f.infos, slot)
	delete(f.counts, slot)
	return nil
}

func (f *Fake) PutInfo(slot dataplane.Slot, info dataplane.Info) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("PutInfo"); err != nil {
		return err
	}
	f.infos[slot] = info
	return nil
}

func (f *Fake) Infos() (map[dataplane.Slot]dataplane.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.infos), f.call("Infos")
}

func (f *Fake) Counters() (dataplane.Counters, error) { return dataplane.Counters{}, nil }

func (f *Fake) AgentCounts(slot dataplane.Slot) (dataplane.AgentCounts, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts[slot], nil
}

// Grant is a counted grant as the fake holds it.
type Grant struct {
	Left    int64
	Expires time.Time
}

func (f *Fake) SetGrant(i uint32, uses int64, expires time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("SetGrant"); err != nil {
		return err
	}
	f.grants[i] = Grant{uses, expires}
	return nil
}

func (f *Fake) GrantLeft(i uint32) (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.grants[i].Left, nil
}

func (f *Fake) ClearGrant(i uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.call("ClearGrant"); err != nil {
		return err
	}
	delete(f.grants, i)
	return nil
}

// Grants returns the counted grants in force.
func (f *Fake) Grants() map[uint32]Grant {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.grants)
}

// Use takes a use of grant i, as a connect would.
func (f *Fake) Use(i uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.grants[i]
	g.Left--
	f.grants[i] = g
}

var _ dataplane.Dataplane = (*Fake)(nil)

package kernel

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// An agent's rule set lives in one of two LPM tries, its buffers (tether_rulesets[slot*2+i]);
// tether_agents[slot].active says which one is in force. Install rewrites the buffer not in force
// and then flips active with one write, so a hook sees either the whole old or the whole new rule
// set. Before a buffer is rewritten again, every hook that may still read it from before the flip
// must have finished: an RCU grace period, which the kernel waits for when a map-in-map entry is
// updated. That wait (about 10 ms) starts right after the flip and is only waited for when the
// agent's next install comes sooner; a context change does not pay it. Once it has passed, the
// buffer not in force is brought up to the one in force in the background, so that the next
// install writes only what it changes (a step-up approval: one entry), not the difference to
// the rule set before last.

// graceIndex is the tether_rulesets entry updated only to wait for a grace period.
const graceIndex = 2 * dataplane.MaxAgents

// slotState is what the kernel layer knows of one slot.
type slotState struct {
	mu     sync.Mutex
	loaded bool // flags and active read from the kernel
	flags  uint32
	active uint32
	bufs   [2]*ebpf.Map
	// mirror is what each buffer holds; nil: unknown (read from the map when needed).
	mirror [2]*trieImage
	// quiet is closed when no hook can still be reading the buffer not in force; nil: quiet.
	quiet chan struct{}
	// epoch counts installs, clears and closes: a background sync started in an older epoch
	// does nothing.
	epoch uint64
}

func (k *Kernel) slot(slot dataplane.Slot) *slotState {
	k.slotsMu.Lock()
	defer k.slotsMu.Unlock()
	st := k.slots[slot]
	if st == nil {
		st = &slotState{}
		k.slots[slot] = st
	}
	return st
}

// loadSlot reads the slot's state from the kernel once. Call with st.mu held.
func (k *Kernel) loadSlot(st *slotState, slot dataplane.Slot) error {
	if st.loaded {
		return nil
	}
	var a bpfTetherAgent
	if err := k.agents.Lookup(uint32(slot), &a); err != nil {
		return fmt.Errorf("reading state of slot %d: %w", slot, err)
	}
	st.flags, st.active, st.loaded = a.Flags, a.Active&1, true
	return nil
}

// writeAgent writes the whole agent value. Call with st.mu held.
func (k *Kernel) writeAgent(st *slotState, slot dataplane.Slot, flags, active uint32) error {
	if err := k.agents.Update(uint32(slot), bpfTetherAgent{Flags: flags, Active: active}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("writing state of slot %d: %w", slot, err)
	}
	st.flags, st.active = flags, active
	return nil
}

// SetFlags replaces the state flags of the agent in slot.
func (k *Kernel) SetFlags(slot dataplane.Slot, flags dataplane.AgentFlags) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	st := k.slot(slot)
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := k.loadSlot(st, slot); err != nil {
		return err
	}
	return k.writeAgent(st, slot, uint32(flags), st.active)
}

// Flags reads the state flags of the agent in slot.
func (k *Kernel) Flags(slot dataplane.Slot) (dataplane.AgentFlags, error) {
	if err := checkSlot(slot); err != nil {
		return 0, err
	}
	var a bpfTetherAgent
	if err := k.agents.Lookup(uint32(slot), &a); err != nil {
		return 0, fmt.Errorf("reading flags of slot %d: %w", slot, err)
	}
	return dataplane.AgentFlags(a.Flags), nil
}

// Install writes rs into the buffer not in force and then puts it in force (see above).
func (k *Kernel) Install(slot dataplane.Slot, rs *dataplane.RuleSet) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	if n := rs.Entries(); n > dataplane.MaxRules {
		return fmt.Errorf("rule set of slot %d has %d entries, the kernel holds %d", slot, n, dataplane.MaxRules)
	}
	want, err := encodeRuleSet(rs)
	if err != nil {
		return fmt.Errorf("rule set of slot %d: %w", slot, err)
	}
	st := k.slot(slot)
	st.mu.Lock()
	defer st.mu.Unlock()
	st.waitQuiet()
	// A new epoch before anything is written: a background sync that resumes after this
	// install (even one that fails halfway) must not record its own plan as what a buffer holds.
	st.epoch++
	if err := k.loadSlot(st, slot); err != nil {
		return err
	}
	target := 1 - st.active
	if err := k.rewrite(st, slot, target, want); err != nil {
		st.mirror[target] = nil // partly written: read it back next time
		return fmt.Errorf("writing rule set of slot %d: %w", slot, err)
	}
	if err := k.writeAgent(st, slot, st.flags, target); err != nil {
		return err
	}
	epoch := st.epoch
	st.quiet = k.graceAsync(func() { k.syncInactive(st, slot, epoch) })
	return nil
}

// waitQuiet returns, with st.mu held as on entry, once no hook can be reading the buffer not in
// force. It lets go of st.mu while it waits, so the background sync can run.
func (st *slotState) waitQuiet() {
	for st.quiet != nil {
		q := st.quiet
		st.mu.Unlock()
		<-q
		st.mu.Lock()
		if st.quiet == q {
			st.quiet = nil
		}
	}
}

// syncInactive makes the buffer not in force hold what the one in force holds, unless anything
// happened to the slot since the install of epoch (whatever did writes what it needs itself).
// It writes in chunks and lets go of the slot between them, so an install that comes meanwhile
// waits for one chunk at most (and then writes what is still missing itself).
func (k *Kernel) syncInactive(st *slotState, slot dataplane.Slot, epoch uint64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.epoch != epoch {
		return
	}
	inactive := 1 - st.active
	want, buf := st.mirror[st.active], st.bufs[inactive]
	have := st.mirror[inactive]
	if want == nil || buf == nil || have == nil {
		return
	}
	dels, keys, vals := plan(have, want)
	cur := have.clone() // what the buffer holds as the chunks go in
	const chunk = 256
	for len(dels)+len(keys) > 0 {
		d, n := min(len(dels), chunk), min(len(keys), chunk)
		err := apply(buf, dels[:d], keys[:n], vals[:n])
		if err != nil {
			st.mirror[inactive] = nil // read it back at the next install
			k.log.Debug("bringing the idle rule buffer up to date", "slot", slot, "error", err)
			return
		}
		for _, key := range dels[:d] {
			cur.del(key)
		}
		for j := range n {
			cur.put(keys[j], vals[j])
		}
		dels, keys, vals = dels[d:], keys[n:], vals[n:]
		st.mirror[inactive] = cur
		if len(dels)+len(keys) == 0 {
			break
		}
		st.mu.Unlock()
		runtime.Gosched()
		st.mu.Lock()
		if st.epoch != epoch {
			return // cur is what the buffer holds; whoever came writes the rest
		}
		cur = cur.clone() // st.mirror[inactive] must not change under a reader
	}
	st.mirror[inactive] = want
}

// rewrite makes buffer i of slot hold want, writing only what differs.
func (k *Kernel) rewrite(st *slotState, slot dataplane.Slot, i uint32, want *trieImage) error {
	buf, err := k.buffer(st, slot, i)
	if err != nil {
		return err
	}
	have := st.mirror[i]
	if have == nil {
		if have, err = readTrie(buf); err != nil {
			return err
		}
	}
	dels, keys, vals := plan(have, want)
	if err := apply(buf, dels, keys, vals); err != nil {
		return err
	}
	st.mirror[i] = want
	return nil
}

// apply deletes dels and writes keys and vals: one syscall each where the kernel has batch
// operations on tries; the elements one by one where it does not, or for what a batch left
// undone.
func apply(buf *ebpf.Map, dels, keys []bpfTetherRuleKey, vals []bpfTetherRuleValue) error {
	if len(dels) > 0 {
		n, _ := buf.BatchDelete(dels, nil)
		for _, key := range dels[n:] {
			if err := buf.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("removing %s: %w", describeKey(key), err)
			}
		}
	}
	if len(keys) > 0 {
		n, _ := buf.BatchUpdate(keys, vals, nil)
		for j := n; j < len(keys); j++ {
			if err := buf.Update(&keys[j], &vals[j], ebpf.UpdateAny); err != nil {
				return fmt.Errorf("%s: %w", describeKey(keys[j]), err)
			}
		}
	}
	return nil
}

// buffer returns buffer i of slot, creating it (and its tether_rulesets entry) when missing.
func (k *Kernel) buffer(st *slotState, slot dataplane.Slot, i uint32) (*ebpf.Map, error) {
	if st.bufs[i] != nil {
		return st.bufs[i], nil
	}
	idx := uint32(slot)*2 + i
	var id ebpf.MapID
	err := k.rulesets.Lookup(idx, &id)
	switch {
	case err == nil:
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			return nil, fmt.Errorf("opening rule buffer %d: %w", idx, err)
		}
		st.bufs[i] = m
	case errors.Is(err, ebpf.ErrKeyNotExist):
		m, err := ebpf.NewMap(k.innerSpec)
		if err != nil {
			return nil, fmt.Errorf("creating rule buffer: %w", err)
		}
		// Nothing reads a buffer that is not in force: waiting here costs only this call.
		if err := k.rulesets.Update(idx, m, ebpf.UpdateAny); err != nil {
			m.Close()
			return nil, fmt.Errorf("adding rule buffer %d: %w", idx, err)
		}
		st.bufs[i], st.mirror[i] = m, newImage(0)
	default:
		return nil, fmt.Errorf("looking up rule buffer %d: %w", idx, err)
	}
	return st.bufs[i], nil
}

// graceAsync starts waiting for an RCU grace period and returns a channel closed when it has
// passed (the kernel waits for one whenever a map-in-map entry is updated); then it runs after.
func (k *Kernel) graceAsync(after func()) chan struct{} {
	done := make(chan struct{})
	go func() {
		k.grace()
		close(done)
		after()
	}()
	return done
}

func (k *Kernel) grace() {
	if err := k.rulesets.Update(uint32(graceIndex), k.graceMap, ebpf.UpdateAny); err != nil {
		k.log.Warn("waiting for a grace period", "error", err)
	}
}

// encodeRuleSet turns rs into the entries of a rule trie.
func encodeRuleSet(rs *dataplane.RuleSet) (*trieImage, error) {
	out := newImage(rs.Entries())
	var errs []error
	put := func(key bpfTetherRuleKey, v bpfTetherRuleValue) {
		if !out.add(key, v) {
			errs = append(errs, fmt.Errorf("%s appears twice", describeKey(key)))
		}
	}
	put(headerKey(), bpfTetherRuleValue{Generation: rs.Generation, Mode: uint32(rs.Mode)})
	for _, e := range rs.Egress {
		v, err := egressValue(e)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		put(egressKey(e.Prefix), v)
	}
	entry := func(audit bool) bpfTetherRuleValue {
		if audit {
			return bpfTetherRuleValue{Mode: uint32(dataplane.ModeAudit)}
		}
		return bpfTetherRuleValue{}
	}
	for _, e := range rs.Exec {
		put(execKey(e.File), entry(e.Audit))
	}
	for _, u := range rs.Unix {
		key, err := unixKey(u)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		put(key, entry(u.Audit))
	}
	return out, errors.Join(errs...)
}

// Clear removes everything the kernel holds for slot: bindings, rule sets, flags, counters, info.
func (k *Kernel) Clear(slot dataplane.Slot) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	bindings, err := k.Bindings()
	if err != nil {
		return err
	}
	var errs []error
	for id, s := range bindings {
		if s == slot {
			errs = append(errs, k.Unbind(id))
		}
	}
	st := k.slot(slot)
	st.mu.Lock()
	defer st.mu.Unlock()
	st.epoch++ // no background sync writes from here on
	// State first: from here on the slot denies everything until it is reused.
	errs = append(errs, k.writeAgent(st, slot, 0, 0))
	st.waitQuiet()
	for i := range uint32(2) {
		if err := k.rulesets.Delete(uint32(slot)*2 + i); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
		if st.bufs[i] != nil {
			st.bufs[i].Close()
		}
	}
	st.bufs, st.mirror, st.quiet, st.loaded = [2]*ebpf.Map{}, [2]*trieImage{}, nil, false
	st.epoch++
	errs = append(errs, k.agentCounters.Update(uint32(slot), bpfTetherAgentCounts{}, ebpf.UpdateAny))
	errs = append(errs, k.agentInfo.Update(uint32(slot), bpfTetherAgentInfo{}, ebpf.UpdateAny))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clearing slot %d: %w", slot, err)
	}
	return nil
}

// closeSlots releases the buffer handles (the tries stay, held by tether_rulesets).
func (k *Kernel) closeSlots() {
	k.slotsMu.Lock()
	defer k.slotsMu.Unlock()
	for _, st := range k.slots {
		if st == nil {
			continue
		}
		st.mu.Lock()
		st.waitQuiet()
		st.epoch++ // no background sync writes to the closed buffers
		for _, b := range st.bufs {
			if b != nil {
				b.Close()
			}
		}
		st.mu.Unlock()
	}
}

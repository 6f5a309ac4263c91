package kernel

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// An agent's rule set lives in one of two buffers: an LPM trie (tether_rulesets[slot*2+i]) and
// the buffer's host rules in tether_hosts (see hosts.go); tether_agents[slot].active says which
// buffer is in force. Install rewrites the buffer not in force
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
	mu sync.Mutex
	// valMu serialises the writes of the slot's tether_agents value (taken inside mu, or alone
	// by Kill), so that Kill sets the killed flag without waiting for mu, which a rule set's
	// writes hold for milliseconds, and no write loses it.
	valMu sync.Mutex
	// killed latches the killed flag (guarded by valMu): every write of the value carries it,
	// until Revive or Clear.
	killed bool
	loaded bool // flags, active and floor read from the kernel
	flags  uint32
	active uint32
	floor  [2]uint64
	// bulk and trieMax of each buffer, as in struct tether_agent: what the hooks are told of
	// where its egress rules are.
	bulk    [2]uint8
	trieMax [2]uint8
	// born and gen are struct tether_agent's: who the slot's agent is (0: none yet), and the
	// rule-set generation each buffer holds.
	born uint64
	gen  [2]uint64
	// expires is each buffer's expiry, CLOCK_BOOTTIME nanoseconds (0: none).
	expires [2]uint64
	// mirror is what each buffer holds (its trie and its host rules); nil: unknown (read from
	// the kernel when needed).
	mirror [2]*trieImage
	// inTrie are host rules a buffer keeps in its trie because tether_hosts was full.
	inTrie [2]map[bpfTetherRuleKey]struct{}
	// retired are tether_hosts entries of a buffer below its floor, removed once no hook can
	// be reading the buffer.
	retired [2][]bpfTetherHostKey
	// scanned says a buffer's host rules have been taken from the scan made at Open.
	scanned [2]bool
	// leftover: a clear could not remove all of a buffer's host rules.
	leftover [2]bool
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
	st.flags, st.active, st.floor, st.bulk, st.trieMax, st.loaded = a.Flags, a.Active&1, a.Floor, a.Bulk, a.TrieMax, true
	st.born, st.gen, st.expires = a.Born, a.Generation, a.Expires
	return nil
}

// agentValue is the slot's tether_agents value with flags, active and floor.
func (st *slotState) agentValue(flags, active uint32, floor [2]uint64) bpfTetherAgent {
	return bpfTetherAgent{Flags: flags, Active: active, Floor: floor, Bulk: st.bulk, TrieMax: st.trieMax, Born: st.born, Generation: st.gen, Expires: st.expires}
}

// writeAgent writes the whole agent value. Call with st.mu held.
func (k *Kernel) writeAgent(st *slotState, slot dataplane.Slot, flags, active uint32) error {
	if err := k.putAgent(st, slot, st.agentValue(flags, active, st.floor)); err != nil {
		return fmt.Errorf("writing state of slot %d: %w", slot, err)
	}
	st.flags, st.active = flags, active
	return nil
}

// putAgent writes the slot's tether_agents value, with the killed flag while Kill latched it.
// Every write of the value goes through it.
func (k *Kernel) putAgent(st *slotState, slot dataplane.Slot, v bpfTetherAgent) error {
	st.valMu.Lock()
	defer st.valMu.Unlock()
	if st.killed {
		v.Flags |= uint32(dataplane.AgentKilled)
	}
	return k.agents.Update(uint32(slot), v, ebpf.UpdateAny)
}

// Kill sets the killed flag of the agent in slot now, without st.mu: an install of the slot in
// progress does not delay it, and its writes keep the flag (see putAgent). From the write on,
// the agent's connects, datagrams, packets, sockets and execs are denied; the sweep then
// terminates its live sockets.
func (k *Kernel) Kill(slot dataplane.Slot) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	st := k.slot(slot)
	st.valMu.Lock()
	st.killed = true
	var a bpfTetherAgent
	err := k.agents.Lookup(uint32(slot), &a)
	if err == nil {
		a.Flags |= uint32(dataplane.AgentKilled)
		err = k.agents.Update(uint32(slot), &a, ebpf.UpdateAny)
	}
	st.valMu.Unlock()
	if err != nil {
		return fmt.Errorf("setting the killed flag of slot %d: %w", slot, err)
	}
	k.sweeper.request(slot)
	return nil
}

// Revive ends Kill's latch on slot: the next SetFlags decides the killed flag again.
func (k *Kernel) Revive(slot dataplane.Slot) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	st := k.slot(slot)
	st.valMu.Lock()
	st.killed = false
	st.valMu.Unlock()
	return nil
}

// SetFlags replaces the state flags of the agent in slot.
func (k *Kernel) SetFlags(slot dataplane.Slot, flags dataplane.AgentFlags) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	st := k.slot(slot)
	st.mu.Lock()
	if err := k.loadSlot(st, slot); err != nil {
		st.mu.Unlock()
		return err
	}
	// A flag Kill latched has had its sweep requested already.
	st.valMu.Lock()
	latched := st.killed
	st.valMu.Unlock()
	killed := flags&dataplane.AgentKilled != 0 && st.flags&uint32(dataplane.AgentKilled) == 0 && !latched
	err := k.writeAgent(st, slot, uint32(flags), st.active)
	st.mu.Unlock()
	if err == nil && killed {
		// Killed, the agent's packets are dropped from the write on; the sweep terminates its
		// sockets right after (not waited for: the kill's deny step is the write).
		k.sweeper.request(slot)
	}
	return err
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
		// Partly written: read it back next time, and what the kernel says of it.
		st.mirror[target], st.loaded = nil, false
		return fmt.Errorf("writing rule set of slot %d: %w", slot, err)
	}
	st.expires[target] = expiresNs(rs.Expires)
	if err := k.writeAgent(st, slot, st.flags, target); err != nil {
		return err
	}
	epoch := st.epoch
	st.quiet = k.graceAsync(func() { k.syncInactive(st, slot, epoch) })
	k.sweeper.timed(slot, want.maxDuration())
	// Live sockets the new rule set no longer allows: their packets are dropped from the flip
	// on (tether_egress_skb); the sweep terminates them.
	k.sweeper.request(slot)
	return nil
}

// SetExpiry moves the expiry of the rule set in force in slot, in place: the buffer in force is
// not written again. A hook that reads the value while it is written sees the old expiry or the
// new one.
func (k *Kernel) SetExpiry(slot dataplane.Slot, expires time.Time) error {
	if err := checkSlot(slot); err != nil {
		return err
	}
	st := k.slot(slot)
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := k.loadSlot(st, slot); err != nil {
		return err
	}
	old := st.expires[st.active]
	st.expires[st.active] = expiresNs(expires)
	if err := k.writeAgent(st, slot, st.flags, st.active); err != nil {
		st.expires[st.active] = old
		return fmt.Errorf("moving the expiry of slot %d: %w", slot, err)
	}
	return nil
}

// expiresNs is struct tether_agent's expires for t (zero: 0, never).
func expiresNs(t time.Time) uint64 {
	if t.IsZero() {
		return 0
	}
	return bootclock.Deadline(t)
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

// isQuiet reports whether no hook can be reading the buffer not in force, without waiting.
func (st *slotState) isQuiet() bool {
	if st.quiet == nil {
		return true
	}
	select {
	case <-st.quiet:
		return true
	default:
		return false
	}
}

// syncInactive makes the buffer not in force hold what the one in force holds, and removes its
// retired host rules, unless anything happened to the slot since the install of epoch (whatever
// did writes what it needs itself). It writes in chunks and lets go of the slot between them, so
// an install that comes meanwhile waits for one chunk at most (and then writes what is still
// missing itself); except when the buffer changes its bulk length, which it does in one go.
func (k *Kernel) syncInactive(st *slotState, slot dataplane.Slot, epoch uint64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.epoch != epoch {
		return
	}
	inactive := 1 - st.active
	want := st.mirror[st.active]
	if want == nil {
		return
	}
	buf, err := k.buffer(st, slot, inactive)
	if err != nil {
		k.log.Debug("opening the idle rule buffer", "slot", slot, "error", err)
		return
	}
	defer buf.Close()
	have := st.mirror[inactive]
	if have == nil {
		if have, err = k.readBuffer(st, slot, inactive, buf); err != nil {
			k.log.Debug("reading the idle rule buffer", "slot", slot, "error", err)
			return
		}
		st.mirror[inactive] = have
	}
	if err := k.removeRetired(st, inactive); err != nil {
		k.log.Debug("removing retired host rules", "slot", slot, "error", err)
	}
	if bulk := bulkOf(want); bulk != st.bulk[inactive] {
		// The idle buffer takes the bulk length that suits what it is to hold, so that the
		// next install into it, when it replaces most rules, can retire them rather than
		// delete them. It is idle and quiet: what it retires goes at once.
		if err := k.rebulk(st, slot, inactive, buf, have, want, bulk); err != nil {
			st.mirror[inactive], st.loaded = nil, false // read both back at the next install
			k.log.Debug("bringing the idle rule buffer up to date", "slot", slot, "error", err)
			return
		}
	} else if !k.syncChunks(st, slot, inactive, buf, have, want, epoch) {
		return
	}
	if len(st.retired[st.active]) > 0 {
		k.dropRetiredLater(st, slot, epoch)
	}
}

// syncChunks writes the changes from have to want into the idle buffer inactive of slot in chunks,
// letting go of the slot between them; it reports whether it wrote them all in epoch.
func (k *Kernel) syncChunks(st *slotState, slot dataplane.Slot, inactive uint32, buf *ebpf.Map, have, want *trieImage, epoch uint64) bool {
	all := diff(have, want)
	const chunk = 256
	done := changes{dels: all.dels[:0], writes: all.writes[:0]}
	for {
		nd, nw := min(len(all.dels), len(done.dels)+chunk), min(len(all.writes), len(done.writes)+chunk)
		part := changes{dels: all.dels[len(done.dels):nd], writes: all.writes[len(done.writes):nw]}
		if err := k.applyBuffer(st, slot, inactive, buf, have, want, part, st.bulk[inactive], st.floor[inactive]); err != nil {
			st.mirror[inactive] = nil // read it back at the next install
			k.log.Debug("bringing the idle rule buffer up to date", "slot", slot, "error", err)
			return false
		}
		done = changes{dels: all.dels[:nd], writes: all.writes[:nw]}
		if len(done.dels) == len(all.dels) && len(done.writes) == len(all.writes) {
			break
		}
		// An install that comes while the slot is let go reads this as what the buffer
		// holds, and ends this sync (a new epoch) before the next chunk could change it.
		st.mirror[inactive] = applied(have, want, done)
		st.mu.Unlock()
		runtime.Gosched()
		st.mu.Lock()
		if st.epoch != epoch {
			return false // the buffer holds its mirror; whoever came writes the rest
		}
	}
	if err := k.holds(st, slot, inactive, want); err != nil {
		st.mirror[inactive], st.loaded = nil, false
		k.log.Debug("bringing the idle rule buffer up to date", "slot", slot, "error", err)
		return false
	}
	return true
}

// rebulk makes idle, quiet buffer i of slot, which holds have, hold want under bulk length bulk:
// it retires the buffer's tether_hosts entries, writes want's, and removes the retired ones.
func (k *Kernel) rebulk(st *slotState, slot dataplane.Slot, i uint32, buf *ebpf.Map, have, want *trieImage, bulk uint8) error {
	c, haveBulk := planRetired(st, i, have, want, bulk), st.bulk[i]
	if err := k.retire(st, slot, i, have, bulk); err != nil {
		return err
	}
	if err := k.applyBuffer(st, slot, i, buf, have, want, c, haveBulk, st.floor[i]); err != nil {
		return err
	}
	if err := k.holds(st, slot, i, want); err != nil {
		return err
	}
	return k.removeRetired(st, i)
}

// dropRetiredLater removes the retired host rules of the buffer in force, unless the slot has an
// install (which makes that buffer idle, and its sync removes them) within cleanupDelay. They
// can go only once no hook reads the buffer, so the idle buffer, equal to it by now, is put in
// force first, and they go after the grace period. Until then they take room in tether_hosts.
// The delay keeps this switch and its grace period out of the way of a burst of changes.
func (k *Kernel) dropRetiredLater(st *slotState, slot dataplane.Slot, epoch uint64) {
	time.AfterFunc(k.cleanupDelay, func() {
		st.mu.Lock()
		defer st.mu.Unlock()
		if st.epoch != epoch || !st.isQuiet() || len(st.retired[st.active]) == 0 {
			return
		}
		if in := 1 - st.active; st.mirror[in] == nil || st.mirror[in] != st.mirror[st.active] {
			return
		}
		old := st.active
		if err := k.writeAgent(st, slot, st.flags, 1-old); err != nil {
			k.log.Debug("switching to the up-to-date idle buffer", "slot", slot, "error", err)
			return
		}
		st.quiet = k.graceAsync(func() {
			st.mu.Lock()
			defer st.mu.Unlock()
			if st.epoch != epoch {
				return // an install wrote buffer old; its own sync removes them
			}
			if err := k.removeRetired(st, old); err != nil {
				k.log.Debug("removing retired host rules", "slot", slot, "error", err)
			}
		})
	})
}

// rewrite makes buffer i of slot (not in force, no hook reading it) hold want. It writes only what
// differs, or, when that is cheaper (most rules replaced), retires the buffer's tether_hosts
// entries with one write and writes want's anew, with the bulk length that suits want; the
// retired ones are removed later.
func (k *Kernel) rewrite(st *slotState, slot dataplane.Slot, i uint32, want *trieImage) error {
	buf, err := k.buffer(st, slot, i)
	if err != nil {
		return err
	}
	defer buf.Close()
	have := st.mirror[i]
	if have == nil {
		if have, err = k.readBuffer(st, slot, i, buf); err != nil {
			return err
		}
	}
	c, haveBulk := diff(have, want), st.bulk[i]
	bulk := bulkOf(want)
	// Retiring writes at least the floor and want's tether_hosts entries: a change smaller than
	// that (an approval) needs no plan to compare with.
	if n := len(c.dels) + len(c.writes); n > 1+hashed(st, i, want, bulk) {
		if r := planRetired(st, i, have, want, bulk); 1+len(r.dels)+len(r.writes) < n {
			if err := k.retire(st, slot, i, have, bulk); err != nil {
				return err
			}
			c = r
		}
	}
	if err := k.applyBuffer(st, slot, i, buf, have, want, c, haveBulk, st.floor[i]); err != nil {
		return err
	}
	return k.holds(st, slot, i, want)
}

// retire retires the tether_hosts entries of buffer i, which holds have, and gives it bulk
// length bulk; the retired entries are recorded for removal.
func (k *Kernel) retire(st *slotState, slot dataplane.Slot, i uint32, have *trieImage, bulk uint8) error {
	for j := range int32(have.len()) {
		if st.inHashAt(i, have, j) {
			st.retired[i] = append(st.retired[i], hostKeyAt(bufIndex(slot, i), have, j))
		}
	}
	st.bulk[i] = bulk
	return k.writeFloor(st, slot, i)
}

// minBulk is the fewest rules of one length that make it a buffer's bulk length: for fewer, trie
// updates cost little.
const minBulk = 64

// bulkOf is the bulk length for a buffer that holds img: its most common egress prefix length
// other than a host's (the longer of equals), or 0 when no other has minBulk rules.
func bulkOf(img *trieImage) uint8 {
	var n [8 + 128 + 1]int
	for j := range img.ents {
		if e := &img.ents[j]; e.kind == uint8(bpfTetherRuleKindTETHER_RULE_EGRESS) && e.long == 0 && e.bits < 8+128 {
			n[e.bits]++
		}
	}
	best := 0
	for bits := range n {
		if n[bits] >= minBulk && n[bits] >= n[best] {
			best = bits
		}
	}
	return uint8(best)
}

// hashed counts the entries of img that buffer i keeps in tether_hosts under bulk length bulk.
func hashed(st *slotState, i uint32, img *trieImage, bulk uint8) int {
	n := 0
	for j := range int32(img.len()) {
		if img.hashable(j, bulk) && !st.marked(i, img, j) {
			n++
		}
	}
	return n
}

// planRetired is the plan once buffer i's tether_hosts entries are retired and its bulk length
// is bulk: all of want's rules that go into tether_hosts, and the trie's changes (a rule that
// moves out of the trie is deleted there).
func planRetired(st *slotState, i uint32, have, want *trieImage, bulk uint8) changes {
	var c changes
	c.writes = make([]int32, 0, want.len())
	vc := valueCompare{have: have, want: want, hv: -1}
	walk(have, want, func(h, w int32) {
		inTrie := h >= 0 && !st.inHashAt(i, have, h)
		switch {
		case w < 0:
			if inTrie {
				c.dels = append(c.dels, h)
			}
		case want.hashable(w, bulk) && !st.marked(i, want, w): // into tether_hosts
			if inTrie {
				c.dels = append(c.dels, h)
			}
			c.writes = append(c.writes, w)
		case !inTrie || !vc.equal(h, w):
			c.writes = append(c.writes, w)
		}
	})
	return c
}

// holds records that buffer i holds img, once its entries are written, and tells the hooks the
// longest egress rule the buffer keeps in its trie and the generation it holds (and, for a slot's
// first rule set, who its agent is). Call it before the buffer is put in force.
func (k *Kernel) holds(st *slotState, slot dataplane.Slot, i uint32, img *trieImage) error {
	var longest uint8
	for j := range int32(img.len()) {
		if e := &img.ents[j]; e.kind == uint8(bpfTetherRuleKindTETHER_RULE_EGRESS) && !st.inHashAt(i, img, j) {
			longest = max(longest, uint8(e.bits))
		}
	}
	gen := img.generation()
	if longest != st.trieMax[i] || gen != st.gen[i] || st.born == 0 {
		st.trieMax[i], st.gen[i] = longest, gen
		if st.born == 0 {
			st.born = newBorn()
		}
		if err := k.writeAgent(st, slot, st.flags, st.active); err != nil {
			return err
		}
	}
	st.mirror[i] = img
	return nil
}

// newBorn is a struct tether_agent born for a slot's new agent: CLOCK_BOOTTIME in nanoseconds,
// which no earlier agent of the slot had (sockets live no longer than a boot).
func newBorn() uint64 { return bootclock.Nanos() }

// buffer opens buffer i of slot, creating it (and its tether_rulesets entry) when missing; the
// caller closes it. No descriptor of a buffer stays open between uses (tether_rulesets holds
// them): 10,000 agents would otherwise hold 20,000 descriptors.
func (k *Kernel) buffer(st *slotState, slot dataplane.Slot, i uint32) (*ebpf.Map, error) {
	idx := bufIndex(slot, i)
	var id ebpf.MapID
	err := k.rulesets.Lookup(idx, &id)
	switch {
	case err == nil:
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			return nil, fmt.Errorf("opening rule buffer %d: %w", idx, err)
		}
		return m, nil
	case errors.Is(err, ebpf.ErrKeyNotExist):
		// Host rules of a buffer whose trie is gone (a clear that did not finish, in this
		// process or an earlier one) are no one's: nothing reads a buffer that is not in
		// force, so they go now.
		if !st.scanned[i] || st.leftover[i] {
			left, err := k.hostsOf(st, slot, i)
			if err != nil {
				return nil, err
			}
			stale := make([]bpfTetherHostKey, len(left))
			for j, e := range left {
				stale[j] = e.key
			}
			if err := deleteAll(k.hosts, stale, describeHostKey); err != nil {
				return nil, fmt.Errorf("removing host rules left in buffer %d: %w", idx, err)
			}
			st.scanned[i], st.leftover[i] = true, false
		}
		m, err := ebpf.NewMap(k.innerSpec)
		if err != nil {
			return nil, fmt.Errorf("creating rule buffer: %w", err)
		}
		// Nothing reads a buffer that is not in force: waiting here costs only this call.
		if err := k.rulesets.Update(idx, m, ebpf.UpdateAny); err != nil {
			m.Close()
			return nil, fmt.Errorf("adding rule buffer %d: %w", idx, err)
		}
		st.mirror[i], st.inTrie[i], st.retired[i] = newImage(0), nil, nil
		return m, nil
	default:
		return nil, fmt.Errorf("looking up rule buffer %d: %w", idx, err)
	}
}

// graceAsync returns a channel closed once an RCU grace period has passed since the call (the
// kernel waits for one whenever a map-in-map entry is updated); then after runs. One waiting
// goroutine serves every call made before its grace period started, and one more runs the
// afters in order: a policy change installs thousands of rule sets, and a goroutine each, blocked
// in the kernel, took a thread each and the CPU from the installs.
func (k *Kernel) graceAsync(after func()) chan struct{} {
	done := make(chan struct{})
	q := &k.graces
	q.mu.Lock()
	q.waiting = append(q.waiting, graceCall{done: done, after: after})
	start := !q.running
	q.running = true
	q.mu.Unlock()
	if start {
		go k.graceLoop()
	}
	return done
}

// graceQueue holds the calls of graceAsync waiting for a grace period, and the afters of those
// whose period has passed.
type graceQueue struct {
	mu           sync.Mutex
	waiting      []graceCall
	running      bool // graceLoop runs
	afters       []func()
	runningAfter bool // afterLoop runs
}

type graceCall struct {
	done  chan struct{}
	after func()
}

// graceLoop waits for grace periods while calls wait for one: a period started after a call
// serves it.
func (k *Kernel) graceLoop() {
	q := &k.graces
	for {
		q.mu.Lock()
		batch := q.waiting
		q.waiting = nil
		if len(batch) == 0 {
			q.running = false
			q.mu.Unlock()
			return
		}
		q.mu.Unlock()
		k.grace()
		q.mu.Lock()
		for _, c := range batch {
			close(c.done)
			q.afters = append(q.afters, c.after)
		}
		start := !q.runningAfter
		q.runningAfter = true
		q.mu.Unlock()
		if start {
			go k.afterLoop()
		}
	}
}

// afterLoop runs the afters of calls whose grace period has passed, in order.
func (k *Kernel) afterLoop() {
	q := &k.graces
	for {
		q.mu.Lock()
		if len(q.afters) == 0 {
			q.runningAfter = false
			q.mu.Unlock()
			return
		}
		f := q.afters[0]
		q.afters[0] = nil
		q.afters = q.afters[1:]
		q.mu.Unlock()
		f()
	}
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
	put := func(key bpfTetherRuleKey, v bpfTetherRuleValue) { out.append(&key, &v) }
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
		v := entry(e.Audit)
		v.Generation = uint64(e.Changed) // the change time the file must still have
		put(execKey(e.File), v)
	}
	for _, u := range rs.UnixDirs {
		key, err := unixDirKey(u)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		put(key, entry(u.Audit))
	}
	if len(rs.Listen) > 0 {
		if v, err := listenValue(rs.Listen); err != nil {
			errs = append(errs, err)
		} else {
			put(listenKey(), v)
		}
	}
	for _, u := range rs.Unix {
		key, err := unixKey(u)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		put(key, entry(u.Audit))
	}
	for _, key := range out.seal() {
		errs = append(errs, fmt.Errorf("%s appears twice", describeKey(key)))
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
	errs = append(errs, k.forgetRootsOf(slot))
	st := k.slot(slot)
	st.mu.Lock()
	defer st.mu.Unlock()
	st.epoch++ // no background sync writes from here on
	if err := k.loadSlot(st, slot); err != nil {
		errs = append(errs, err)
	}
	st.valMu.Lock()
	st.killed = false // the slot's next agent is another
	st.valMu.Unlock()
	// State first: from here on the slot denies everything until it is reused.
	errs = append(errs, k.writeAgent(st, slot, 0, 0))
	// The agent's live connections go with it: terminated now, while its sockets are still
	// known as its. Then the slot forgets the agent: a socket left over is attributed again
	// by its cgroup, which is no agent's now.
	k.sweeper.timed(slot, 0)
	if _, err := k.Sweep(slot); err != nil {
		errs = append(errs, err)
	}
	st.born, st.gen, st.expires = 0, [2]uint64{}, [2]uint64{}
	errs = append(errs, k.writeAgent(st, slot, 0, 0))
	st.waitQuiet()
	var hosts []bpfTetherHostKey
	for i := range uint32(2) {
		keys, err := k.hostKeysOf(st, slot, i)
		errs = append(errs, err)
		hosts = append(hosts, keys...)
		if err := k.rulesets.Delete(bufIndex(slot, i)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	st.mirror, st.inTrie, st.retired, st.loaded = [2]*trieImage{}, [2]map[bpfTetherRuleKey]struct{}{}, [2][]bpfTetherHostKey{}, false
	st.epoch++
	// A hook that read the slot's state before it changed may still be reading its host rules,
	// and a preallocated hash reuses a deleted element at once: they go after a grace period.
	// The slot's next install waits for that.
	done := make(chan struct{})
	go func() {
		defer close(done)
		k.grace()
		st.mu.Lock()
		defer st.mu.Unlock()
		if err := deleteAll(k.hosts, hosts, describeHostKey); err != nil {
			k.log.Warn("removing the host rules of a cleared slot", "slot", slot, "error", err)
			st.leftover = [2]bool{true, true}
		}
	}()
	st.quiet = done
	errs = append(errs, k.agentCounters.Update(uint32(slot), bpfTetherAgentCounts{}, ebpf.UpdateAny))
	if cpus, err := ebpf.PossibleCPU(); err != nil {
		errs = append(errs, err)
	} else {
		errs = append(errs, k.agentAllows.Update(uint32(slot), make([]bpfTetherAgentAllows, cpus), ebpf.UpdateAny))
	}
	errs = append(errs, k.agentInfo.Update(uint32(slot), bpfTetherAgentInfo{}, ebpf.UpdateAny))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clearing slot %d: %w", slot, err)
	}
	return nil
}

// hostKeysOf lists the tether_hosts keys of buffer i of slot: what the record says it holds, or,
// when the record is unknown, what the kernel holds.
func (k *Kernel) hostKeysOf(st *slotState, slot dataplane.Slot, i uint32) ([]bpfTetherHostKey, error) {
	keys := slices.Clone(st.retired[i])
	if img := st.mirror[i]; img != nil && !st.leftover[i] {
		for j := range int32(img.len()) {
			if st.inHashAt(i, img, j) {
				keys = append(keys, hostKeyAt(bufIndex(slot, i), img, j))
			}
		}
		return keys, nil
	}
	entries, err := k.hostsOf(st, slot, i)
	for _, e := range entries {
		keys = append(keys, e.key)
	}
	return keys, err
}

// closeSlots ends every slot's background work (the tries stay, held by tether_rulesets).
func (k *Kernel) closeSlots() {
	k.slotsMu.Lock()
	defer k.slotsMu.Unlock()
	for _, st := range k.slots {
		if st == nil {
			continue
		}
		st.mu.Lock()
		st.waitQuiet()
		st.epoch++ // no background sync writes after the close
		st.mu.Unlock()
	}
}

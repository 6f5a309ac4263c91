package kernel

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Egress rules of two prefix lengths live in tether_hosts, keyed by buffer, prefix length and
// address: host rules (one address: a /32 or /128) and the rules of the buffer's bulk length (the
// most common other length of the rule set it held when its host rules last retired). The hooks
// look there first and into the buffer's trie only when it may hold a longer match (see struct
// tether_agent). A preallocated hash update costs about a quarter of a trie update, and a whole
// buffer's tether_hosts entries retire with one write of its floor: an install that replaces
// every rule writes the new rules and the floor, and the old entries are removed in the
// background once no hook can be reading them. A rule goes into the trie instead when it has more
// port rules than tether_hosts holds or tether_hosts is full.

// hashable reports whether key goes into tether_hosts in a buffer of bulk length bulk (0: none).
func hashable(bulk uint8, key *bpfTetherRuleKey) bool {
	e, tail := entryOf(key)
	return !tail && e.hashable(bulk)
}

// bufIndex is buffer i of slot, as tether_rulesets and tether_hosts number it.
func bufIndex(slot dataplane.Slot, i uint32) uint32 { return uint32(slot)*2 + i }

// hostKeyAt is the tether_hosts key of entry j of img in buffer buf.
func hostKeyAt(buf uint32, img *trieImage, j int32) bpfTetherHostKey {
	return bpfTetherHostKey{Buf: buf, Prefixlen: img.ents[j].bits, Addr: img.ents[j].data}
}

func ruleKeyOf(hk *bpfTetherHostKey) bpfTetherRuleKey {
	key := bpfTetherRuleKey{Prefixlen: hk.Prefixlen, Kind: uint8(bpfTetherRuleKindTETHER_RULE_EGRESS)}
	copy(key.Data[:16], hk.Addr[:])
	return key
}

// hostEntry is one tether_hosts entry as read from the kernel.
type hostEntry struct {
	key bpfTetherHostKey
	val bpfTetherHostValue
}

// hostValue is v in tether_hosts' form, stamped with generation; ok is false when v has more port
// rules than that form holds.
func hostValue(v *bpfTetherRuleValue, generation uint64) (h bpfTetherHostValue, ok bool) {
	if int(v.Count) > len(h.Ports) {
		return h, false
	}
	h.Generation, h.Count = generation, v.Count
	copy(h.Ports[:], v.Ports[:v.Count])
	return h, true
}

// ruleValue is the tether_hosts value of a rule of prefixlen in a rule trie's form (without its
// generation stamp).
func ruleValue(h *bpfTetherHostValue, prefixlen uint32) bpfTetherRuleValue {
	v := bpfTetherRuleValue{Mode: prefixlen, Count: h.Count}
	copy(v.Ports[:], h.Ports[:min(int(h.Count), len(h.Ports))])
	return v
}

// scanHosts reads every tether_hosts entry, by buffer.
func (k *Kernel) scanHosts() (map[uint32][]hostEntry, error) {
	out := map[uint32][]hostEntry{}
	err := k.eachHost(func(e hostEntry) { out[e.key.Buf] = append(out[e.key.Buf], e) })
	return out, err
}

// eachHost calls f with every tether_hosts entry: a few thousand per system call where the
// kernel has batch lookups (a full map is 64Ki entries), one by one where it does not.
func (k *Kernel) eachHost(f func(hostEntry)) error {
	const chunk = 4096
	keys := make([]bpfTetherHostKey, chunk)
	vals := make([]bpfTetherHostValue, chunk)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := k.hosts.BatchLookup(&cursor, keys, vals, nil)
		for j := range n {
			f(hostEntry{keys[j], vals[j]})
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil
		case errors.Is(err, ebpf.ErrNotSupported) && n == 0:
			var e hostEntry
			it := k.hosts.Iterate()
			for it.Next(&e.key, &e.val) {
				f(e)
			}
			if err := it.Err(); err != nil {
				return fmt.Errorf("reading host rules: %w", err)
			}
			return nil
		case err != nil:
			return fmt.Errorf("reading host rules: %w", err)
		}
	}
}

// hostsOf returns the tether_hosts entries of buffer i of slot. The first time, they come from
// the scan made when the pins were opened (nothing has written the buffer since); later, from a
// new scan.
func (k *Kernel) hostsOf(st *slotState, slot dataplane.Slot, i uint32) ([]hostEntry, error) {
	buf := bufIndex(slot, i)
	if !st.scanned[i] {
		st.scanned[i] = true
		k.adoptedMu.Lock()
		defer k.adoptedMu.Unlock()
		e := k.adopted[buf]
		delete(k.adopted, buf)
		return e, nil
	}
	all, err := k.scanHosts()
	if err != nil {
		return nil, err
	}
	return all[buf], nil
}

// readBuffer reads what buffer i of slot holds: its trie, and its host rules at or above its
// floor. Call it only for a buffer no hook can be reading. Host rules below the floor are recorded
// for removal; a trie entry that a host rule shadows is removed.
func (k *Kernel) readBuffer(st *slotState, slot dataplane.Slot, i uint32, trie *ebpf.Map) (*trieImage, error) {
	img := newImage(0)
	if err := readTrie(trie, img); err != nil {
		return nil, err
	}
	st.inTrie[i] = nil
	for j := range int32(img.len()) {
		if img.hashable(j, st.bulk[i]) {
			st.markInTrie(i, img.key(j), true)
		}
	}
	hosts, err := k.hostsOf(st, slot, i)
	if err != nil {
		return nil, err
	}
	st.retired[i] = st.retired[i][:0]
	for _, e := range hosts {
		key := ruleKeyOf(&e.key)
		if e.val.Generation < st.floor[i] || !hashable(st.bulk[i], &key) {
			st.retired[i] = append(st.retired[i], e.key)
			continue
		}
		if _, shadowed := st.inTrie[i][key]; shadowed {
			if err := trie.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return nil, fmt.Errorf("removing %s from the trie: %w", describeKey(key), err)
			}
			st.markInTrie(i, key, false)
		}
		v := ruleValue(&e.val, e.key.Prefixlen)
		img.append(&key, &v) // in place of the trie's entry, if any
	}
	img.seal()
	return img, nil
}

func (st *slotState) markInTrie(i uint32, key bpfTetherRuleKey, in bool) {
	switch {
	case in && st.inTrie[i] == nil:
		st.inTrie[i] = map[bpfTetherRuleKey]struct{}{key: {}}
	case in:
		st.inTrie[i][key] = struct{}{}
	default:
		delete(st.inTrie[i], key)
	}
}

// inHash reports whether buffer i keeps key in tether_hosts.
func (st *slotState) inHash(i uint32, key *bpfTetherRuleKey) bool {
	if !hashable(st.bulk[i], key) {
		return false
	}
	_, t := st.inTrie[i][*key]
	return !t
}

// inHashAt reports whether buffer i keeps entry j of img in tether_hosts.
func (st *slotState) inHashAt(i uint32, img *trieImage, j int32) bool {
	return img.hashable(j, st.bulk[i]) && !st.marked(i, img, j)
}

// marked reports whether buffer i keeps entry j of img in its trie though it could go into
// tether_hosts.
func (st *slotState) marked(i uint32, img *trieImage, j int32) bool {
	if len(st.inTrie[i]) == 0 {
		return false
	}
	_, t := st.inTrie[i][img.key(j)]
	return t
}

// writeFloor retires every host rule buffer i holds now: rules written after it carry a
// generation above any before it.
func (k *Kernel) writeFloor(st *slotState, slot dataplane.Slot, i uint32) error {
	floor := st.floor
	floor[i] = max(floor[0], floor[1]) + 1
	if err := k.putAgent(st, slot, st.agentValue(st.flags, st.active, floor)); err != nil {
		return fmt.Errorf("retiring the host rules of slot %d: %w", slot, err)
	}
	st.floor = floor
	return nil
}

// removeRetired deletes the retired host rules of buffer i that it does not hold again. Call it
// only for a buffer no hook can be reading: an element of a preallocated hash is reused at once.
func (k *Kernel) removeRetired(st *slotState, i uint32) error {
	if len(st.retired[i]) == 0 {
		return nil
	}
	held := st.mirror[i]
	var dels []bpfTetherHostKey
	for _, hk := range st.retired[i] {
		key := ruleKeyOf(&hk)
		if held != nil && st.inHash(i, &key) {
			if _, ok := held.find(&key); ok {
				continue // written again since, at or above the floor
			}
		}
		dels = append(dels, hk)
	}
	if err := deleteAll(k.hosts, dels, describeHostKey); err != nil {
		return fmt.Errorf("removing retired host rules: %w", err)
	}
	st.retired[i] = st.retired[i][:0]
	return nil
}

// applyBuffer carries out c on buffer i of slot: deletes have's entries c.dels (placed by the
// bulk length haveBulk) and writes want's entries c.writes. Host rules go into tether_hosts with generation stamp, unless the buffer keeps
// them in its trie, they have more port rules than tether_hosts holds, or it is full; everything
// else into the trie.
func (k *Kernel) applyBuffer(st *slotState, slot dataplane.Slot, i uint32, trie *ebpf.Map,
	have, want *trieImage, c changes, haveBulk uint8, stamp uint64) error {
	buf := bufIndex(slot, i)
	inHash := func(j int32) bool { return have.hashable(j, haveBulk) && !st.marked(i, have, j) }
	hostDelN, hostN := 0, 0
	for _, j := range c.dels {
		if inHash(j) {
			hostDelN++
		}
	}
	for _, j := range c.writes {
		if st.inHashAt(i, want, j) {
			hostN++
		}
	}
	trieDels := make([]bpfTetherRuleKey, 0, len(c.dels)-hostDelN)
	hostDels := make([]bpfTetherHostKey, 0, hostDelN)
	for _, j := range c.dels {
		if inHash(j) {
			hostDels = append(hostDels, hostKeyAt(buf, have, j))
			continue
		}
		key := have.key(j)
		trieDels = append(trieDels, key)
		st.markInTrie(i, key, false)
	}
	if err := deleteAll(k.hosts, hostDels, describeHostKey); err != nil {
		return err
	}
	if err := deleteAll(trie, trieDels, describeKey); err != nil {
		return err
	}
	trieKeys := make([]bpfTetherRuleKey, 0, len(c.writes)-hostN)
	trieVals := make([]bpfTetherRuleValue, 0, len(c.writes)-hostN)
	hostRules := make([]int32, 0, hostN)
	hostKeys := make([]bpfTetherHostKey, 0, hostN)
	hostVals := make([]bpfTetherHostValue, 0, hostN)
	var moved []int32 // host rules that go into the trie instead
	for _, j := range c.writes {
		if !st.inHashAt(i, want, j) {
			trieKeys, trieVals = append(trieKeys, want.key(j)), append(trieVals, *want.val(j))
			continue
		}
		h, fits := hostValue(want.val(j), stamp)
		if !fits {
			moved = append(moved, j)
			continue
		}
		hostRules, hostKeys, hostVals = append(hostRules, j), append(hostKeys, hostKeyAt(buf, want, j)), append(hostVals, h)
	}
	n, err := updateAll(k.hosts, hostKeys, hostVals, describeHostKey)
	if errors.Is(err, unix.E2BIG) {
		// Once: from then on the "host_rules" map fill says it.
		if full := uint64(len(hostRules) - n); k.hostsFull.Add(full) == full {
			k.log.Warn("tether_hosts is full: host rules go into the tries, whose updates cost more",
				"capacity", k.hosts.MaxEntries())
		}
		moved = append(moved, hostRules[n:]...)
	} else if err != nil {
		return err
	}
	// Host rules that go into the trie (too many port rules, or tether_hosts full): an older
	// version of one in tether_hosts would shadow it, so that goes first.
	gone := make([]bpfTetherHostKey, len(moved))
	for m, j := range moved {
		gone[m] = hostKeyAt(buf, want, j)
		st.markInTrie(i, want.key(j), true)
		trieKeys, trieVals = append(trieKeys, want.key(j)), append(trieVals, *want.val(j))
	}
	if err := deleteAll(k.hosts, gone, describeHostKey); err != nil {
		return err
	}
	_, err = updateAll(trie, trieKeys, trieVals, describeKey)
	return err
}

// deleteAll deletes keys from m, one syscall where the kernel has batch operations; a key that
// is not there is not an error.
func deleteAll[K any](m *ebpf.Map, keys []K, describe func(K) string) error {
	if len(keys) == 0 {
		return nil
	}
	n, _ := m.BatchDelete(keys, nil)
	for _, key := range keys[n:] {
		if err := m.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("removing %s: %w", describe(key), err)
		}
	}
	return nil
}

// updateAll writes keys and vals into m and returns how many it wrote before an error.
func updateAll[K, V any](m *ebpf.Map, keys []K, vals []V, describe func(K) string) (int, error) {
	if len(keys) == 0 {
		return 0, nil
	}
	n, _ := m.BatchUpdate(keys, vals, nil)
	for ; n < len(keys); n++ {
		if err := m.Update(&keys[n], &vals[n], ebpf.UpdateAny); err != nil {
			return n, fmt.Errorf("%s: %w", describe(keys[n]), err)
		}
	}
	return n, nil
}

func describeHostKey(hk bpfTetherHostKey) string {
	return fmt.Sprintf("host rule of buffer %d: %s", hk.Buf, describeKey(ruleKeyOf(&hk)))
}

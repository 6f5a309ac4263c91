package kernel

import (
	"fmt"
	"maps"
	"slices"

	"github.com/cilium/ebpf"
)

// trieImage is the content of a rule buffer as tetherd knows it: entries in two slices, and an
// index by key. (A map from key to value would store each 400-byte value in an allocation of its
// own.) Egress keys, nearly all of them, are indexed by their 20 significant bytes: hashing and
// comparing the whole 116-byte key made up most of the cost of encoding and diffing a rule set.
type trieImage struct {
	keys  []bpfTetherRuleKey
	vals  []bpfTetherRuleValue
	short map[shortKey]int32
	long  map[bpfTetherRuleKey]int32 // the keys short does not take
}

// shortKey is an egress key's prefix length and address.
type shortKey struct {
	bits uint32
	addr [16]byte
}

// shorten returns key's short form, if it has one: an egress key with nothing after the address.
func shorten(key *bpfTetherRuleKey) (shortKey, bool) {
	if key.Kind != uint8(bpfTetherRuleKindTETHER_RULE_EGRESS) {
		return shortKey{}, false
	}
	if [len(key.Data) - 16]byte(key.Data[16:]) != [len(key.Data) - 16]byte{} {
		return shortKey{}, false
	}
	return shortKey{bits: key.Prefixlen, addr: [16]byte(key.Data[:16])}, true
}

func newImage(n int) *trieImage {
	return &trieImage{
		keys:  make([]bpfTetherRuleKey, 0, n),
		vals:  make([]bpfTetherRuleValue, 0, n),
		short: make(map[shortKey]int32, n),
	}
}

func (m *trieImage) len() int { return len(m.keys) }

// find returns the position of key.
func (m *trieImage) find(key *bpfTetherRuleKey) (int32, bool) {
	if sk, ok := shorten(key); ok {
		i, ok := m.short[sk]
		return i, ok
	}
	i, ok := m.long[*key]
	return i, ok
}

func (m *trieImage) setIndex(key *bpfTetherRuleKey, i int32) {
	if sk, ok := shorten(key); ok {
		m.short[sk] = i
		return
	}
	if m.long == nil {
		m.long = map[bpfTetherRuleKey]int32{}
	}
	m.long[*key] = i
}

func (m *trieImage) unindex(key *bpfTetherRuleKey) {
	if sk, ok := shorten(key); ok {
		delete(m.short, sk)
		return
	}
	delete(m.long, *key)
}

// indexed counts the index's entries (equal to len, unless the image is broken).
func (m *trieImage) indexed() int { return len(m.short) + len(m.long) }

func (m *trieImage) get(key bpfTetherRuleKey) (bpfTetherRuleValue, bool) {
	i, ok := m.find(&key)
	if !ok {
		return bpfTetherRuleValue{}, false
	}
	return m.vals[i], true
}

// add appends key with v unless key is there already; it reports whether key was new.
func (m *trieImage) add(key bpfTetherRuleKey, v bpfTetherRuleValue) bool {
	if _, dup := m.find(&key); dup {
		return false
	}
	m.setIndex(&key, int32(len(m.keys)))
	m.keys, m.vals = append(m.keys, key), append(m.vals, v)
	return true
}

// put sets key to v.
func (m *trieImage) put(key bpfTetherRuleKey, v bpfTetherRuleValue) {
	if i, ok := m.find(&key); ok {
		m.vals[i] = v
		return
	}
	m.setIndex(&key, int32(len(m.keys)))
	m.keys, m.vals = append(m.keys, key), append(m.vals, v)
}

// del removes key (the last entry takes its place).
func (m *trieImage) del(key bpfTetherRuleKey) {
	i, ok := m.find(&key)
	if !ok {
		return
	}
	last := len(m.keys) - 1
	if int(i) != last {
		m.keys[i], m.vals[i] = m.keys[last], m.vals[last]
		m.setIndex(&m.keys[i], i)
	}
	m.keys, m.vals = m.keys[:last], m.vals[:last]
	m.unindex(&key)
}

// clone returns an image with m's entries, in m's order.
func (m *trieImage) clone() *trieImage {
	return &trieImage{keys: slices.Clone(m.keys), vals: slices.Clone(m.vals), short: maps.Clone(m.short), long: maps.Clone(m.long)}
}

// equal reports whether m and o hold the same entries.
func (m *trieImage) equal(o *trieImage) bool {
	if m.len() != o.len() {
		return false
	}
	for i, key := range m.keys {
		if v, ok := o.get(key); !ok || v != m.vals[i] {
			return false
		}
	}
	return true
}

// changes are what turns have into want, as positions: in have.keys of the entries to delete, in
// want.keys of those to write.
type changes struct{ dels, writes []int32 }

// diff works out the changes from have to want.
func diff(have, want *trieImage) changes {
	var c changes
	for i := range have.keys {
		if _, keep := want.find(&have.keys[i]); !keep {
			c.dels = append(c.dels, int32(i))
		}
	}
	for i := range want.keys {
		if j, ok := have.find(&want.keys[i]); !ok || have.vals[j] != want.vals[i] {
			c.writes = append(c.writes, int32(i))
		}
	}
	return c
}

func readTrie(m *ebpf.Map) (*trieImage, error) {
	out := newImage(0)
	var key bpfTetherRuleKey
	var v bpfTetherRuleValue
	it := m.Iterate()
	for it.Next(&key, &v) {
		out.put(key, v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading rule buffer: %w", err)
	}
	return out, nil
}

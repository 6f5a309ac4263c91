package kernel

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// trieImage is the content of a rule trie as tetherd knows it: entries in two slices, and an index
// by key. (A map from key to value would store each 400-byte value in an allocation of its own.)
type trieImage struct {
	keys  []bpfTetherRuleKey
	vals  []bpfTetherRuleValue
	index map[bpfTetherRuleKey]int32
}

func newImage(n int) *trieImage {
	return &trieImage{
		keys:  make([]bpfTetherRuleKey, 0, n),
		vals:  make([]bpfTetherRuleValue, 0, n),
		index: make(map[bpfTetherRuleKey]int32, n),
	}
}

func (m *trieImage) len() int { return len(m.keys) }

func (m *trieImage) get(key bpfTetherRuleKey) (bpfTetherRuleValue, bool) {
	i, ok := m.index[key]
	if !ok {
		return bpfTetherRuleValue{}, false
	}
	return m.vals[i], true
}

// add appends key with v unless key is there already; it reports whether key was new.
func (m *trieImage) add(key bpfTetherRuleKey, v bpfTetherRuleValue) bool {
	if _, dup := m.index[key]; dup {
		return false
	}
	m.index[key] = int32(len(m.keys))
	m.keys, m.vals = append(m.keys, key), append(m.vals, v)
	return true
}

// put sets key to v.
func (m *trieImage) put(key bpfTetherRuleKey, v bpfTetherRuleValue) {
	if i, ok := m.index[key]; ok {
		m.vals[i] = v
		return
	}
	m.index[key] = int32(len(m.keys))
	m.keys, m.vals = append(m.keys, key), append(m.vals, v)
}

// del removes key (the last entry takes its place).
func (m *trieImage) del(key bpfTetherRuleKey) {
	i, ok := m.index[key]
	if !ok {
		return
	}
	last := len(m.keys) - 1
	if int(i) != last {
		m.keys[i], m.vals[i] = m.keys[last], m.vals[last]
		m.index[m.keys[i]] = i
	}
	m.keys, m.vals = m.keys[:last], m.vals[:last]
	delete(m.index, key)
}

func (m *trieImage) clone() *trieImage {
	c := newImage(m.len())
	for i, key := range m.keys {
		c.put(key, m.vals[i])
	}
	return c
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

// plan is what turns have into want: the keys to delete, and the entries to write.
func plan(have, want *trieImage) ([]bpfTetherRuleKey, []bpfTetherRuleKey, []bpfTetherRuleValue) {
	var dels []bpfTetherRuleKey
	for _, key := range have.keys {
		if _, keep := want.index[key]; !keep {
			dels = append(dels, key)
		}
	}
	var keys []bpfTetherRuleKey
	var vals []bpfTetherRuleValue
	for i, key := range want.keys {
		if j, ok := have.index[key]; ok && have.vals[j] == want.vals[i] {
			continue
		}
		keys, vals = append(keys, key), append(vals, want.vals[i])
	}
	return dels, keys, vals
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

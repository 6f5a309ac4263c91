package kernel

import (
	"testing"
)

// TestTrieImage: put, add, del and clone keep the index true to the slices.
func TestTrieImage(t *testing.T) {
	key := func(b byte) bpfTetherRuleKey { return bpfTetherRuleKey{Prefixlen: 8, Kind: b} }
	val := func(g uint64) bpfTetherRuleValue { return bpfTetherRuleValue{Generation: g} }
	m := newImage(0)
	for i := range byte(5) {
		if !m.add(key(i), val(uint64(i))) {
			t.Fatalf("add %d: a duplicate?", i)
		}
	}
	if m.add(key(2), val(99)) {
		t.Fatal("a duplicate was added")
	}
	m.put(key(3), val(33))
	m.del(key(1))
	m.del(key(7))
	c := m.clone()
	m.del(key(0))
	check := func(m *trieImage, want map[byte]uint64) {
		t.Helper()
		if m.len() != len(want) || len(m.index) != len(want) {
			t.Fatalf("%d entries, %d indexed, want %d", m.len(), len(m.index), len(want))
		}
		for k, g := range want {
			if v, ok := m.get(key(k)); !ok || v.Generation != g {
				t.Errorf("key %d: %v %v, want %d", k, v.Generation, ok, g)
			}
		}
	}
	check(m, map[byte]uint64{2: 2, 3: 33, 4: 4})
	check(c, map[byte]uint64{0: 0, 2: 2, 3: 33, 4: 4})
	dels, keys, vals := plan(c, m)
	if len(dels) != 1 || dels[0] != key(0) || len(keys) != 0 || len(vals) != 0 || m.equal(c) || !m.equal(m.clone()) {
		t.Errorf("plan: %v %v", dels, keys)
	}
}

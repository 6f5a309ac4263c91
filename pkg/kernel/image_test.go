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
		if m.len() != len(want) || m.indexed() != len(want) {
			t.Fatalf("%d entries, %d indexed, want %d", m.len(), m.indexed(), len(want))
		}
		for k, g := range want {
			if v, ok := m.get(key(k)); !ok || v.Generation != g {
				t.Errorf("key %d: %v %v, want %d", k, v.Generation, ok, g)
			}
		}
	}
	check(m, map[byte]uint64{2: 2, 3: 33, 4: 4})
	check(c, map[byte]uint64{0: 0, 2: 2, 3: 33, 4: 4})
	d := diff(c, m)
	if len(d.dels) != 1 || c.keys[d.dels[0]] != key(0) || len(d.writes) != 0 || m.equal(c) || !m.equal(m.clone()) {
		t.Errorf("diff: %v", d)
	}
}

// TestImageIndexForms: egress keys go by their short form, other keys (and an egress key with
// bytes after the address, which no encoder makes) by the whole key; keys that differ only in
// prefix length, kind or tail stay apart.
func TestImageIndexForms(t *testing.T) {
	host, net := egressKey(prefix("10.0.0.1/32")), egressKey(prefix("10.0.0.0/24"))
	odd := host
	odd.Data[40] = 1
	other := host
	other.Kind = uint8(bpfTetherRuleKindTETHER_RULE_UNIX)
	keys := []bpfTetherRuleKey{host, net, odd, other, headerKey()}
	m := newImage(0)
	for i, k := range keys {
		if !m.add(k, bpfTetherRuleValue{Generation: uint64(i)}) {
			t.Fatalf("key %d taken for a duplicate", i)
		}
	}
	if len(m.short) != 2 || len(m.long) != 3 {
		t.Errorf("%d short and %d long index entries, want 2 and 3", len(m.short), len(m.long))
	}
	for i, k := range keys {
		if v, ok := m.get(k); !ok || v.Generation != uint64(i) {
			t.Errorf("key %d: %v %v", i, v.Generation, ok)
		}
	}
	m.del(host)
	if _, ok := m.get(odd); !ok || m.indexed() != 4 {
		t.Errorf("deleting the host key took the odd one too (%d indexed)", m.indexed())
	}
}

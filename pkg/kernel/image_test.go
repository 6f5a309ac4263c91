package kernel

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestTrieImage: seal orders the entries, keeps the last of equal keys and names them; every key
// form comes back whole.
func TestTrieImage(t *testing.T) {
	long, err := unixKey(dataplane.Unix{Path: "/run/a/very/long/socket/path/that/goes/past/sixteen/bytes.sock"})
	if err != nil {
		t.Fatal(err)
	}
	longer := long
	longer.Data[60] = 'x'
	keys := []bpfTetherRuleKey{
		egressKey(prefix("10.0.0.2/32")), egressKey(prefix("10.0.0.1/32")), egressKey(prefix("10.0.0.0/24")),
		egressKey(prefix("2001:db8::/32")), headerKey(), longer, long, egressKey(prefix("10.0.0.1/32")),
	}
	m := newImage(0)
	for i, key := range keys {
		m.append(&key, &bpfTetherRuleValue{Generation: uint64(i)})
	}
	dups := m.seal()
	if len(dups) != 1 || dups[0] != keys[1] {
		t.Errorf("seal found %v as duplicates, want the key appended twice", dups)
	}
	if m.len() != len(keys)-1 {
		t.Fatalf("%d entries, want %d", m.len(), len(keys)-1)
	}
	for i, key := range keys {
		want := uint64(i)
		if i == 1 {
			want = 7 // the last appended
		}
		j, ok := m.find(&key)
		if !ok || m.val(j).Generation != want || m.key(j) != key {
			t.Errorf("key %d (%s): found %v at %d, generation %d, want %d", i, describeKey(key), ok, j, m.val(j).Generation, want)
		}
	}
	for j := range int32(m.len() - 1) {
		if compareEntries(m, &m.ents[j], m, &m.ents[j+1]) >= 0 {
			t.Errorf("entries %d and %d out of order", j, j+1)
		}
	}
	if m.ents[0].kind != uint8(bpfTetherRuleKindTETHER_RULE_HEADER) {
		t.Errorf("the header is not first")
	}
	missing := egressKey(prefix("10.0.0.3/32"))
	if _, ok := m.find(&missing); ok {
		t.Error("found a key never appended")
	}
}

// TestImageKeyForms: keys that differ only in prefix length, kind or the data past the first 16
// bytes are different entries.
func TestImageKeyForms(t *testing.T) {
	host, net := egressKey(prefix("10.0.0.1/32")), egressKey(prefix("10.0.0.0/24"))
	odd := host
	odd.Data[40] = 1
	other := host
	other.Kind = uint8(bpfTetherRuleKindTETHER_RULE_UNIX)
	keys := []bpfTetherRuleKey{host, net, odd, other, headerKey()}
	m := newImage(0)
	for i, k := range keys {
		m.append(&k, &bpfTetherRuleValue{Generation: uint64(i)})
	}
	if dups := m.seal(); len(dups) != 0 || m.len() != len(keys) || len(m.long) != 1 {
		t.Fatalf("duplicates %v, %d entries (%d long), want %d (1)", dups, m.len(), len(m.long), len(keys))
	}
	for i, k := range keys {
		if v, ok := m.get(k); !ok || v.Generation != uint64(i) {
			t.Errorf("key %d: %v %v", i, v.Generation, ok)
		}
	}
	if !m.hashable(must(m.find(&host)), 0) || m.hashable(must(m.find(&odd)), 0) || m.hashable(must(m.find(&net)), 0) ||
		!m.hashable(must(m.find(&net)), uint8(net.Prefixlen)) || m.hashable(must(m.find(&odd)), uint8(odd.Prefixlen)) {
		t.Error("hashable takes the wrong keys")
	}
}

func must(j int32, ok bool) int32 {
	if !ok {
		panic("not found")
	}
	return j
}

// TestDiffAgainstModel: for random pairs of images, diff's changes turn have into want and write
// nothing that is there already, and applied after any part of them equals that part carried out
// on a plain map.
func TestDiffAgainstModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	universe := make([]bpfTetherRuleKey, 0, 64)
	for i := range 40 {
		universe = append(universe, egressKey(prefix(fmt.Sprintf([]string{"10.0.0.%d/32", "10.0.%d.0/24", "fd00::%d/128"}[i%3], i))))
	}
	for i := range 12 {
		key, err := unixKey(dataplane.Unix{Path: fmt.Sprintf("/run/long/socket/path/past/sixteen/%d.sock", i)})
		if err != nil {
			t.Fatal(err)
		}
		universe = append(universe, key)
	}
	universe = append(universe, headerKey(), execKey(dataplane.FileID{Dev: 3, Ino: 7}))
	values := []bpfTetherRuleValue{{}, {Count: 1}, {Generation: 5}, {Mode: 1}}
	values[1].Ports[0].PortLo = 443
	random := func() (*trieImage, map[bpfTetherRuleKey]bpfTetherRuleValue) {
		m, model := newImage(0), map[bpfTetherRuleKey]bpfTetherRuleValue{}
		for _, j := range rng.Perm(len(universe))[:rng.IntN(len(universe))] {
			v := values[rng.IntN(len(values))]
			m.append(&universe[j], &v)
			model[universe[j]] = v
		}
		m.seal()
		return m, model
	}
	same := func(m *trieImage, model map[bpfTetherRuleKey]bpfTetherRuleValue) bool {
		if m.len() != len(model) {
			return false
		}
		for j := range int32(m.len()) {
			if v, ok := model[m.key(j)]; !ok || v != *m.val(j) {
				return false
			}
		}
		return true
	}
	for round := range 500 {
		have, hm := random()
		want, wm := random()
		c := diff(have, want)
		for _, j := range c.writes {
			if v, ok := hm[want.key(j)]; ok && v == *want.val(j) {
				t.Fatalf("round %d: diff writes %s, which is there already", round, describeKey(want.key(j)))
			}
		}
		nd, nw := rng.IntN(len(c.dels)+1), rng.IntN(len(c.writes)+1)
		part := map[bpfTetherRuleKey]bpfTetherRuleValue{}
		for k, v := range hm {
			part[k] = v
		}
		for _, j := range c.dels[:nd] {
			delete(part, have.key(j))
		}
		for _, j := range c.writes[:nw] {
			part[want.key(j)] = *want.val(j)
		}
		if got := applied(have, want, changes{c.dels[:nd], c.writes[:nw]}); !same(got, part) {
			t.Fatalf("round %d: applied after %d deletes and %d writes differs from the model", round, nd, nw)
		}
		if got := applied(have, want, c); !same(got, wm) || !got.equal(want) || want.equal(have) != (len(c.dels)+len(c.writes) == 0) {
			t.Fatalf("round %d: all changes do not turn have into want", round)
		}
	}
}

// TestValueLayout: a rule value has no padding, so sameValue's byte comparison is ==.
func TestValueLayout(t *testing.T) {
	if n := binary.Size(bpfTetherRuleValue{}); n != int(unsafe.Sizeof(bpfTetherRuleValue{})) {
		t.Fatalf("bpfTetherRuleValue: %d bytes of fields in %d", n, unsafe.Sizeof(bpfTetherRuleValue{}))
	}
	a, b := bpfTetherRuleValue{Count: 1}, bpfTetherRuleValue{Count: 1}
	b.Ports[15].BinIno = 1
	if sameValue(&a, &b) || !sameValue(&a, &a) {
		t.Error("sameValue does not see the last port rule")
	}
}

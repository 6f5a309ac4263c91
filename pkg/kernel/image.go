package kernel

import (
	"bytes"
	"cmp"
	"fmt"
	"slices"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
)

// trieImage is the content of a rule buffer as tetherd knows it: its entries sorted by key, each
// with the position of its value in vals. It is built once (append, then seal) and not changed
// after. The form is chosen for the cost of an install: a rule set of 1,000 rules is 32 KiB of
// entries and a few distinct values (most rules share their ports), where whole keys and values
// would be 500 KiB of fresh memory per install, and two images compare in one pass over both.
type trieImage struct {
	ents []imageEntry
	// long holds the whole key of entries with data past the first 16 bytes (long unix socket
	// paths).
	long []bpfTetherRuleKey
	vals []bpfTetherRuleValue
	// last is the position in vals of the value appended last: consecutive rules share theirs.
	last int32
}

// imageEntry is one entry: its key's kind, prefix length and first 16 bytes of data (an address,
// a file's device and inode, the start of a socket path), and where the rest is.
type imageEntry struct {
	data [16]byte
	bits uint32
	kind uint8
	long int32 // position in trieImage.long plus one; 0: the key has nothing past data
	val  int32
}

func newImage(n int) *trieImage {
	return &trieImage{ents: make([]imageEntry, 0, n), last: -1}
}

func (m *trieImage) len() int { return len(m.ents) }

// key returns the whole key of entry j.
func (m *trieImage) key(j int32) bpfTetherRuleKey {
	e := &m.ents[j]
	if e.long != 0 {
		return m.long[e.long-1]
	}
	key := bpfTetherRuleKey{Prefixlen: e.bits, Kind: e.kind}
	copy(key.Data[:16], e.data[:])
	return key
}

// val returns the value of entry j.
func (m *trieImage) val(j int32) *bpfTetherRuleValue { return &m.vals[m.ents[j].val] }

// hashable reports whether entry j goes into tether_hosts in a buffer of bulk length bulk (see
// hashable).
func (m *trieImage) hashable(j int32, bulk uint8) bool {
	e := &m.ents[j]
	return e.long == 0 && e.hashable(bulk)
}

// hashable reports whether e, an entry without a tail, goes into tether_hosts in a buffer of bulk
// length bulk: a host rule, or an egress rule of the bulk length.
func (e *imageEntry) hashable(bulk uint8) bool {
	return e.kind == uint8(bpfTetherRuleKindTETHER_RULE_EGRESS) && (e.bits == 8+128 || bulk != 0 && e.bits == uint32(bulk))
}

// entryOf is key's entry; tail says whether it has data past the first 16 bytes.
func entryOf(key *bpfTetherRuleKey) (e imageEntry, tail bool) {
	e = imageEntry{data: [16]byte(key.Data[:16]), bits: key.Prefixlen, kind: key.Kind}
	return e, [len(key.Data) - 16]byte(key.Data[16:]) != [len(key.Data) - 16]byte{}
}

// tail is the data of entry e of m past the first 16 bytes.
func (m *trieImage) tail(e *imageEntry) []byte {
	if e.long == 0 {
		return nil // all zero
	}
	return m.long[e.long-1].Data[16:]
}

// compareEntries orders entry a of image ma and entry b of image mb: by kind, data, prefix length
// and the rest of the data, so that egress keys go in the order of their addresses, as the
// compiler writes them.
func compareEntries(ma *trieImage, a *imageEntry, mb *trieImage, b *imageEntry) int {
	if c := compareHeads(a, b); c != 0 || a.long == 0 && b.long == 0 {
		return c
	}
	return compareTails(ma.tail(a), mb.tail(b))
}

func compareHeads(a, b *imageEntry) int {
	return cmp.Or(cmp.Compare(a.kind, b.kind), bytes.Compare(a.data[:], b.data[:]), cmp.Compare(a.bits, b.bits))
}

// compareTails compares the data of two keys past the first 16 bytes; nil is all zero.
func compareTails(a, b []byte) int {
	switch {
	case a == nil && b == nil:
		return 0
	case a == nil:
		return -1 // a tail that is there is not all zero
	case b == nil:
		return 1
	}
	return bytes.Compare(a, b)
}

// append adds key with v; seal puts the entries in order.
func (m *trieImage) append(key *bpfTetherRuleKey, v *bpfTetherRuleValue) {
	e, tail := entryOf(key)
	if tail {
		m.long = append(m.long, *key)
		e.long = int32(len(m.long))
	}
	if m.last < 0 || !sameValue(&m.vals[m.last], v) {
		m.vals = append(m.vals, *v)
		m.last = int32(len(m.vals) - 1)
	}
	e.val = m.last
	m.ents = append(m.ents, e)
}

// seal sorts the entries appended. Of entries with equal keys the one appended last stays; seal
// returns the keys it found more than once.
func (m *trieImage) seal() (dups []bpfTetherRuleKey) {
	less := func(a, b imageEntry) int { return compareEntries(m, &a, m, &b) }
	if !slices.IsSortedFunc(m.ents, less) {
		slices.SortStableFunc(m.ents, less)
	}
	out := m.ents[:0]
	for j := range m.ents {
		if n := len(out); n > 0 && less(out[n-1], m.ents[j]) == 0 {
			if len(dups) == 0 || dups[len(dups)-1] != m.key(int32(j)) {
				dups = append(dups, m.key(int32(j)))
			}
			out[n-1] = m.ents[j]
			continue
		}
		out = append(out, m.ents[j])
	}
	m.ents = out
	return dups
}

// find returns the position of key.
func (m *trieImage) find(key *bpfTetherRuleKey) (int32, bool) {
	e, tail := entryOf(key)
	var t []byte
	if tail {
		t = key.Data[16:]
	}
	j, ok := slices.BinarySearchFunc(m.ents, e, func(a, b imageEntry) int {
		if c := compareHeads(&a, &b); c != 0 {
			return c
		}
		return compareTails(m.tail(&a), t)
	})
	return int32(j), ok
}

func (m *trieImage) get(key bpfTetherRuleKey) (bpfTetherRuleValue, bool) {
	j, ok := m.find(&key)
	if !ok {
		return bpfTetherRuleValue{}, false
	}
	return *m.val(j), true
}

// sameValue compares two values byte for byte (the struct has no padding, which
// TestValueLayout checks): the generated == goes field by field through all 16 port rules.
func sameValue(a, b *bpfTetherRuleValue) bool {
	type raw = [unsafe.Sizeof(bpfTetherRuleValue{})]byte
	return *(*raw)(unsafe.Pointer(a)) == *(*raw)(unsafe.Pointer(b))
}

// valueCompare compares values of two images, remembering the last pair: the entries of a rule
// set share a few values.
type valueCompare struct {
	have, want *trieImage
	hv, wv     int32
	same       bool
}

func (vc *valueCompare) equal(h, w int32) bool {
	hv, wv := vc.have.ents[h].val, vc.want.ents[w].val
	if hv != vc.hv || wv != vc.wv {
		vc.hv, vc.wv, vc.same = hv, wv, sameValue(&vc.have.vals[hv], &vc.want.vals[wv])
	}
	return vc.same
}

// equal reports whether m and o hold the same entries.
func (m *trieImage) equal(o *trieImage) bool {
	if m.len() != o.len() {
		return false
	}
	vc := valueCompare{have: m, want: o, hv: -1}
	for j := range m.ents {
		if compareEntries(m, &m.ents[j], o, &o.ents[j]) != 0 || !vc.equal(int32(j), int32(j)) {
			return false
		}
	}
	return true
}

// changes are what turns have into want, as positions: in have of the entries to delete, in want
// of those to write; both ascending.
type changes struct{ dels, writes []int32 }

// walk calls f for the entries of have and want in key order, in one pass over both: with the
// position in each, or -1 where one image lacks the key.
func walk(have, want *trieImage, f func(h, w int32)) {
	h, w := int32(0), int32(0)
	for int(h) < have.len() || int(w) < want.len() {
		order := 0
		switch {
		case int(h) == have.len():
			order = 1
		case int(w) == want.len():
			order = -1
		default:
			order = compareEntries(have, &have.ents[h], want, &want.ents[w])
		}
		switch {
		case order < 0:
			f(h, -1)
			h++
		case order > 0:
			f(-1, w)
			w++
		default:
			f(h, w)
			h, w = h+1, w+1
		}
	}
}

// diff works out the changes from have to want.
func diff(have, want *trieImage) changes {
	var c changes
	vc := valueCompare{have: have, want: want, hv: -1}
	walk(have, want, func(h, w int32) {
		switch {
		case w < 0:
			c.dels = append(c.dels, h)
		case h < 0 || !vc.equal(h, w):
			c.writes = append(c.writes, w)
		}
	})
	return c
}

// applied is what a buffer that held have holds once the part done of the changes from have to
// want is written: have without the entries dels, with want's entries writes.
func applied(have, want *trieImage, done changes) *trieImage {
	out := newImage(have.len() + len(done.writes) - len(done.dels))
	gone := make([]bool, have.len())
	for _, j := range done.dels {
		gone[j] = true
	}
	written := make([]bool, want.len())
	for _, j := range done.writes {
		written[j] = true
	}
	walk(have, want, func(h, w int32) {
		switch {
		case w >= 0 && written[w]:
			key := want.key(w)
			out.append(&key, want.val(w))
		case h >= 0 && !gone[h]:
			key := have.key(h)
			out.append(&key, have.val(h))
		}
	})
	out.seal() // in order already
	return out
}

// readTrie appends the entries of the rule trie m to img (which the caller seals).
func readTrie(m *ebpf.Map, img *trieImage) error {
	var key bpfTetherRuleKey
	var v bpfTetherRuleValue
	it := m.Iterate()
	for it.Next(&key, &v) {
		img.append(&key, &v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading rule buffer: %w", err)
	}
	return nil
}

// generation is the rule-set generation of the image's header (0 without one).
func (m *trieImage) generation() uint64 {
	if len(m.ents) == 0 || m.ents[0].kind != uint8(bpfTetherRuleKindTETHER_RULE_HEADER) {
		return 0
	}
	return m.val(0).Generation
}

// maxDuration is the shortest max_duration of the image's egress rules (0: none has one).
func (m *trieImage) maxDuration() time.Duration {
	var least uint32
	for i := range m.vals {
		v := &m.vals[i]
		for _, p := range v.Ports[:min(int(v.Count), len(v.Ports))] {
			if p.MaxMs != 0 && (least == 0 || p.MaxMs < least) {
				least = p.MaxMs
			}
		}
	}
	return time.Duration(least) * time.Millisecond
}

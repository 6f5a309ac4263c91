package bpfemu

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cilium/ebpf/asm"
)

// Array is an array map (per-CPU arrays too: the emulator runs on one CPU).
type Array struct {
	Name   string
	Values []*Region
	value  int
}

// NewArray is an array of n zeroed values of valueSize bytes.
func NewArray(name string, n, valueSize int) *Array {
	a := &Array{Name: name, value: valueSize}
	for i := range n {
		a.Values = append(a.Values, NewRegion(fmt.Sprintf("%s[%d]", name, i), valueSize))
	}
	return a
}

func (a *Array) KeySize() int   { return 4 }
func (a *Array) ValueSize() int { return a.value }

func (a *Array) Lookup(key []byte) (*Region, error) {
	i := binary.LittleEndian.Uint32(key)
	if int(i) >= len(a.Values) {
		return nil, nil
	}
	return a.Values[i], nil
}

func (a *Array) Update(key, value []byte, _ uint64) error {
	v, _ := a.Lookup(key)
	if v == nil {
		return errors.New("array index out of range")
	}
	copy(v.Mem, value)
	v.ptrs = nil
	return nil
}

func (a *Array) Delete([]byte) error { return errors.New("array elements cannot be deleted") }

// Hash is a hash map (LRU hashes too: nothing is evicted here).
type Hash struct {
	Name       string
	key, value int
	Entries    map[string]*Region
	MaxEntries int
}

// NewHash is an empty hash map.
func NewHash(name string, keySize, valueSize, maxEntries int) *Hash {
	return &Hash{Name: name, key: keySize, value: valueSize, Entries: map[string]*Region{}, MaxEntries: maxEntries}
}

func (h *Hash) KeySize() int   { return h.key }
func (h *Hash) ValueSize() int { return h.value }

func (h *Hash) Lookup(key []byte) (*Region, error) { return h.Entries[string(key)], nil }

func (h *Hash) Update(key, value []byte, _ uint64) error {
	if _, ok := h.Entries[string(key)]; !ok && h.MaxEntries > 0 && len(h.Entries) >= h.MaxEntries {
		return errors.New("hash map full")
	}
	r := NewRegion(h.Name+" value", h.value)
	copy(r.Mem, value)
	h.Entries[string(key)] = r
	return nil
}

func (h *Hash) Delete(key []byte) error {
	if _, ok := h.Entries[string(key)]; !ok {
		return errors.New("no such key")
	}
	delete(h.Entries, string(key))
	return nil
}

// Trie is an LPM trie: keys are a little-endian u32 prefix length and the data it covers.
type Trie struct {
	Name       string
	key, value int
	entries    []trieEntry
}

type trieEntry struct {
	prefix uint32
	data   []byte
	value  *Region
}

// NewTrie is an empty LPM trie.
func NewTrie(name string, keySize, valueSize int) *Trie {
	return &Trie{Name: name, key: keySize, value: valueSize}
}

func (t *Trie) KeySize() int   { return t.key }
func (t *Trie) ValueSize() int { return t.value }

func prefixMatch(a, b []byte, n uint32) bool {
	for i := uint32(0); i < n; i++ {
		bit := byte(0x80 >> (i % 8))
		if a[i/8]&bit != b[i/8]&bit {
			return false
		}
	}
	return true
}

func (t *Trie) Lookup(key []byte) (*Region, error) {
	n := binary.LittleEndian.Uint32(key)
	data := key[4:]
	var best *trieEntry
	for i := range t.entries {
		e := &t.entries[i]
		if e.prefix <= n && prefixMatch(e.data, data, e.prefix) && (best == nil || e.prefix > best.prefix) {
			best = e
		}
	}
	if best == nil {
		return nil, nil
	}
	return best.value, nil
}

func (t *Trie) Update(key, value []byte, _ uint64) error {
	n := binary.LittleEndian.Uint32(key)
	if int(n) > 8*(len(key)-4) {
		return fmt.Errorf("prefix length %d longer than the key", n)
	}
	r := NewRegion(t.Name+" value", t.value)
	copy(r.Mem, value)
	for i := range t.entries {
		e := &t.entries[i]
		if e.prefix == n && prefixMatch(e.data, key[4:], n) {
			e.value = r
			return nil
		}
	}
	t.entries = append(t.entries, trieEntry{prefix: n, data: append([]byte(nil), key[4:]...), value: r})
	return nil
}

func (t *Trie) Delete(key []byte) error {
	n := binary.LittleEndian.Uint32(key)
	for i, e := range t.entries {
		if e.prefix == n && prefixMatch(e.data, key[4:], n) {
			t.entries = append(t.entries[:i], t.entries[i+1:]...)
			return nil
		}
	}
	return errors.New("no such key")
}

// Len is the number of entries.
func (t *Trie) Len() int { return len(t.entries) }

// MapOfMaps is an array or hash of maps: a lookup yields the inner map.
type MapOfMaps struct {
	Name  string
	key   int
	Inner map[string]Map
}

// NewMapOfMaps is an empty map of maps with keys of keySize bytes.
func NewMapOfMaps(name string, keySize int) *MapOfMaps {
	return &MapOfMaps{Name: name, key: keySize, Inner: map[string]Map{}}
}

func (m *MapOfMaps) KeySize() int   { return m.key }
func (m *MapOfMaps) ValueSize() int { return 4 }

func (m *MapOfMaps) Lookup(key []byte) (*Region, error) {
	in := m.Inner[string(key)]
	if in == nil {
		return nil, nil
	}
	return &Region{Name: m.Name + " inner", Map: in}, nil
}

func (m *MapOfMaps) Update([]byte, []byte, uint64) error {
	return errors.New("a program cannot update a map of maps")
}
func (m *MapOfMaps) Delete([]byte) error { return errors.New("a program cannot update a map of maps") }

// RingBuf is a ring buffer: it keeps what was submitted.
type RingBuf struct {
	Submitted [][]byte
	Discarded int
	// Full makes every reservation fail.
	Full bool
}

func (b *RingBuf) KeySize() int                        { return 0 }
func (b *RingBuf) ValueSize() int                      { return 0 }
func (b *RingBuf) Lookup([]byte) (*Region, error)      { return nil, errors.New("lookup in a ring buffer") }
func (b *RingBuf) Update([]byte, []byte, uint64) error { return errors.New("update of a ring buffer") }
func (b *RingBuf) Delete([]byte) error                 { return errors.New("delete in a ring buffer") }

// SkStorage is socket-local storage, by the socket's region.
type SkStorage struct {
	Name    string
	value   int
	Storage map[*Region]*Region
}

// NewSkStorage is empty socket storage of valueSize bytes a socket.
func NewSkStorage(name string, valueSize int) *SkStorage {
	return &SkStorage{Name: name, value: valueSize, Storage: map[*Region]*Region{}}
}

func (s *SkStorage) KeySize() int   { return 4 }
func (s *SkStorage) ValueSize() int { return s.value }
func (s *SkStorage) Lookup([]byte) (*Region, error) {
	return nil, errors.New("socket storage takes a socket")
}
func (s *SkStorage) Update([]byte, []byte, uint64) error {
	return errors.New("socket storage takes a socket")
}
func (s *SkStorage) Delete([]byte) error { return errors.New("socket storage takes a socket") }

func mapArg(v Value) (Map, error) {
	if v.R == nil || v.R.Map == nil {
		return nil, fmt.Errorf("argument is not a map")
	}
	return v.R.Map, nil
}

// mapAndKey reads a helper's map (first argument) and key (second).
func mapAndKey(a [5]Value) (Map, []byte, error) {
	mp, err := mapArg(a[0])
	if err != nil {
		return nil, nil, err
	}
	key, err := a[1].Bytes(mp.KeySize())
	if err != nil {
		return nil, nil, fmt.Errorf("key: %w", err)
	}
	return mp, key, nil
}

// MapHelpers are the helpers on maps: lookup, update, delete, ring buffers, socket storage.
func MapHelpers() map[asm.BuiltinFunc]Helper {
	return map[asm.BuiltinFunc]Helper{
		asm.FnMapLookupElem:  mapLookup,
		asm.FnMapUpdateElem:  mapUpdate,
		asm.FnMapDeleteElem:  mapDelete,
		asm.FnRingbufReserve: ringbufReserve,
		asm.FnRingbufSubmit:  ringbufSubmit,
		asm.FnRingbufDiscard: ringbufDiscard,
		asm.FnSkStorageGet:   skStorageGet,
	}
}

// mapLookup looks an element up.
func mapLookup(m *Machine, a [5]Value) (Value, error) {
	mp, key, err := mapAndKey(a)
	if err != nil {
		return Value{}, err
	}
	v, err := mp.Lookup(key)
	if err != nil || v == nil {
		return Value{}, err
	}
	return Pointer(v, 0), nil
}

// mapUpdate writes an element (-1 when the map refuses).
func mapUpdate(m *Machine, a [5]Value) (Value, error) {
	mp, key, err := mapAndKey(a)
	if err != nil {
		return Value{}, err
	}
	val, err := a[2].Bytes(mp.ValueSize())
	if err != nil {
		return Value{}, err
	}
	if err := mp.Update(key, val, a[3].V); err != nil {
		return Scalar(^uint64(0)), nil
	}
	return Scalar(0), nil
}

// mapDelete deletes an element (-ENOENT when there is none).
func mapDelete(m *Machine, a [5]Value) (Value, error) {
	mp, key, err := mapAndKey(a)
	if err != nil {
		return Value{}, err
	}
	if mp.Delete(key) != nil {
		return Scalar(^uint64(1)), nil // -ENOENT
	}
	return Scalar(0), nil
}

// ringbufReserve reserves a record (none when the ring buffer is full).
func ringbufReserve(m *Machine, a [5]Value) (Value, error) {
	mp, err := mapArg(a[0])
	if err != nil {
		return Value{}, err
	}
	rb, ok := mp.(*RingBuf)
	if !ok {
		return Value{}, errors.New("reserve in a map that is no ring buffer")
	}
	if rb.Full {
		return Value{}, nil
	}
	return Pointer(NewRegion("ring buffer record", int(a[1].V)), 0), nil
}

// ringbufSubmit keeps a reserved record as submitted.
func ringbufSubmit(m *Machine, a [5]Value) (Value, error) {
	rb := m.ringOf(a[0])
	if rb == nil || a[0].R == nil {
		return Value{}, errors.New("submit of no reserved record")
	}
	rb.Submitted = append(rb.Submitted, append([]byte(nil), a[0].R.Mem...))
	return Value{}, nil
}

// ringbufDiscard counts a discarded record.
func ringbufDiscard(m *Machine, a [5]Value) (Value, error) {
	if rb := m.ringOf(a[0]); rb != nil {
		rb.Discarded++
	}
	return Value{}, nil
}

// skStorageGet is a socket's storage, created when asked.
func skStorageGet(m *Machine, a [5]Value) (Value, error) {
	mp, err := mapArg(a[0])
	if err != nil {
		return Value{}, err
	}
	st, ok := mp.(*SkStorage)
	if !ok {
		return Value{}, errors.New("socket storage get on another map")
	}
	if a[1].R == nil {
		return Value{}, nil
	}
	v := st.Storage[a[1].R]
	if v == nil && a[3].V&1 != 0 { // BPF_SK_STORAGE_GET_F_CREATE
		v = NewRegion(st.Name+" value", st.value)
		st.Storage[a[1].R] = v
	}
	if v == nil {
		return Value{}, nil
	}
	return Pointer(v, 0), nil
}

// ringOf is the machine's ring buffer (records carry no reference to theirs).
func (m *Machine) ringOf(Value) *RingBuf {
	for _, mp := range m.Maps {
		if rb, ok := mp.(*RingBuf); ok {
			return rb
		}
	}
	return nil
}

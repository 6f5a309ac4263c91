package kernel

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// stateMaps hold what must survive a restart; their layout decides whether pins can be adopted.
var stateMaps = []string{bpfMapTetherCgroups, bpfMapTetherAgents, bpfMapTetherRulesets, bpfMapTetherHosts,
	bpfMapTetherProcs, bpfMapTetherAgentCounters, bpfMapTetherAgentInfo, bpfMapTetherConfig, bpfMapTetherGrantUses, bpfMapTetherSocks, bpfMapTetherRoots}

const layoutPin = "tether_layout"

// layoutHash digests the shape of the state maps: types, sizes, flags and every field of their
// keys and values (the rule trie's too), so that pins made by a build with another layout are
// recognised even where sizes happen to agree.
func layoutHash(spec *ebpf.CollectionSpec) [32]byte {
	var b strings.Builder
	describe := func(m *ebpf.MapSpec) {
		fmt.Fprintf(&b, "%s type=%v key=%d value=%d max=%d flags=%d\n", m.Name, m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
		describeType(&b, m.Key, 0)
		describeType(&b, m.Value, 0)
	}
	for _, name := range stateMaps {
		describe(spec.Maps[name])
	}
	describe(spec.Maps[bpfMapTetherRulesets].InnerMap)
	return sha256.Sum256([]byte(b.String()))
}

func describeType(b *strings.Builder, t btf.Type, depth int) {
	if t == nil || depth > 8 {
		return
	}
	switch t := t.(type) {
	case *btf.Struct:
		fmt.Fprintf(b, "struct %s %d {", t.Name, t.Size)
		for _, m := range t.Members {
			fmt.Fprintf(b, "%s@%d:", m.Name, m.Offset)
			describeType(b, m.Type, depth+1)
			b.WriteString(";")
		}
		b.WriteString("}")
	case *btf.Union:
		fmt.Fprintf(b, "union %s %d {", t.Name, t.Size)
		for _, m := range t.Members {
			fmt.Fprintf(b, "%s@%d:", m.Name, m.Offset)
			describeType(b, m.Type, depth+1)
			b.WriteString(";")
		}
		b.WriteString("}")
	case *btf.Array:
		fmt.Fprintf(b, "[%d]", t.Nelems)
		describeType(b, t.Type, depth+1)
	case *btf.Typedef:
		describeType(b, t.Type, depth+1)
	case *btf.Int:
		fmt.Fprintf(b, "int%d", t.Size*8)
	default:
		fmt.Fprintf(b, "%T", t)
	}
}

// checkLayout compares the layout of pinned state with this build's, recording it on first use.
func (k *Kernel) checkLayout(spec *ebpf.CollectionSpec) error {
	want := layoutHash(spec)
	path := filepath.Join(k.pinDir, layoutPin)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		for _, name := range stateMaps {
			if _, err := os.Stat(filepath.Join(k.pinDir, name)); err == nil {
				return k.incompatible(fmt.Errorf("pinned state without a layout record (%s)", name))
			}
		}
		m, err = ebpf.NewMap(&ebpf.MapSpec{Name: layoutPin, Type: ebpf.Array, KeySize: 4, ValueSize: 32, MaxEntries: 1})
		if err != nil {
			return fmt.Errorf("creating layout record: %w", err)
		}
		defer m.Close()
		if err := m.Put(uint32(0), want); err != nil {
			return fmt.Errorf("writing layout record: %w", err)
		}
		return m.Pin(path)
	}
	if err != nil {
		return fmt.Errorf("opening layout record %s: %w", path, err)
	}
	defer m.Close()
	var got [32]byte
	if err := m.Lookup(uint32(0), &got); err != nil {
		return fmt.Errorf("reading layout record: %w", err)
	}
	if got != want {
		return k.incompatible(fmt.Errorf("layout %x, this build's is %x", got[:6], want[:6]))
	}
	return nil
}

func (k *Kernel) incompatible(why error) error {
	return fmt.Errorf("the state pinned in %s was made by an incompatible tether (%v): stop tetherd and run "+
		"`tetherd --remove-pins` to drop it (this removes enforcement until tetherd starts again)", k.pinDir, why)
}

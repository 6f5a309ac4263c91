package bpfemu

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/cilium/ebpf/asm"
)

// A program that looks a key up, branches on the result across a 64-bit immediate and calls a
// BPF function: the verdict and every count are checked.
func TestRunCounts(t *testing.T) {
	prog := asm.Instructions{
		asm.StoreImm(asm.R10, -4, 7, asm.Word).WithSymbol("main"), // key = 7
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, 0).WithReference("table"),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "missing"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
		asm.LoadImm(asm.R2, 1<<40, asm.DWord),
		asm.Add.Reg(asm.R1, asm.R2),
		asm.Call.Label("double"),
		asm.Return(),
		asm.Mov.Imm(asm.R0, -1).WithSymbol("missing"),
		asm.Return(),
		asm.Mov.Reg(asm.R0, asm.R1).WithSymbol("double"),
		asm.Add.Reg(asm.R0, asm.R1),
		asm.Return(),
	}
	// Resolve the label jumps into raw offsets, as the ELF holds them.
	if err := resolve(prog); err != nil {
		t.Fatal(err)
	}
	h := NewHash("table", 4, 8, 16)
	key := binary.LittleEndian.AppendUint32(nil, 7)
	if err := h.Update(key, binary.LittleEndian.AppendUint64(nil, 5), 0); err != nil {
		t.Fatal(err)
	}
	m := &Machine{Maps: map[string]Map{"table": h}, Helpers: MapHelpers()}
	got, err := m.Run(prog, Value{})
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(2 * (5 + 1<<40)); got != want {
		t.Fatalf("returned %d, want %d", got, want)
	}
	// 11 instructions of main up to its exit, 3 of double.
	if m.Counts.Insns != 14 || m.Counts.Lookups != 1 || m.Counts.Calls != 1 || m.Counts.HelperCalls() != 1 {
		t.Fatalf("counts %+v, want 14 instructions, 1 lookup, 1 call, 1 helper", m.Counts)
	}

	h.Delete(key)
	m.Counts = Counts{}
	if got, err := m.Run(prog, Value{}); err != nil || int64(got) != -1 || m.Counts.Insns != 8 {
		t.Fatalf("missing key: returned %d, %v after %d instructions, want -1 after 8", int64(got), err, m.Counts.Insns)
	}
}

// An access past a region's end is an error, not a read of zeroes.
func TestOutOfBounds(t *testing.T) {
	prog := asm.Instructions{
		asm.LoadMem(asm.R0, asm.R1, 12, asm.Word),
		asm.Return(),
	}
	m := &Machine{}
	_, err := m.Run(prog, Pointer(NewRegion("ctx", 8), 0))
	if err == nil || !strings.Contains(err.Error(), "offset 12 of ctx") {
		t.Fatalf("read past the context: %v, want an error naming it", err)
	}
}

func TestTrieLongestPrefix(t *testing.T) {
	tr := NewTrie("t", 8, 1)
	put := func(n uint32, a []byte, v byte) {
		if err := tr.Update(append(binary.LittleEndian.AppendUint32(nil, n), a...), []byte{v}, 0); err != nil {
			t.Fatal(err)
		}
	}
	put(8, []byte{10, 0, 0, 0}, 1)
	put(24, []byte{10, 1, 2, 0}, 2)
	look := func(a []byte) byte {
		v, _ := tr.Lookup(append(binary.LittleEndian.AppendUint32(nil, 32), a...))
		if v == nil {
			return 0
		}
		return v.Mem[0]
	}
	if look([]byte{10, 1, 2, 3}) != 2 || look([]byte{10, 9, 9, 9}) != 1 || look([]byte{11, 1, 2, 3}) != 0 {
		t.Fatal("longest prefix match is wrong")
	}
}

// resolve turns label references of jumps and calls into raw offsets.
func resolve(prog asm.Instructions) error {
	raw := map[string]int{}
	pos := 0
	for _, ins := range prog {
		if s := ins.Symbol(); s != "" {
			raw[s] = pos
		}
		pos += int(ins.Size() / asm.InstructionSize)
	}
	pos = 0
	for i := range prog {
		ins := &prog[i]
		next := pos + int(ins.Size()/asm.InstructionSize)
		if ref := ins.Reference(); ref != "" && ins.OpCode.Class().IsJump() && !ins.IsFunctionCall() {
			ins.Offset = int16(raw[ref] - next)
		}
		pos = next
	}
	return nil
}

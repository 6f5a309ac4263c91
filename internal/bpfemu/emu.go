// Package bpfemu runs a BPF program's instructions, as the ELF holds them, in userspace, and
// counts what one run executes: instructions, helper calls, map lookups. It exists to measure
// the paths of tether's programs by a number that does not move with the machine's noise (the
// kernel reports run time, not instructions, and this machine has no hardware counters).
//
// It is an interpreter for the subset of BPF that clang emits for tether's programs: ALU and
// ALU64, jumps, loads and stores, atomics, 64-bit immediates and map references, helper calls
// (each emulated by a Helper the caller provides), and calls between BPF functions. Memory is
// typed: a register holds a scalar or a pointer into a Region (a stack, the context, a map
// value), and an access outside its region is an error, not a silent read. It does not verify
// programs and it does not model the kernel's rewrites: a helper call counts as one instruction,
// and an array lookup the verifier would inline counts as a call here.
package bpfemu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"github.com/cilium/ebpf/asm"
)

// Value is a register or a stored word: a scalar V, or, with R set, a pointer V bytes into R.
type Value struct {
	V uint64
	R *Region
}

// Scalar is a Value that is no pointer.
func Scalar(v uint64) Value { return Value{V: v} }

// Pointer is a Value pointing off bytes into r.
func Pointer(r *Region, off int) Value { return Value{V: uint64(off), R: r} }

// IsNull says whether v is a scalar zero.
func (v Value) IsNull() bool { return v.R == nil && v.V == 0 }

// Region is memory a pointer can point into.
type Region struct {
	Name string
	Mem  []byte
	// Map is set for a region that stands for a map (what a map reference or a map-in-map
	// lookup yields).
	Map Map
	// ReadOnly refuses stores.
	ReadOnly bool
	ptrs     map[int]Value // pointers stored at these offsets (8 bytes each)
}

// NewRegion is a zeroed region of size bytes.
func NewRegion(name string, size int) *Region {
	return &Region{Name: name, Mem: make([]byte, size)}
}

// PutPointer stores pointer p at offset off of r (how a context's pointer fields are set up).
func (r *Region) PutPointer(off int, p Value) {
	if r.ptrs == nil {
		r.ptrs = map[int]Value{}
	}
	r.ptrs[off] = p
	binary.LittleEndian.PutUint64(r.Mem[off:], p.V)
}

func (r *Region) span(off uint64, n int) ([]byte, error) {
	if off > uint64(len(r.Mem)) || uint64(len(r.Mem))-off < uint64(n) {
		return nil, fmt.Errorf("access of %d bytes at offset %d of %s (%d bytes)", n, int64(off), r.Name, len(r.Mem))
	}
	return r.Mem[off : off+uint64(n)], nil
}

// Bytes reads n bytes at p.
func (p Value) Bytes(n int) ([]byte, error) {
	if p.R == nil {
		return nil, fmt.Errorf("read of %d bytes through the scalar %#x", n, p.V)
	}
	return p.R.span(p.V, n)
}

// Map is an emulated BPF map. Lookup returns the value's region (nil: no entry).
type Map interface {
	Lookup(key []byte) (*Region, error)
	Update(key, value []byte, flags uint64) error
	Delete(key []byte) error
	KeySize() int
	ValueSize() int
}

// Helper emulates one BPF helper: the five argument registers in, R0 out.
type Helper func(m *Machine, args [5]Value) (Value, error)

// Counts is what runs executed.
type Counts struct {
	Insns   int            // instructions, a helper call or a 64-bit immediate counting one
	Helpers map[string]int // helper calls, by name
	Lookups int            // map lookups (bpf_map_lookup_elem, bpf_sk_storage_get)
	Calls   int            // calls between BPF functions
	// Hits counts each instruction's executions, by index in the program (with Profile set).
	Hits map[int]int
}

// HelperCalls is the number of helper calls.
func (c Counts) HelperCalls() int {
	n := 0
	for _, v := range c.Helpers {
		n += v
	}
	return n
}

// Machine runs programs against the maps and helpers it is given.
type Machine struct {
	// Maps by the name the ELF references them by (.rodata included).
	Maps map[string]Map
	// Helpers by function; a call to one that is missing is an error.
	Helpers map[asm.BuiltinFunc]Helper
	// Kfuncs by name; a call to one that is missing is an error.
	Kfuncs map[string]Helper
	// ProbeMem makes a load through a scalar address read zero, as the kernel's PROBE_MEM loads
	// of BTF pointers do in tracing programs; without it such a load is an error.
	ProbeMem bool
	// Limit is the most instructions a run may execute (0: a million).
	Limit int
	// Profile fills Counts.Hits.
	Profile bool

	Counts     Counts
	mapRegions map[string]*Region
}

// Run executes prog from its first instruction with R1 = ctx and returns R0.
func (m *Machine) Run(prog asm.Instructions, ctx Value) (uint64, error) {
	if m.Counts.Helpers == nil {
		m.Counts.Helpers = map[string]int{}
	}
	p, err := index(prog)
	if err != nil {
		return 0, err
	}
	limit := m.Limit
	if limit == 0 {
		limit = 1_000_000
	}
	r := &run{m: m, p: p, limit: limit}
	return r.exec(ctx)
}

// program is prog with jumps resolved to instruction indices.
type program struct {
	ins     asm.Instructions
	rawPos  []int       // raw offset of each instruction
	byRaw   map[int]int // instruction index at a raw offset
	symbols map[string]int
}

func index(prog asm.Instructions) (*program, error) {
	p := &program{ins: prog, byRaw: map[int]int{}, symbols: map[string]int{}}
	raw := 0
	for i, ins := range prog {
		p.rawPos = append(p.rawPos, raw)
		p.byRaw[raw] = i
		if s := ins.Symbol(); s != "" {
			p.symbols[s] = i
		}
		raw += int(ins.Size() / asm.InstructionSize)
	}
	return p, nil
}

func (p *program) jump(i int, off int16) (int, error) {
	target := p.rawPos[i] + int(p.ins[i].Size()/asm.InstructionSize) + int(off)
	j, ok := p.byRaw[target]
	if !ok {
		return 0, fmt.Errorf("instruction %d jumps to raw offset %d, which starts no instruction", i, target)
	}
	return j, nil
}

type frame struct {
	ret   int      // instruction to return to
	saved [4]Value // R6-R9 of the caller
	fp    Value    // the caller's R10
}

type run struct {
	m      *Machine
	p      *program
	regs   [11]Value
	frames []frame
	limit  int
}

const stackSize = 512

func (r *run) exec(ctx Value) (uint64, error) {
	r.regs[asm.R1] = ctx
	r.regs[asm.R10] = Pointer(NewRegion("stack", stackSize), stackSize)
	pc := 0
	for {
		if pc < 0 || pc >= len(r.p.ins) {
			return 0, fmt.Errorf("execution left the program at %d", pc)
		}
		if r.m.Counts.Insns >= r.limit {
			return 0, fmt.Errorf("more than %d instructions executed", r.limit)
		}
		r.m.Counts.Insns++
		if r.m.Profile {
			if r.m.Counts.Hits == nil {
				r.m.Counts.Hits = map[int]int{}
			}
			r.m.Counts.Hits[pc]++
		}
		ins := r.p.ins[pc]
		next, done, err := r.step(pc, ins)
		if err != nil {
			return 0, fmt.Errorf("instruction %d (%v): %w", pc, ins, err)
		}
		if done {
			return r.regs[asm.R0].V, nil
		}
		pc = next
	}
}

func (r *run) step(pc int, ins asm.Instruction) (next int, done bool, err error) {
	op := ins.OpCode
	switch cls := op.Class(); {
	case cls.IsALU():
		return pc + 1, false, r.alu(ins, cls == asm.ALU64Class)
	case cls.IsJump():
		return r.jump(pc, ins, cls == asm.Jump32Class)
	case op == asm.LoadImmOp(asm.DWord):
		return pc + 1, false, r.loadImm(ins)
	case cls == asm.LdXClass && op.Mode() == asm.MemMode:
		return pc + 1, false, r.load(ins)
	case (cls == asm.StClass || cls == asm.StXClass) && op.Mode() == asm.MemMode:
		return pc + 1, false, r.store(ins)
	case cls == asm.StXClass && op.Mode() == asm.AtomicMode:
		return pc + 1, false, r.atomic(ins)
	}
	return 0, false, fmt.Errorf("unsupported instruction")
}

func (r *run) src(ins asm.Instruction) Value {
	if ins.OpCode.Source() == asm.RegSource {
		return r.regs[ins.Src]
	}
	return Scalar(uint64(ins.Constant))
}

func (r *run) alu(ins asm.Instruction, is64 bool) error {
	dst := r.regs[ins.Dst]
	src := r.src(ins)
	op := ins.OpCode.ALUOp()
	switch {
	case op == asm.Swap:
		r.regs[ins.Dst] = Scalar(swap(dst.V, ins))
		return nil
	case dst.R != nil || src.R != nil:
		// Pointer arithmetic: moves, and adding or subtracting a scalar.
		v, err := pointerALU(op, is64, dst, src)
		if err != nil {
			return err
		}
		r.regs[ins.Dst] = v
		return nil
	}
	v, err := scalarALU(op, is64, dst.V, src.V)
	if err != nil {
		return err
	}
	r.regs[ins.Dst] = Scalar(v)
	return nil
}

// swap is a byte swap (to big endian) or a truncation (to little endian) of v.
func swap(v uint64, ins asm.Instruction) uint64 {
	if ins.OpCode.Endianness() == asm.BE {
		switch ins.Constant {
		case 16:
			return uint64(bits.ReverseBytes16(uint16(v)))
		case 32:
			return uint64(bits.ReverseBytes32(uint32(v)))
		case 64:
			return bits.ReverseBytes64(v)
		}
		return v
	}
	switch ins.Constant {
	case 16:
		return uint64(uint16(v))
	case 32:
		return uint64(uint32(v))
	}
	return v
}

// pointerALU is op on a pointer: a move, or adding or subtracting a scalar, or the distance of
// two pointers into the same region.
func pointerALU(op asm.ALUOp, is64 bool, dst, src Value) (Value, error) {
	switch {
	case op == asm.Mov && is64:
		return src, nil
	case op == asm.Mov:
		return Scalar(uint64(uint32(src.V))), nil
	case op == asm.Add && is64 && dst.R != nil && src.R == nil:
		return Value{V: dst.V + src.V, R: dst.R}, nil
	case op == asm.Add && is64 && dst.R == nil && src.R != nil:
		return Value{V: dst.V + src.V, R: src.R}, nil
	case op == asm.Sub && is64 && dst.R != nil && src.R == nil:
		return Value{V: dst.V - src.V, R: dst.R}, nil
	case op == asm.Sub && is64 && dst.R != nil && src.R == dst.R:
		return Scalar(dst.V - src.V), nil
	}
	return Value{}, fmt.Errorf("%v on a pointer", op)
}

// scalarALU is op on two scalars, in 64 or 32 bits.
func scalarALU(op asm.ALUOp, is64 bool, a, b uint64) (uint64, error) {
	if !is64 {
		a, b = uint64(uint32(a)), uint64(uint32(b))
	}
	shift := uint64(31)
	if is64 {
		shift = 63
	}
	var v uint64
	switch op {
	case asm.Add:
		v = a + b
	case asm.Sub:
		v = a - b
	case asm.Mul:
		v = a * b
	case asm.Div:
		if b != 0 {
			v = a / b
		}
	case asm.Mod:
		v = a
		if b != 0 {
			v = a % b
		}
	case asm.Or:
		v = a | b
	case asm.And:
		v = a & b
	case asm.Xor:
		v = a ^ b
	case asm.Mov:
		v = b
	case asm.Neg:
		v = -a
	case asm.LSh:
		v = a << (b & shift)
	case asm.RSh:
		v = a >> (b & shift)
	case asm.ArSh:
		if is64 {
			v = uint64(int64(a) >> (b & 63))
		} else {
			v = uint64(uint32(int32(uint32(a)) >> (b & 31)))
		}
	case asm.MovSX8:
		v = uint64(int64(int8(b)))
	case asm.MovSX16:
		v = uint64(int64(int16(b)))
	case asm.MovSX32:
		v = uint64(int64(int32(b)))
	default:
		return 0, fmt.Errorf("unsupported ALU operation %v", op)
	}
	if !is64 {
		v = uint64(uint32(v))
	}
	return v, nil
}

func (r *run) jump(pc int, ins asm.Instruction, is32 bool) (int, bool, error) {
	switch op := ins.OpCode.JumpOp(); op {
	case asm.Ja:
		off := ins.Offset
		if is32 { // gotol
			off = int16(ins.Constant)
		}
		next, err := r.p.jump(pc, off)
		return next, false, err
	case asm.Exit:
		if len(r.frames) == 0 {
			return 0, true, nil
		}
		f := r.frames[len(r.frames)-1]
		r.frames = r.frames[:len(r.frames)-1]
		copy(r.regs[asm.R6:asm.R10], f.saved[:])
		r.regs[asm.R10] = f.fp
		return f.ret, false, nil
	case asm.Call:
		return r.call(pc, ins)
	default:
		taken, err := r.cond(op, r.regs[ins.Dst], r.src(ins), is32)
		if err != nil {
			return 0, false, err
		}
		if !taken {
			return pc + 1, false, nil
		}
		next, err := r.p.jump(pc, ins.Offset)
		return next, false, err
	}
}

func (r *run) cond(op asm.JumpOp, a, b Value, is32 bool) (bool, error) {
	if a.R != nil || b.R != nil {
		// A pointer is never NULL; two pointers compare within one region.
		switch {
		case a.R != nil && b.IsNull() && (op == asm.JEq || op == asm.JNE):
			return op == asm.JNE, nil
		case b.R != nil && a.IsNull() && (op == asm.JEq || op == asm.JNE):
			return op == asm.JNE, nil
		case a.R != nil && a.R == b.R:
			a, b = Scalar(a.V), Scalar(b.V)
		default:
			return false, fmt.Errorf("comparison %v of a pointer and a value", op)
		}
	}
	x, y := a.V, b.V
	sx, sy := int64(x), int64(y)
	if is32 {
		x, y = uint64(uint32(x)), uint64(uint32(y))
		sx, sy = int64(int32(uint32(x))), int64(int32(uint32(y)))
	}
	switch op {
	case asm.JEq:
		return x == y, nil
	case asm.JNE:
		return x != y, nil
	case asm.JGT:
		return x > y, nil
	case asm.JGE:
		return x >= y, nil
	case asm.JLT:
		return x < y, nil
	case asm.JLE:
		return x <= y, nil
	case asm.JSet:
		return x&y != 0, nil
	case asm.JSGT:
		return sx > sy, nil
	case asm.JSGE:
		return sx >= sy, nil
	case asm.JSLT:
		return sx < sy, nil
	case asm.JSLE:
		return sx <= sy, nil
	}
	return false, fmt.Errorf("unsupported jump %v", op)
}

func (r *run) call(pc int, ins asm.Instruction) (int, bool, error) {
	var args [5]Value
	copy(args[:], r.regs[asm.R1:asm.R6])
	var ret Value
	var err error
	switch {
	case ins.IsFunctionCall():
		target, ok := r.p.symbols[ins.Reference()]
		if !ok {
			return 0, false, fmt.Errorf("call of %q, not in the program", ins.Reference())
		}
		if len(r.frames) >= 8 {
			return 0, false, errors.New("calls nested too deep")
		}
		r.m.Counts.Calls++
		f := frame{ret: pc + 1, fp: r.regs[asm.R10]}
		copy(f.saved[:], r.regs[asm.R6:asm.R10])
		r.frames = append(r.frames, f)
		r.regs[asm.R10] = Pointer(NewRegion("stack", stackSize), stackSize)
		return target, false, nil
	case ins.IsKfuncCall():
		name := ins.Reference()
		h := r.m.Kfuncs[name]
		if h == nil {
			return 0, false, fmt.Errorf("kfunc %s is not emulated", name)
		}
		r.m.Counts.Helpers[name]++
		ret, err = h(r.m, args)
	case ins.IsBuiltinCall():
		fn := asm.BuiltinFunc(ins.Constant)
		h := r.m.Helpers[fn]
		if h == nil {
			return 0, false, fmt.Errorf("helper %v is not emulated", fn)
		}
		r.m.Counts.Helpers[fn.String()]++
		if fn == asm.FnMapLookupElem || fn == asm.FnSkStorageGet {
			r.m.Counts.Lookups++
		}
		ret, err = h(r.m, args)
	default:
		return 0, false, errors.New("unsupported call")
	}
	if err != nil {
		return 0, false, err
	}
	r.regs[asm.R0] = ret
	for reg := asm.R1; reg <= asm.R5; reg++ {
		r.regs[reg] = Value{} // clobbered
	}
	return pc + 1, false, nil
}

func (r *run) loadImm(ins asm.Instruction) error {
	switch ins.Src {
	case asm.PseudoMapFD, asm.PseudoMapValue:
		name := ins.Reference()
		mr, err := r.m.mapRegion(name)
		if err != nil {
			return err
		}
		if ins.Src == asm.PseudoMapFD {
			r.regs[ins.Dst] = Pointer(mr, 0)
			return nil
		}
		v, err := mr.Map.Lookup(make([]byte, 4))
		if err != nil || v == nil {
			return fmt.Errorf("value of %s: %v", name, err)
		}
		r.regs[ins.Dst] = Pointer(v, int(uint64(ins.Constant)>>32))
		return nil
	case asm.R0:
		r.regs[ins.Dst] = Scalar(uint64(ins.Constant))
		return nil
	case asm.R3: // BPF_PSEUDO_BTF_ID
		// The address of a kernel symbol (bpf_ksym_exists): present when a kfunc is emulated.
		if _, ok := r.m.Kfuncs[ins.Reference()]; ok {
			r.regs[ins.Dst] = Scalar(1)
		} else {
			r.regs[ins.Dst] = Scalar(0)
		}
		return nil
	}
	return fmt.Errorf("unsupported 64-bit load (source %v)", ins.Src)
}

// MapRegion is the region standing for map name (what a reference to it yields).
func (m *Machine) mapRegion(name string) (*Region, error) {
	if r := m.mapRegions[name]; r != nil {
		return r, nil
	}
	mp := m.Maps[name]
	if mp == nil {
		return nil, fmt.Errorf("map %s is not emulated", name)
	}
	if m.mapRegions == nil {
		m.mapRegions = map[string]*Region{}
	}
	r := &Region{Name: "map " + name, Map: mp}
	m.mapRegions[name] = r
	return r, nil
}

func (r *run) addr(base Value, off int16, n int) (*Region, uint64, error) {
	if base.R == nil {
		return nil, 0, fmt.Errorf("access through the scalar %#x", base.V)
	}
	a := base.V + uint64(int64(off))
	if _, err := base.R.span(a, n); err != nil {
		return nil, 0, err
	}
	return base.R, a, nil
}

func (r *run) load(ins asm.Instruction) error {
	n := ins.OpCode.Size().Sizeof()
	base := r.regs[ins.Src]
	if base.R == nil && r.m.ProbeMem {
		r.regs[ins.Dst] = Scalar(0)
		return nil
	}
	reg, a, err := r.addr(base, ins.Offset, n)
	if err != nil {
		return err
	}
	if p, ok := reg.ptrs[int(a)]; ok && n == 8 {
		r.regs[ins.Dst] = p
		return nil
	}
	r.regs[ins.Dst] = Scalar(readN(reg.Mem[a:], n))
	return nil
}

func (r *run) store(ins asm.Instruction) error {
	n := ins.OpCode.Size().Sizeof()
	reg, a, err := r.addr(r.regs[ins.Dst], ins.Offset, n)
	if err != nil {
		return err
	}
	if reg.ReadOnly {
		return fmt.Errorf("store into read-only %s", reg.Name)
	}
	v := Scalar(uint64(ins.Constant))
	if ins.OpCode.Class() == asm.StXClass {
		v = r.regs[ins.Src]
	}
	for o := range reg.ptrs {
		if o < int(a)+n && int(a) < o+8 {
			delete(reg.ptrs, o)
		}
	}
	if v.R != nil {
		if n != 8 {
			return fmt.Errorf("store of part of a pointer")
		}
		reg.PutPointer(int(a), v)
		return nil
	}
	writeN(reg.Mem[a:], n, v.V)
	return nil
}

func (r *run) atomic(ins asm.Instruction) error {
	n := ins.OpCode.Size().Sizeof()
	reg, a, err := r.addr(r.regs[ins.Dst], ins.Offset, n)
	if err != nil {
		return err
	}
	old := readN(reg.Mem[a:], n)
	src := r.regs[ins.Src].V
	var v uint64
	fetch := false
	switch op := ins.OpCode.AtomicOp(); op {
	case asm.AddAtomic, asm.FetchAdd:
		v, fetch = old+src, op == asm.FetchAdd
	case asm.OrAtomic, asm.FetchOr:
		v, fetch = old|src, op == asm.FetchOr
	case asm.AndAtomic, asm.FetchAnd:
		v, fetch = old&src, op == asm.FetchAnd
	case asm.XorAtomic, asm.FetchXor:
		v, fetch = old^src, op == asm.FetchXor
	case asm.Xchg:
		v, fetch = src, true
	case asm.CmpXchg:
		v = old
		if old == r.regs[asm.R0].V&mask(n) {
			v = src
		}
		r.regs[asm.R0] = Scalar(old)
	default:
		return fmt.Errorf("unsupported atomic %v", op)
	}
	writeN(reg.Mem[a:], n, v)
	if fetch {
		r.regs[ins.Src] = Scalar(old)
	}
	return nil
}

func mask(n int) uint64 {
	if n == 8 {
		return ^uint64(0)
	}
	return 1<<(8*n) - 1
}

func readN(b []byte, n int) uint64 {
	switch n {
	case 1:
		return uint64(b[0])
	case 2:
		return uint64(binary.LittleEndian.Uint16(b))
	case 4:
		return uint64(binary.LittleEndian.Uint32(b))
	}
	return binary.LittleEndian.Uint64(b)
}

func writeN(b []byte, n int, v uint64) {
	switch n {
	case 1:
		b[0] = byte(v)
	case 2:
		binary.LittleEndian.PutUint16(b, uint16(v))
	case 4:
		binary.LittleEndian.PutUint32(b, uint32(v))
	default:
		binary.LittleEndian.PutUint64(b, v)
	}
}

package confine

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// seccompData is struct seccomp_data as the classic BPF VM of x/net/bpf reads it: the kernel
// loads native 32-bit words, the VM big-endian ones, so each word is written big-endian where
// the kernel would find it (a 64-bit argument's low word first, as on little-endian machines).
func seccompData(nr uint32, archID uint32, args ...uint64) []byte {
	b := make([]byte, 64)
	binary.BigEndian.PutUint32(b[0:], nr)
	binary.BigEndian.PutUint32(b[4:], archID)
	for i, a := range args {
		binary.BigEndian.PutUint32(b[16+8*i:], uint32(a))
		binary.BigEndian.PutUint32(b[16+8*i+4:], uint32(a>>32))
	}
	return b
}

// verdict runs the profile's filter on one system call.
func verdict(t *testing.T, p Profile, archID uint32, name string, args ...uint64) uint32 {
	t.Helper()
	prog, err := program(p, false)
	if err != nil {
		t.Fatal(err)
	}
	insts := make([]bpf.Instruction, len(prog))
	for i, f := range prog {
		insts[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}.Disassemble()
	}
	vm, err := bpf.NewVM(insts)
	if err != nil {
		t.Fatal(err)
	}
	native, _ := arch.GetInfo("")
	nr, ok := native.SyscallNames[name]
	if !ok {
		t.Fatalf("no system call %q on %s", name, native.Name)
	}
	out, err := vm.Run(seccompData(uint32(nr), archID, args...))
	if err != nil {
		t.Fatal(err)
	}
	return uint32(out)
}

// What the filter answers.
var (
	allow = uint32(unix.SECCOMP_RET_ALLOW)
	eperm = errnoOf(unix.EPERM)
)

func errnoOf(e unix.Errno) uint32 { return unix.SECCOMP_RET_ERRNO | uint32(e) }

// high is a bit above an int: a socket argument with it is no family the filter lets through.
const high = 1 << 32

// filterCases are the calls TestFilter asks the filter about, and what it must answer.
var filterCases = []struct {
	profile Profile
	name    string
	args    []uint64
	want    uint32
}{
	{Default, "bpf", nil, eperm},
	{Default, "mount", nil, eperm},
	{Default, "umount2", nil, eperm},
	{Default, "open_tree", nil, eperm},
	{Default, "fsopen", nil, eperm},
	{Default, "move_mount", nil, eperm},
	{Default, "setns", nil, eperm},
	{Default, "ptrace", nil, eperm},
	{Default, "process_vm_readv", nil, eperm},
	{Default, "process_vm_writev", nil, eperm},
	{Default, "pidfd_getfd", nil, eperm},
	{Default, "kexec_load", nil, eperm},
	{Default, "kexec_file_load", nil, eperm},
	{Default, "init_module", nil, eperm},
	{Default, "finit_module", nil, eperm},
	{Default, "open_by_handle_at", nil, eperm},
	{Default, "perf_event_open", nil, eperm},
	{Default, "userfaultfd", nil, eperm},
	// Namespaces: unshare and clone with any namespace flag; clone3 cannot be read.
	{Default, "unshare", []uint64{unix.CLONE_NEWUSER}, eperm},
	{Default, "unshare", []uint64{unix.CLONE_NEWNS | unix.CLONE_FS}, eperm},
	{Default, "unshare", []uint64{unix.CLONE_NEWTIME}, eperm},
	{Default, "unshare", []uint64{unix.CLONE_FILES}, allow},
	{Default, "clone", []uint64{unix.CLONE_NEWUSER | uint64(unix.SIGCHLD)}, eperm},
	{Default, "clone", []uint64{unix.CLONE_NEWNET}, eperm},
	{Default, "clone", []uint64{unix.CLONE_VM | unix.CLONE_VFORK | uint64(unix.SIGCHLD)}, allow},
	{Default, "clone", []uint64{unix.CLONE_VM | unix.CLONE_THREAD | unix.CLONE_SIGHAND | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SYSVSEM | unix.CLONE_SETTLS | unix.CLONE_PARENT_SETTID | unix.CLONE_CHILD_CLEARTID}, allow},
	{Default, "clone3", nil, errnoOf(unix.ENOSYS)},
	// Sockets: the families the hooks see, netlink for routing only; bits above the int
	// make any value foreign.
	{Default, "socket", []uint64{unix.AF_INET, unix.SOCK_STREAM, 0}, allow},
	{Default, "socket", []uint64{unix.AF_INET6, unix.SOCK_DGRAM, 0}, allow},
	{Default, "socket", []uint64{unix.AF_UNIX, unix.SOCK_STREAM, 0}, allow},
	{Default, "socket", []uint64{unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_ROUTE}, allow},
	{Default, "socket", []uint64{unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_SOCK_DIAG}, errnoOf(unix.EAFNOSUPPORT)},
	{Default, "socket", []uint64{unix.AF_NETLINK, unix.SOCK_RAW, high}, errnoOf(unix.EAFNOSUPPORT)},
	{Default, "socket", []uint64{unix.AF_PACKET, unix.SOCK_RAW, 0}, errnoOf(unix.EAFNOSUPPORT)},
	{Default, "socket", []uint64{unix.AF_VSOCK, unix.SOCK_STREAM, 0}, errnoOf(unix.EAFNOSUPPORT)},
	{Default, "socket", []uint64{unix.AF_ALG, unix.SOCK_SEQPACKET, 0}, errnoOf(unix.EAFNOSUPPORT)},
	{Default, "socket", []uint64{unix.AF_INET | high, unix.SOCK_STREAM, 0}, errnoOf(unix.EAFNOSUPPORT)},
	// What programs need.
	{Default, "openat", nil, allow},
	{Default, "execve", nil, allow},
	{Default, "connect", nil, allow},
	{Default, "io_uring_setup", nil, allow},
	{Default, "keyctl", nil, allow},
	{Strict, "io_uring_setup", nil, eperm},
	{Strict, "io_uring_enter", nil, eperm},
	{Strict, "keyctl", nil, eperm},
	{Strict, "personality", nil, eperm},
	{Strict, "bpf", nil, eperm},
	{Strict, "openat", nil, allow},
}

func TestFilter(t *testing.T) {
	native, err := arch.GetInfo("")
	if err != nil {
		t.Skip(err)
	}
	id := uint32(native.ID)
	for _, tc := range filterCases {
		if got := verdict(t, tc.profile, id, tc.name, tc.args...); got != tc.want {
			t.Errorf("%s: %s(%#x): %#x, want %#x", tc.profile, tc.name, tc.args, got, tc.want)
		}
	}
	// A call of another architecture (int $0x80 on x86_64) kills the process, whatever it is.
	if got := verdict(t, Default, uint32(arch.I386.ID), "openat"); got != unix.SECCOMP_RET_KILL_PROCESS {
		t.Errorf("i386 call: %#x, want SECCOMP_RET_KILL_PROCESS", got)
	}
	// The x32 ABI (numbers with bit 30 set) is refused.
	prog, _ := program(Default, false)
	insts := make([]bpf.Instruction, len(prog))
	for i, f := range prog {
		insts[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}.Disassemble()
	}
	vm, _ := bpf.NewVM(insts)
	if got, _ := vm.Run(seccompData(uint32(native.SyscallNames["bpf"])|0x40000000, id)); uint32(got) != errnoOf(unix.ENOSYS) {
		t.Errorf("x32 bpf: %#x, want ENOSYS", got)
	}
	if _, err := program(Off, false); err == nil {
		t.Error("a filter for profile off")
	}
}

func TestParseProfile(t *testing.T) {
	for in, want := range map[string]Profile{"": Default, "default": Default, "strict": Strict, "off": Off} {
		if got, err := ParseProfile(in); err != nil || got != want {
			t.Errorf("%q: %v %v", in, got, err)
		}
	}
	if _, err := ParseProfile("lax"); err == nil {
		t.Error("lax accepted")
	}
}

func TestPlanRead(t *testing.T) {
	good := `{"profile":"default","cgroup":"/sys/fs/cgroup/tether/a","uid":2130706432,"gid":2130706432,"hide":["/run/tether/tether.sock"],"credential_dir":"/run/tether/credentials","credentials":"/run/tether/credentials/agent-3"}`
	p, err := Read(strings.NewReader(good))
	if err != nil || p.UID != 2130706432 || !p.Confined() || p.Cloneflags() != unix.CLONE_NEWNS|unix.CLONE_NEWPID {
		t.Fatalf("%+v %v", p, err)
	}
	for _, bad := range []string{
		`{"profile":"lax","cgroup":"/x"}`,
		`{"profile":"default","cgroup":"x"}`,
		`{"profile":"default","cgroup":"/x","hide":["run/x"]}`,
		`{"profile":"default","cgroup":"/x","credential_dir":"/a","credentials":"/b/agent-1"}`,
		`{"profile":"default","cgroup":"/x","uid":5,"keep_caps":true}`,
		`{"profile":"default","cgroup":"/x","extra":1}`,
		`{"profile":`,
	} {
		if _, err := Read(strings.NewReader(bad)); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	if (Plan{Profile: Off}).Cloneflags() != 0 {
		t.Error("an unconfined agent gets namespaces")
	}
}

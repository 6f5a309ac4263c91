package confine

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// The seccomp filter is built with elastic/go-seccomp-bpf: a pure-Go assembler of seccomp BPF
// (no libseccomp to link or to install on every node; tetherctl stays one static binary), kept
// by Elastic for Beats and Auditbeat, with argument conditions, and with the x32 ABI refused on
// x86_64. Everything
// not named is allowed: the lists say what an agent has no business doing, not what a program
// needs, so a shell, git, curl or an interpreter keep working. One thing the library leaves
// open is closed here: it allows every call of a foreign architecture (the i386 ABI an x86_64
// process reaches with int $0x80, where each call has another number), so the filter starts
// with a check that kills a process making one.

// errno makes an action that fails the call with err. The library's own errno action is EPERM;
// clone3 must fail with ENOSYS, the one answer after which libc falls back to clone, whose flags
// the filter can read (clone3 takes them in memory, out of a filter's sight).
func errno(err unix.Errno) seccomp.Action {
	return seccomp.Action(unix.SECCOMP_RET_ERRNO | uint32(err))
}

// namespaceFlags are the unshare flags that make a namespace; clone takes the same but
// CLONE_NEWTIME, whose bit is part of clone's exit signal there.
const namespaceFlags = unix.CLONE_NEWNS | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC | unix.CLONE_NEWUSER |
	unix.CLONE_NEWPID | unix.CLONE_NEWNET | unix.CLONE_NEWCGROUP | unix.CLONE_NEWTIME

// denied are refused to every confined agent (EPERM): what loads or changes kernel code and
// state, crosses into other processes, or makes namespaces and mounts in which a path a rule
// allows names something else.
var denied = []string{
	"bpf",
	"mount", "umount2", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "open_tree", "mount_setattr", "pivot_root", "chroot",
	"setns",
	"ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
	"kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
	"open_by_handle_at", "name_to_handle_at",
	"perf_event_open", "userfaultfd",
	"iopl", "ioperm", "swapon", "swapoff", "reboot", "acct", "quotactl",
}

// strictDenied are refused too under the strict profile: kernel interfaces an agent rarely
// needs that have been the way around filters and into kernel bugs (io_uring runs system calls
// a filter never sees; keyrings; personality; the kernel log).
var strictDenied = []string{
	"io_uring_setup", "io_uring_enter", "io_uring_register",
	"add_key", "request_key", "keyctl",
	"personality", "syslog", "vhangup", "uselib",
}

// allowedFamilies are the socket families agents may create: the ones tether's hooks see, and
// netlink for the routing family only (getaddrinfo and ip need it).
var allowedFamilies = []uint64{unix.AF_UNIX, unix.AF_INET, unix.AF_INET6, unix.AF_NETLINK}

// policy is the filter of a profile. refuse is the action of the refused calls: EPERM (and
// EAFNOSUPPORT for sockets), or, when the launcher records them, a notification to it, which
// answers with the same errors (see Supervise).
func policy(p Profile, notify bool) (seccomp.Policy, error) {
	names := denied
	switch p {
	case Strict:
		names = append(append([]string{}, denied...), strictDenied...)
	case Default:
	default:
		return seccomp.Policy{}, fmt.Errorf("no seccomp filter for profile %q", p)
	}
	nsCalls := []seccomp.NameWithConditions{
		{Name: "unshare", Conditions: seccomp.ArgumentConditions{{Argument: 0, Operation: seccomp.BitsSet, Value: namespaceFlags}}},
		{Name: "clone", Conditions: seccomp.ArgumentConditions{{Argument: 0, Operation: seccomp.BitsSet, Value: namespaceFlags &^ unix.CLONE_NEWTIME}}},
	}
	// socket(family, ...) of another family; socket(AF_NETLINK, _, protocol) other than route.
	// A value with bits above the int set fails every comparison, so it is refused too.
	other := seccomp.ArgumentConditions{}
	for _, f := range allowedFamilies {
		other = append(other, seccomp.Condition{Argument: 0, Operation: seccomp.NotEqual, Value: f})
	}
	sockets := []seccomp.NameWithConditions{
		{Name: "socket", Conditions: other},
		{Name: "socket", Conditions: seccomp.ArgumentConditions{
			{Argument: 0, Operation: seccomp.Equal, Value: unix.AF_NETLINK},
			{Argument: 2, Operation: seccomp.NotEqual, Value: unix.NETLINK_ROUTE},
		}},
	}
	refuse, refuseSocket := seccomp.ActionErrno, errno(unix.EAFNOSUPPORT)
	if notify {
		refuse, refuseSocket = seccomp.ActionUserNotify, seccomp.ActionUserNotify
	}
	return seccomp.Policy{
		DefaultAction: seccomp.ActionAllow,
		Syscalls: []seccomp.SyscallGroup{
			{Action: refuse, Names: names},
			{Action: refuse, NamesWithCondtions: nsCalls},
			{Action: refuseSocket, NamesWithCondtions: sockets},
			// Not a refusal to record: every thread glibc starts tries clone3 first.
			{Action: errno(unix.ENOSYS), Names: []string{"clone3"}},
		},
	}, nil
}

// program assembles the profile's filter behind the check of the architecture.
func program(p Profile, notify bool) ([]unix.SockFilter, error) {
	pol, err := policy(p, notify)
	if err != nil {
		return nil, err
	}
	native, err := arch.GetInfo("")
	if err != nil {
		return nil, err
	}
	body, err := pol.Assemble()
	if err != nil {
		return nil, err
	}
	const archOffset = 4 // struct seccomp_data: int nr; __u32 arch; ...
	insts := append([]bpf.Instruction{
		bpf.LoadAbsolute{Off: archOffset, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(native.ID), SkipTrue: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_KILL_PROCESS},
	}, body...)
	raw, err := bpf.Assemble(insts)
	if err != nil {
		return nil, err
	}
	out := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		out[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return out, nil
}

// loadFilter sets no_new_privs and installs the profile's filter on every thread of the process.
// With notify, the refused calls wait for an answer on the returned listener (whoever holds it
// answers and records them, see Supervise; once no one holds it they fail with ENOSYS); a kernel
// without listeners for a multi-threaded process (before 5.7) gets the filter that answers
// itself, and listener is nil.
func loadFilter(p Profile, notify bool) (listener *os.File, err error) {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("setting no_new_privs: %w", err)
	}
	if notify {
		fd, err := installFilter(p, true, unix.SECCOMP_FILTER_FLAG_TSYNC|unix.SECCOMP_FILTER_FLAG_TSYNC_ESRCH|unix.SECCOMP_FILTER_FLAG_NEW_LISTENER)
		if err == nil {
			return os.NewFile(fd, "seccomp listener"), nil
		}
		if !errors.Is(err, unix.EINVAL) {
			return nil, err
		}
	}
	_, err = installFilter(p, false, unix.SECCOMP_FILTER_FLAG_TSYNC)
	return nil, err
}

func installFilter(p Profile, notify bool, flags uintptr) (uintptr, error) {
	prog, err := program(p, notify)
	if err != nil {
		return 0, err
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	ret, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, flags, uintptr(unsafe.Pointer(&fprog)))
	switch {
	case errno != 0:
		return 0, errno
	case flags&unix.SECCOMP_FILTER_FLAG_NEW_LISTENER != 0:
		return ret, nil // the listener (a thread that cannot sync fails with ESRCH)
	case ret != 0:
		return 0, fmt.Errorf("thread %d could not take the filter", ret)
	}
	return 0, nil
}
